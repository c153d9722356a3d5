"""Shared fixtures: one local[2] Spark session and one tiny synthetic dump per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from films import dicom_bytes

ROOT = Path(__file__).resolve().parent.parent
# Beside the project in the team's workspace; CXR_SHARED_DATA points elsewhere (e.g. from a git worktree).
SHARED_DATA = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data"))
TINY_IMAGES = 96  # enough patients for all three splits, small enough for seconds per stage
TINY_SIZE = 128  # synthetic image side for tests (the real layout, smaller pixels)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real NIH metadata and samples in ../shared/data, or a skip with the reason."""
    if not (SHARED_DATA / "nih" / "Data_Entry_2017_v2020.csv.gz").exists():
        pytest.skip(f"real reference data not found at {SHARED_DATA} (it sits beside the project in the "
                    "team's workspace, not in a user's clone)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from cxr_spark.io.session import build_session, read_properties

    properties = read_properties(ROOT / "conf" / "spark" / "local.conf")
    properties.update({"spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false", "spark.driver.memory": "2g",
                       "spark.sql.warehouse.dir": str(tmp_path_factory.mktemp("warehouse"))})
    conf_file = tmp_path_factory.mktemp("conf") / "test.conf"
    conf_file.write_text("".join(f"{k} {v}\n" for k, v in properties.items()))
    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = build_session("cxr-spark tests", conf_file)
    yield session
    session.stop()


@pytest.fixture(scope="session")
def tiny_dump(tmp_path_factory) -> Path:
    from cxr_spark.synth import SynthSpec, generate

    out = tmp_path_factory.mktemp("dump")
    generate(SynthSpec(out=str(out), n_images=TINY_IMAGES, size=TINY_SIZE, seed=7, processes=2))
    return out


@pytest.fixture(scope="session")
def config():
    from cxr_spark.config import load_config

    return load_config()


@pytest.fixture(scope="session")
def tiny_raw(spark, tiny_dump, tmp_path_factory, config):
    from cxr_spark.stages.ingest.job import ingest

    out = tmp_path_factory.mktemp("datasets") / "raw"
    counts = ingest(spark, str(tiny_dump), str(out), str(tiny_dump / "Data_Entry_2017.csv"), str(tiny_dump),
                    config.ingest)
    return out, counts


@pytest.fixture(scope="session")
def tiny_images(spark, tiny_raw, config):
    from cxr_spark.config import override
    from cxr_spark.stages.preprocess import preprocess

    raw, _ = tiny_raw
    out = raw.parent / "images_32"
    counts = preprocess(spark, str(raw), str(out), override(config.preprocess, size=32, min_files_per_split=4))
    return out, counts


def read_rows(url, fields, **kwargs) -> list:
    """Every row of a Petastorm dataset, once. Uses the single-threaded pool: petastorm 0.13.1's thread
    pool can report end-of-data before its ventilator thread has queued the first row group when
    num_epochs=1 (measured here: 1 read in 40 returned no rows; cf. uber/petastorm#71). Training reads
    with num_epochs=None, where the ventilator never reports completion, so it is not affected."""
    from petastorm import make_reader

    with make_reader(f"file://{url}", schema_fields=fields, num_epochs=1, reader_pool_type="dummy",
                     **kwargs) as reader:
        return list(reader)


@pytest.fixture(scope="session", params=["made here", "real"])
def sample_films(request, tmp_path_factory) -> Path:
    """A folder of two 8-bit gray PNG films and one DICOM (``rsna_<uid>.dcm``: PA, M, 62, with a patient name
    and id): made here, or the real ones in ../shared/data/samples (skipped in a user's clone), so every test
    of them runs on data the tests make themselves too."""
    if request.param == "real":
        return request.getfixturevalue("shared_data") / "samples"
    import cv2
    import numpy as np

    from cxr_spark.core.image_codec import encode_png

    folder = tmp_path_factory.mktemp("films")
    rng = np.random.default_rng(21)
    for name in ("00000001_000.png", "00027426_000.png"):
        smooth = cv2.GaussianBlur(rng.integers(0, 256, (512, 512)).astype(np.uint8), (0, 0), 4).astype(int)
        film = np.clip(smooth + rng.integers(-25, 26, (512, 512)), 0, 255).astype(np.uint8)
        (folder / name).write_bytes(encode_png(film))
    pixels = cv2.GaussianBlur(rng.integers(0, 256, (512, 512)).astype(np.uint8), (0, 0), 4)
    (folder / "rsna_1.2.826.0.1.3680043.99.4711.dcm").write_bytes(dicom_bytes(
        pixels, PatientName="DOE^JOHN", PatientID="MRN0004711", ViewPosition="PA", PatientSex="M", PatientAge="062Y"))
    return folder


def pytest_collection_modifyitems(items):
    """Mark every test that uses a Spark session (directly or through a fixture) ``spark``, unless it is
    marked ``in_process`` (Spark only made its data): ``make mutate`` runs the others, whose code under
    test all runs in the test's own process, where the mutants are."""
    for item in items:
        if "spark" in getattr(item, "fixturenames", ()) and item.get_closest_marker("in_process") is None:
            item.add_marker(pytest.mark.spark)
