"""Batch scoring of unlabelled dumps into an append-only predictions store: idempotence, quarantine,
summaries checked against numpy recomputations, the lock, exit codes, and failed runs leaving the store
byte-for-byte as it was. The model is a real (untrained) small_cnn saved with a real model.json."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import ROOT, SHARED_DATA
from films import dicom_bytes

from cxr_spark.core.identity import stored_identity
from cxr_spark.core.image_formats import ImageError, sniff_format
from cxr_spark.core.labels import LABELS
from cxr_spark.datasets.model_card import MODEL_CARD, MODEL_FILE
from cxr_spark.datasets.quarantine import QUARANTINE_DIR
from cxr_spark.io.commit import EXIT_LOCKED, OutputLockedError, RunLock
from cxr_spark.stages.batch_score.job import EMPTY_SHA256, EXIT_NOTHING_NEW, LOCK_FILE, RUNS_DIR, batch_score
from cxr_spark.stages.batch_score.scoring import flag_findings

SIZE = 32
MEAN, STD = 110.0, 55.0
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm"}


# ---------------------------------------------------------------------------------------------
# helpers: test data, independent expectations


def _film(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A grayscale test image with structure (so different images score differently)."""
    y, x = np.mgrid[0:height, 0:width]
    centre = rng.uniform(0.2, 0.8, 2) * (height, width)
    blob = np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / (2 * (rng.uniform(0.1, 0.3) * height) ** 2))
    return np.clip(255 * (0.3 * blob + 0.7 * rng.random((height, width)) * blob + 0.1 * rng.random((height, width))),
                   0, 255).astype(np.uint8)


def _write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buffer = cv2.imencode(".jpg" if path.suffix.lower() in (".jpg", ".jpeg") else ".png", image)
    assert ok
    path.write_bytes(buffer.tobytes())


def _write_images(folder: Path, names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        _write_image(folder / name, _film(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90))))


def _expected_input(data: bytes) -> np.ndarray:
    """The model input computed here with OpenCV alone: decode as grayscale, resize as preprocess documents
    it (a k x k box average by the largest integer k that divides both sides and keeps them >= SIZE, then
    an area resize), standardise."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    height, width = image.shape
    factors = [k for k in range(2, min(height, width) // SIZE + 1) if height % k == 0 and width % k == 0]
    if factors:
        image = cv2.resize(image, (width // factors[-1], height // factors[-1]), interpolation=cv2.INTER_AREA)
    if image.shape != (SIZE, SIZE):
        image = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return ((image.astype(np.float32) - MEAN) / STD)[..., np.newaxis]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file (with its SHA-256) and every folder under ``folder``: the store, byte for byte."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(folder.rglob("*"))}


def _save_model(folder: Path, thresholds: dict[str, float], version: str | None = None) -> str:
    """A real model folder as train writes it (model.keras + model.json with the same keys)."""
    from cxr_spark.stages.train.models import build_model

    folder.mkdir(parents=True)
    build_model("small_cnn", SIZE, len(LABELS), seed=3).save(folder / MODEL_FILE)
    version = version or f"small_cnn-{hashlib.sha256((folder / MODEL_FILE).read_bytes()).hexdigest()[:12]}"
    card = {"model_version": version, "model": "small_cnn", "task": "multilabel", "labels": list(LABELS),
            "input_size": SIZE, "normalization": {"mode": "train_mean_std", "mean": MEAN, "std": STD},
            "thresholds": thresholds, "thresholds_tuned_on": {"split": "val", "images": 0, "criterion": "test"},
            "training": {}, "history": {}, "dataset": {}}
    (folder / MODEL_CARD).write_text(json.dumps(card))
    return version


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> Path:
    """6 PNGs and 4 JPEGs of assorted sizes and extension cases, one duplicate, three bad files, one non-image name."""
    folder = tmp_path_factory.mktemp("dump")
    _write_images(folder, ["a/001.png", "a/002.png", "a/003.PNG", "b/004.png", "b/005.png", "006.Png",
                           "b/007.jpg", "b/008.JPG", "c/009.jpeg", "c/010.jpg"], seed=11)
    shutil.copy(folder / "a/001.png", folder / "c/copy_of_001.png")  # same content: scored once
    (folder / "c/empty.png").write_bytes(b"")
    (folder / "c/notes.jpg").write_bytes(b"this is a text file, not a radiograph\n")
    (folder / "c/truncated.png").write_bytes((folder / "a/002.png").read_bytes()[:60])
    (folder / "c/readme.txt").write_text("not listed: not an image extension\n")
    return folder


@pytest.fixture(scope="module")
def model(tmp_path_factory, dump) -> tuple[Path, dict]:
    """A small_cnn whose thresholds are the per-label medians of its own outputs on the dump (some flagged)."""
    folder = tmp_path_factory.mktemp("models") / "model"
    good = [p for p in _image_files(dump) if p.stat().st_size > 100]
    _save_model(folder, dict.fromkeys(LABELS, 0.5))
    outputs = np.stack(list(_expected_probabilities(folder, good).values()))
    thresholds = {label: float(np.median(outputs[:, i])) for i, label in enumerate(LABELS)}
    card = json.loads((folder / MODEL_CARD).read_text())
    card["thresholds"] = thresholds
    (folder / MODEL_CARD).write_text(json.dumps(card))
    return folder, card


def _expected_probabilities(model_dir: Path, files: list[Path]) -> dict[str, np.ndarray]:
    import tensorflow as tf

    keras_model = tf.keras.models.load_model(model_dir / MODEL_FILE, compile=False)
    outputs = keras_model.predict(np.stack([_expected_input(p.read_bytes()) for p in files]), verbose=0)
    return {hashlib.sha256(p.read_bytes()).hexdigest(): row for p, row in zip(files, outputs)}


def _read_store(spark, store: Path):
    return spark.read.parquet(f"file://{store}").toPandas()


# ---------------------------------------------------------------------------------------------
# pure functions


def test_sniff_format_tells_png_jpeg_dicom_and_rejects_the_rest():
    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    assert sniff_format(cv2.imencode(".png", image)[1].tobytes()) == "png"
    assert sniff_format(cv2.imencode(".jpg", image)[1].tobytes()) == "jpeg"
    assert sniff_format(bytes(128) + b"DICM" + bytes(16)) == "dicom"
    for data, reason in ((b"", "empty_file"), (b"GIF89a" + bytes(200), "not_an_image")):
        with pytest.raises(ImageError) as caught:
            sniff_format(data)
        assert caught.value.reason == reason


def test_flag_findings_matches_an_elementwise_comparison():
    rng = np.random.default_rng(0)
    probabilities, thresholds = rng.random((20, len(LABELS))), rng.random(len(LABELS))
    flags = flag_findings(probabilities, thresholds, list(LABELS))
    for i in range(20):
        assert flags[i] == [LABELS[j] for j in range(len(LABELS)) if probabilities[i, j] >= thresholds[j]]


def test_dicom_files_are_stored_by_content_hash_without_their_file_or_folder_name():
    digest = hashlib.sha256(b"some dicom").hexdigest()
    expected = (digest[:32] + ".dcm", "dicom:" + digest[:32] + ".dcm")  # ingest's id of the same file
    assert stored_identity("file:/d/MRN7654321/Doe^John_123.dcm", digest, "dicom") == expected
    assert stored_identity("file:/d/x/Doe.DICOM", digest, None) == expected  # by its name, any case
    assert stored_identity("file:/d/x/scan.png", digest, "dicom") == expected  # by its content
    assert stored_identity("file:/d/x/1_000.png", digest, "png") == ("1_000.png", "file:/d/x/1_000.png")


def _glob_matches(glob: str, name: str) -> bool:
    """Hadoop's ``*.{a,b}`` glob read here: its braces expanded, each alternative matched by fnmatch."""
    import fnmatch

    head, alternatives = glob.split("{", 1)
    return any(fnmatch.fnmatchcase(name, head + alternative) for alternative in alternatives.rstrip("}").split(","))


def test_the_image_glob_takes_every_image_extension_in_any_case_and_nothing_else():
    from cxr_spark.core.identity import IMAGE_GLOB

    for name in ("a.png", "a.PNG", "a.Png", "b.jpg", "b.JPG", "c.jpeg", "c.JpEg", "d.dcm", "d.DCM", "e.dicom",
                 "e.DICOM", "x.y.png"):
        assert _glob_matches(IMAGE_GLOB, name), name
    for name in ("a.txt", "a.pngx", "apng", "a.png.txt", "a.gif", "a.dcm.gz"):
        assert not _glob_matches(IMAGE_GLOB, name), name


# ---------------------------------------------------------------------------------------------
# the lock


def test_lock_held_by_a_live_process_refuses_and_stale_locks_are_broken(spark, tmp_path, caplog):
    lock_url = f"file://{tmp_path}/{LOCK_FILE}"
    holder = RunLock(spark, lock_url, "run-a", stale_after_s=3600)
    holder.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(OutputLockedError, match="locked"):
        RunLock(spark, lock_url, "run-b", stale_after_s=3600).acquire()
    holder.release()
    assert not (tmp_path / LOCK_FILE).exists()

    # a pid that is not running on this host: a crashed run's lock
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                  "run_id": "crashed"}))
    with caplog.at_level("WARNING", logger="cxr_spark.io.commit"):
        RunLock(spark, lock_url, "run-c", stale_after_s=3600).acquire()
    assert "breaking stale lock" in caplog.text and "is gone" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["run_id"] == "run-c"

    # a live holder elsewhere, but older than the configured age
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "another-host", "run_id": "old"}))
    old = time.time() - 120
    os.utime(tmp_path / LOCK_FILE, (old, old))
    with pytest.raises(OutputLockedError):
        RunLock(spark, lock_url, "run-d", stale_after_s=600).acquire()
    RunLock(spark, lock_url, "run-e", stale_after_s=60).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["run_id"] == "run-e"


# ---------------------------------------------------------------------------------------------
# runs


def test_runs_score_only_new_images_and_summaries_match_the_store(spark, dump, model, tmp_path):
    model_dir, card = model
    dump = Path(shutil.copytree(dump, tmp_path / "dump"))  # this test adds files to its own copy
    store = tmp_path / "store"
    listed = _image_files(dump)
    contents = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in listed}
    bad = {"empty.png": "empty_file", "notes.jpg": "not_an_image", "truncated.png": "corrupt_image"}
    good = [p for p in listed if p.name not in bad]
    distinct_good = {contents[p] for p in good}

    first = batch_score(spark, str(dump), str(model_dir), str(store))
    assert first["files_listed"] == len(listed) == 14
    assert first["scored"] == len(distinct_good) == 10
    assert first["quarantined"] == len(bad)
    assert first["skipped"] == first["skipped_duplicate_content"] == len(good) - len(distinct_good) == 1
    assert first["status"] == "scored" and first["exit_code"] == 0

    stored = _read_store(spark, store)
    assert sorted(stored["content_sha256"]) == sorted(distinct_good)
    assert set(stored["model_version"]) == {card["model_version"]}
    assert stored["labels"].isna().all() and set(stored["split"]) == {"unlabeled"}
    assert {str(d) for d in stored["scored_date"]} == {dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")}
    assert set(stored["run_id"]) == {first["run_id"]}
    expected = _expected_probabilities(model_dir, good)
    for digest, vector in zip(stored["content_sha256"], stored["probabilities"]):
        np.testing.assert_allclose(vector, expected[digest], rtol=1e-4, atol=1e-5)
    # flags: recomputed with numpy from the stored probabilities and model.json's thresholds
    probabilities = np.stack(stored["probabilities"])
    thresholds = np.array([card["thresholds"][label] for label in LABELS], np.float32)
    recomputed = {label: int((probabilities[:, i] >= thresholds[i]).sum()) for i, label in enumerate(LABELS)}
    assert first["flagged"] == recomputed and sum(recomputed.values()) > 0
    for flagged, vector in zip(stored["flagged"], probabilities):
        assert list(flagged) == [label for i, label in enumerate(LABELS) if vector[i] >= thresholds[i]]

    quarantine = spark.read.parquet(f"file://{store}/{QUARANTINE_DIR}").toPandas()
    assert dict(zip(quarantine["image_id"], quarantine["reason"])) == bad
    assert set(quarantine["content_sha256"]) == {contents[p] for p in listed if p.name in bad}
    assert EMPTY_SHA256 in set(quarantine["content_sha256"])
    run_file = json.loads((store / RUNS_DIR / f"{first['run_id']}.json").read_text())
    assert run_file["counts"] == json.loads(json.dumps(first))

    # the same dump again: nothing new, the store's data unchanged
    data_before = {k: v for k, v in _snapshot(store).items() if not k.startswith((RUNS_DIR, "_monitor.html"))}
    second = batch_score(spark, str(dump), str(model_dir), str(store))
    assert (second["scored"], second["quarantined"], second["skipped"]) == (0, 0, len(listed))
    assert second["status"] == "nothing_new" and second["exit_code"] == EXIT_NOTHING_NEW
    assert {k: v for k, v in _snapshot(store).items() if not k.startswith((RUNS_DIR, "_monitor.html"))} == data_before
    assert len(list((store / RUNS_DIR).glob("*.json"))) == 2

    # five new files: exactly five scored, everything before skipped
    _write_images(dump / "d", [f"new_{i}.png" for i in range(3)] + ["new_3.jpg", "new_4.JPEG"], seed=99)
    third = batch_score(spark, str(dump), str(model_dir), str(store))
    assert (third["scored"], third["skipped"], third["quarantined"]) == (5, len(listed), 0)
    stored = _read_store(spark, store)
    assert len(stored) == len(distinct_good) + 5 == stored["content_sha256"].nunique()
    new_rows = stored[stored["run_id"] == third["run_id"]]
    assert sorted(new_rows["image_id"]) == sorted(p.name for p in (dump / "d").iterdir())
    assert third["flagged"] == {label: int((np.stack(new_rows["probabilities"])[:, i] >= thresholds[i]).sum())
                                for i, label in enumerate(LABELS)}


def test_hashing_and_scoring_take_one_task_per_min_files_and_the_dump_is_still_read_in_parallel(spark, tmp_path,
                                                                                               monkeypatch):
    """Each task that hashes or scores starts the model in its worker: a small dump takes one (its scan's splits
    merged), new files are dealt into one task per MIN_FILES_PER_TASK after a scan that keeps its splits."""
    from pyspark.sql import functions as F

    from cxr_spark.stages.batch_score import scoring

    rng = np.random.default_rng(5)
    for i in range(6):  # 6 x 200 KB: the file scan splits them over the 2 slots of local[2]
        (tmp_path / "dump").mkdir(exist_ok=True)
        (tmp_path / "dump" / f"{i}.png").write_bytes(rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    files = spark.read.format("binaryFile").load(f"file://{tmp_path}/dump")
    splits = files.rdd.getNumPartitions()
    assert splits >= 2
    assert scoring.hash_input(files, 6).rdd.getNumPartitions() == 1
    contents = files.select(F.col("path").alias("source_path"), "content")
    paths = sorted(row["path"] for row in files.select("path").collect())
    new = spark.createDataFrame([(path, "h") for path in paths[:3]], "source_path string, content_sha256 string")
    one = scoring.scoring_input(contents, new, 3)
    assert one.rdd.getNumPartitions() == 1 and one.count() == 3
    monkeypatch.setattr(scoring, "MIN_FILES_PER_TASK", 1)  # one task per new file, the scan's splits unmerged
    assert scoring.hash_input(files, 6).rdd.getNumPartitions() == splits
    assert scoring.scoring_input(contents, new, 3).rdd.getNumPartitions() == 3


def test_a_dump_split_over_several_tasks_is_scored_as_in_one(spark, dump, model, tmp_path, monkeypatch):
    """With the bound lowered the 14-file dump is hashed and scored by several tasks, and nothing it gives
    changes: each file scored once, as Keras predicts it, the bad ones quarantined."""
    from cxr_spark.stages.batch_score import scoring

    monkeypatch.setattr(scoring, "MIN_FILES_PER_TASK", 4)
    model_dir, _ = model
    summary = batch_score(spark, str(dump), str(model_dir), str(tmp_path / "store"))
    listed = _image_files(dump)
    good = [p for p in listed if p.stat().st_size > 100]
    expected = _expected_probabilities(model_dir, good)
    stored = _read_store(spark, tmp_path / "store")
    assert sorted(stored["content_sha256"]) == sorted(expected) and summary["scored"] == len(expected)
    for digest, vector in zip(stored["content_sha256"], stored["probabilities"]):
        np.testing.assert_allclose(vector, expected[digest], rtol=1e-4, atol=1e-5)
    quarantine = spark.read.parquet(f"file://{tmp_path / 'store'}/{QUARANTINE_DIR}").toPandas()
    assert sorted(quarantine["image_id"]) == sorted(p.name for p in listed if p.stat().st_size <= 100)


def test_a_failed_run_leaves_the_store_byte_for_byte_as_it_was(spark, dump, model, tmp_path):
    model_dir, _ = model
    store = tmp_path / "store"
    batch_score(spark, str(dump), str(model_dir), str(store))
    before = _snapshot(store)
    assert before and LOCK_FILE not in before

    # a model folder whose model.keras is corrupt (and a new version, so every file is new to it)
    broken = tmp_path / "broken_model"
    shutil.copytree(model_dir, broken)
    (broken / MODEL_FILE).write_bytes(b"PK\x03\x04 not really a keras archive")
    card = json.loads((broken / MODEL_CARD).read_text())
    (broken / MODEL_CARD).write_text(json.dumps({**card, "model_version": "small_cnn-broken"}))
    with pytest.raises(Exception):
        batch_score(spark, str(dump), str(broken), str(store))
    assert _snapshot(store) == before

    # an input folder that does not exist
    with pytest.raises(Exception, match="does not exist|Path does not exist"):
        batch_score(spark, str(tmp_path / "no_such_dump"), str(model_dir), str(store))
    assert _snapshot(store) == before
    # ... and into a store that did not exist: no store folder is left behind
    with pytest.raises(Exception):
        batch_score(spark, str(tmp_path / "no_such_dump"), str(model_dir), str(tmp_path / "new_store"))
    assert not (tmp_path / "new_store").exists()


def test_a_commit_that_fails_midway_undoes_its_renames(spark, tmp_path, caplog):
    from cxr_spark.io.storage import FileSystem
    from cxr_spark.stages.batch_score.job import _commit

    store = tmp_path / "store"
    (store / "scored_date=2026-01-01" / "run_id=old").mkdir(parents=True)
    (store / "scored_date=2026-01-01" / "run_id=old" / "part-0.parquet").write_bytes(b"old rows")
    (store / "blocker").write_text("a file where the second move needs a folder")
    for name in ("predictions", "quarantine"):
        (store / "_staging" / "r" / name).mkdir(parents=True)
        (store / "_staging" / "r" / name / "part-0.parquet").write_bytes(name.encode())
    before = _snapshot(store)
    url = f"file://{store}"
    moves = [(f"{url}/_staging/r/predictions", f"{url}/scored_date=2026-02-02/run_id=r"),
             (f"{url}/_staging/r/quarantine", f"{url}/blocker/run_id=r")]
    with caplog.at_level("ERROR", logger="cxr_spark.stages.batch_score.job"), pytest.raises(Exception):
        _commit(FileSystem(spark, url), url, moves)
    assert "undoing 1 renames" in caplog.text  # the first move was made, then taken back
    assert _snapshot(store) == before


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    conf = tmp_path / "spark.conf"
    conf.write_text((ROOT / "conf/spark/local.conf").read_text()
                    + "\nspark.ui.enabled false\nspark.ui.showConsoleProgress false\n")
    return subprocess.run([sys.executable, "-m", "cxr_spark.cli", "batch-score", *args, "--spark-conf", str(conf)],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYSPARK_PYTHON=sys.executable))


@pytest.mark.slow  # two CLI processes, each starting Spark and TensorFlow
def test_cli_exit_codes_for_nothing_new_and_a_locked_store(spark, dump, model, tmp_path):
    model_dir, _ = model
    store = tmp_path / "store"
    batch_score(spark, str(dump), str(model_dir), str(store))
    args = ["--images", str(dump), "--model", str(model_dir), "--out", str(store)]

    done = _cli(args, tmp_path)
    assert done.returncode == EXIT_NOTHING_NEW, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1].split(": ", 1)[1])
    assert summary["scored"] == 0 and summary["skipped"] == len(_image_files(dump))

    (store / LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": "held"}))
    before = _snapshot(store)
    done = _cli(args, tmp_path)
    assert done.returncode == EXIT_LOCKED, done.stderr[-3000:]
    assert "store is locked" in done.stderr and "held" in done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1].split(": ", 1)[1])["status"] == "locked"
    assert _snapshot(store) == before


def test_dicom_is_scored_with_an_opaque_id_and_no_patient_tags(spark, model, tmp_path):
    # ../shared/data beside a clone, or two levels up from a git worktree (the team's workspace)
    folders = (SHARED_DATA, ROOT.parents[1] / "shared" / "data")
    samples = sorted(path for folder in folders for path in folder.glob("samples/rsna_*.dcm"))
    if not samples:
        pytest.skip(f"no real DICOM sample (samples/rsna_*.dcm) in {' or '.join(map(str, folders))}")
    data = samples[0].read_bytes()
    import pydicom

    tags = pydicom.dcmread(samples[0], stop_before_pixels=True)
    identifiers = [str(tags.get(name, "")) for name in ("PatientName", "PatientID", "SOPInstanceUID",
                                                         "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber")]
    identifiers = [value for value in identifiers if len(value) >= 6]
    assert len(identifiers) >= 2  # the sample carries at least a patient id and a UID
    model_dir, _ = model
    dump, store = tmp_path / "dump", tmp_path / "store"
    dump.mkdir()
    shutil.copy(samples[0], dump / samples[0].name.upper().replace(".DCM", ".dcm"))
    counts = batch_score(spark, str(dump), str(model_dir), str(store))
    assert (counts["scored"], counts["quarantined"]) == (1, 0)
    stored = _read_store(spark, store)
    image_id = hashlib.sha256(data).hexdigest()[:32] + ".dcm"
    assert list(stored["image_id"]) == [image_id]
    assert list(stored["image_format"]) == ["dicom"] and list(stored["source_path"]) == ["dicom:" + image_id]
    for path in store.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for value in identifiers:
                assert value.encode() not in content, (value, path)


def test_no_dicom_folder_or_file_name_reaches_the_store(spark, model, tmp_path):
    # exports name folders and files after the patient: neither may be stored, scored or quarantined
    dump, store = tmp_path / "incoming", tmp_path / "store"
    (dump / "MRN7654321").mkdir(parents=True)
    pixels = np.random.default_rng(3).integers(0, 4096, (48, 40), dtype=np.uint16)
    good = dicom_bytes(pixels, BitsStored=12, HighBit=11)
    (dump / "MRN7654321" / "DOE_JOHN.dcm").write_bytes(good)
    (dump / "MRN7654321" / "ROE_JANE.DICOM").write_bytes(good[:200])  # truncated: quarantined
    model_dir, _ = model
    counts = batch_score(spark, str(dump), str(model_dir), str(store))
    assert (counts["files_listed"], counts["scored"], counts["quarantined"]) == (2, 1, 1)
    stored = _read_store(spark, store)
    assert list(stored["source_path"]) == ["dicom:" + hashlib.sha256(good).hexdigest()[:32] + ".dcm"]
    quarantined = spark.read.parquet(str(store / QUARANTINE_DIR)).toPandas()
    assert list(quarantined["source_path"]) == ["dicom:" + hashlib.sha256(good[:200]).hexdigest()[:32] + ".dcm"]
    assert quarantined["detail"].notna().all()
    for path in store.rglob("*"):
        assert not {"MRN7654321", "DOE_JOHN", "ROE_JANE"} & set(path.name.split(".")), path
        if path.is_file():
            content = path.read_bytes()
            for name in (b"MRN7654321", b"DOE_JOHN", b"ROE_JANE"):
                assert name not in content, (name, path)


# ---------------------------------------------------------------------------------------------
# a killed run's commit is finished or undone by the next run


@pytest.mark.slow  # a command-line run per step, each starting Spark and TensorFlow
@pytest.mark.parametrize("step, committed", [("store staged", False), ("store committed", True),
                                             ("store moved 1", True), ("store moved 2", True)])
def test_a_run_killed_during_its_commit_is_finished_or_undone_by_the_next(spark, dump, model, tmp_path, step,
                                                                           committed):
    from faults import kill_at_step

    model_dir, _ = model
    store = tmp_path / "store"
    first = batch_score(spark, str(dump), str(model_dir), str(store))  # a store with one run
    _write_images(tmp_path / "new", ["n1.png", "n2.png", "n3.jpg"], seed=5)
    (tmp_path / "new" / "bad.png").write_bytes(b"broken")
    killed = kill_at_step(["batch-score", "--images", str(tmp_path / "new"), "--model", str(model_dir),
                           "--out", str(store)], step, tmp_path)
    killed_run = next(line.split("batch-score run ", 1)[1].split(":", 1)[0] for line in killed.splitlines()
                      if "batch-score run " in line)
    assert list((store / "_staging").iterdir()), "the killed run left nothing to recover"
    # what a reader sees before anyone recovers: no row whose run has no summary
    visible = set(_read_store(spark, store)["run_id"])
    assert visible <= {path.stem for path in (store / RUNS_DIR).glob("*.json")}, visible

    later = batch_score(spark, str(tmp_path / "new"), str(model_dir), str(store))  # breaks the dead run's lock
    summaries = {path.stem: json.loads(path.read_text())["counts"] for path in (store / RUNS_DIR).glob("*.json")}
    rows = _read_store(spark, store)
    quarantined = spark.read.parquet(f"file://{store}/{QUARANTINE_DIR}").toPandas()
    # every row visible belongs to a run with a summary, and each summary counts exactly its rows
    assert set(rows["run_id"]) | set(quarantined["run_id"]) <= set(summaries)
    for run_id, counts in summaries.items():
        assert (counts["scored"], counts["quarantined"]) == ((rows["run_id"] == run_id).sum(),
                                                             (quarantined["run_id"] == run_id).sum()), run_id
    # the new files are in the store once, by the killed run if it had committed, else by the next one
    new = {hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "new").iterdir()}
    owner = killed_run if committed else later["run_id"]
    assert set(rows.loc[rows["run_id"] == owner, "content_sha256"]) | set(
        quarantined.loc[quarantined["run_id"] == owner, "content_sha256"]) == new
    assert (killed_run in summaries) == committed
    assert (later["scored"], later["quarantined"]) == ((0, 0) if committed else (3, 1))
    assert set(summaries) == {first["run_id"], later["run_id"]} | ({killed_run} if committed else set())
    assert not (store / "_staging").exists() and not (store / LOCK_FILE).exists()


def test_score_refuses_a_split_with_no_image_and_leaves_its_output(spark, model, tiny_images, tmp_path):
    from cxr_spark.core.guards import UsageError
    from cxr_spark.stages.score import score

    model_dir, _ = model
    images, counts = tiny_images
    assert "unlabeled" not in counts["splits"]
    out = tmp_path / "predictions"
    with pytest.raises(UsageError, match="no image of split 'unlabeled'"):
        score(spark, str(images), str(model_dir), str(out), split="unlabeled")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    written = score(spark, str(images), str(model_dir), str(out), split="unlabeled", allow_empty=True)
    assert written["scored"] == 0 and spark.read.parquet(str(out)).count() == 0


def test_score_gives_what_keras_predicts_on_the_cards_normalisation(spark, model, tiny_images, tmp_path):
    """The fast suite's check of score(): every test image's probabilities equal Keras' predict on the same
    stored pixels standardised here with the model card's mean and std (not the dataset's)."""
    import tensorflow as tf
    from conftest import read_rows

    from cxr_spark.stages.score import score

    images, _ = tiny_images
    model_dir = Path(shutil.copytree(model[0], tmp_path / "model"))
    card = {**model[1], "normalization": {"mode": "train_mean_std", "mean": 30.0, "std": 90.0}}
    (model_dir / MODEL_CARD).write_text(json.dumps(card))  # far from the dataset's own statistics
    counts = score(spark, str(images), str(model_dir), str(tmp_path / "predictions"), split="test")
    rows = [row for row in read_rows(images, ["image_id", "split", "image"]) if row.split == "test"]
    assert counts["scored"] == len(rows) > 0
    keras_model = tf.keras.models.load_model(model_dir / MODEL_FILE, compile=False)
    pixels = np.stack([row.image for row in rows]).astype(np.float32)
    expected = keras_model.predict(((pixels - 30.0) / 90.0)[..., np.newaxis], verbose=0)
    scored = spark.read.parquet(str(tmp_path / "predictions")).toPandas().set_index("image_id")
    for row, vector in zip(rows, expected):
        np.testing.assert_allclose(scored.loc[row.image_id, "probabilities"], vector, rtol=1e-4, atol=1e-5)


def test_a_second_model_version_scores_every_file_again_and_the_first_still_skips_them(spark, dump, model,
                                                                                        tmp_path):
    model_dir, card = model
    second = Path(shutil.copytree(model_dir, tmp_path / "model_v2"))
    (second / MODEL_CARD).write_text(json.dumps({**card, "model_version": card["model_version"] + "-v2"}))
    store = tmp_path / "store"
    listed = _image_files(dump)
    distinct = {hashlib.sha256(p.read_bytes()).hexdigest() for p in listed}
    first = batch_score(spark, str(dump), str(model_dir), str(store))
    again = batch_score(spark, str(dump), str(second), str(store))
    assert first["scored"] + first["quarantined"] == again["scored"] + again["quarantined"] == len(distinct)
    assert again["skipped_known"] == 0
    stored = _read_store(spark, store)
    assert Counter(stored["model_version"]) == {card["model_version"]: first["scored"],
                                                card["model_version"] + "-v2": again["scored"]}
    third = batch_score(spark, str(dump), str(model_dir), str(store))  # the first version has seen them all
    assert (third["scored"], third["quarantined"], third["skipped_known"]) == (0, 0, len(listed))


def test_ingest_and_batch_score_take_the_same_files_in_any_case_and_name_a_dicom_alike(spark, config, model,
                                                                                      tmp_path):
    from cxr_spark.stages.ingest.job import ingest

    model_dir, _ = model
    folder = tmp_path / "mixed"
    _write_images(folder, ["x.Png", "z.JPG"], seed=3)
    film = np.random.default_rng(4).integers(0, 256, (64, 64)).astype(np.uint8)
    (folder / "MRN123").mkdir()
    (folder / "MRN123" / "y.DICOM").write_bytes(dicom_bytes(film, PatientName="Doe^Jane"))
    (folder / "notes.txt").write_text("not an image\n")
    counts = ingest(spark, str(folder), str(tmp_path / "raw"), settings=config.ingest)
    assert (counts["files_listed"], counts["ingested"], counts["formats"]) == (3, 3, {"png": 1, "jpeg": 1, "dicom": 1})
    summary = batch_score(spark, str(folder), str(model_dir), str(tmp_path / "store"))
    assert (summary["files_listed"], summary["scored"]) == (3, 3)
    raw = {(row.image_id, row.source_path) for row in spark.read.parquet(str(tmp_path / "raw")).collect()}
    store = {(row.image_id, row.source_path) for row in spark.read.parquet(str(tmp_path / "store")).collect()}
    ids = {image_id for image_id, _ in raw}
    assert ids == {image_id for image_id, _ in store}  # one image id per file in both datasets
    (dicom_id,) = [image_id for image_id in ids if image_id.endswith(".dcm")]
    assert "x.Png" in ids and "z.JPG" in ids and "MRN123" not in dicom_id and "y" not in dicom_id
    assert ({path for image_id, path in raw if image_id == dicom_id} == {path for image_id, path in store
                                                                        if image_id == dicom_id} == {f"dicom:{dicom_id}"})
