"""Generic dumps on local Spark: PNG + JPEG + DICOM without metadata, DICOM privacy, append-new, a run
killed mid-write, and the Kaggle pneumonia folder layout."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from conftest import ROOT, read_rows
from films import dicom_bytes
from PIL import Image

from cxr_spark.core.image_codec import decode_grayscale
from cxr_spark.core.labels import LABELS
from cxr_spark.stages.ingest.job import ingest

IDENTIFYING = ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
               "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "PatientBirthDate",
               "InstitutionName", "AccessionNumber", "ReferringPhysicianName")


def _identifying_values(data: bytes) -> set[str]:
    """The identifying attribute values (non-empty) of a DICOM file, read with pydicom."""
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
    values = {str(ds.get(keyword, "")).strip() for keyword in IDENTIFYING}
    values.add(str(ds.file_meta.get("MediaStorageSOPInstanceUID", "")).strip())
    return {value for value in values if len(value) >= 6}  # shorter strings match by chance


def _all_cells(path: Path):
    """Every value of every Parquet file under ``path`` (binary cells as bytes, the rest as text)."""
    for file in path.rglob("*.parquet"):
        for column in pq.read_table(file).to_pydict().values():
            yield from column


def test_generic_dump_of_png_jpeg_and_dicom_keeps_no_identifying_dicom_data(spark, tmp_path, config, sample_films):
    dump = tmp_path / "generic"
    (dump / "by_patient" / "DOE_JANE").mkdir(parents=True)
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(dump / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(dump / "b.jpeg", "JPEG")
    sample = next(sample_films.glob("rsna_*.dcm"))
    (dump / sample.name).write_bytes(sample.read_bytes())  # its name holds the SOPInstanceUID
    synthetic = dicom_bytes(rng.integers(0, 4096, (24, 20)).astype(np.uint16), BitsStored=12, HighBit=11,
                             PhotometricInterpretation="MONOCHROME1", PatientName="DOE^JANE",
                             PatientID="PID-0042-XYZ", InstitutionName="Saint Example Hospital",
                             StudyDate="20200315", StudyInstanceUID="1.2.3.4.5.6.7.8.9", PatientAge="045Y",
                             PatientSex="F", ViewPosition="AP")
    (dump / "by_patient" / "DOE_JANE" / "IM0001.dcm").write_bytes(synthetic)
    dicoms = {"sample": sample.read_bytes(), "synthetic": synthetic}

    raw = tmp_path / "raw"
    counts = ingest(spark, str(dump), str(raw), None, None, config.ingest)
    assert counts["files_listed"] == 4 == counts["ingested"] and counts["quarantined"] == 0
    assert counts["splits"] == {"unlabeled": 4} and counts["formats"] == {"png": 1, "jpeg": 1, "dicom": 2}

    rows = read_rows(raw, ["image_id", "png", "view", "sex", "age", "source_path", "split", "width", "height"])
    dicom_rows = sorted((r for r in rows if r.image_id.endswith(".dcm")), key=lambda r: r.width)
    assert len(dicom_rows) == 2
    small, large = dicom_rows  # 20 x 24 synthetic, 1024 x 1024 sample
    for row, data in ((small, synthetic), (large, sample.read_bytes())):
        stored = bytes(row.png)
        assert stored[:8] == b"\x89PNG\r\n\x1a\n"  # re-encoded as PNG: no DICOM header survives
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored))), decode_grayscale(data))
        assert "dicom" in row.source_path and row.image_id not in ("IM0001.dcm", sample.name)
    assert (small.view, small.sex, small.age, small.width, small.height) == ("AP", "F", 45, 20, 24)
    assert (large.view, large.sex, large.age) == ("PA", "M", 62)
    others = {r.image_id: bytes(r.png) for r in rows if not r.image_id.endswith(".dcm")}
    assert others == {"a.png": (dump / "a.png").read_bytes(), "b.jpeg": (dump / "b.jpeg").read_bytes()}

    from cxr_spark.config import override
    from cxr_spark.stages.preprocess import preprocess

    images_settings = override(config.preprocess, size=16, min_files_per_split=1)
    counts = preprocess(spark, str(raw), str(tmp_path / "images_16"), images_settings)  # rows without a patient id go on
    assert counts["images"] == 4 and counts["splits"] == {"unlabeled": 4}

    # One pass: its tasks write the PNG's and the JPEG's images rows themselves (files named by pass 1's
    # tasks); the DICOM rows, whose ids come from their content, are written by Spark. The same dataset.
    from pyspark.sql import functions as F

    one_pass = tmp_path / "images_16_one_pass"
    counts = ingest(spark, str(dump), str(tmp_path / "raw_one_pass"), None, None, config.ingest,
                    images_out=str(one_pass), images_settings=images_settings)
    one, two = spark.read.parquet(str(one_pass)), spark.read.parquet(str(tmp_path / "images_16"))
    assert counts["images"]["images"] == 4 and one.exceptAll(two).count() == 0 == two.exceptAll(one).count()
    files = {row.image_id: row.file.rsplit("/", 1)[1]
             for row in one.select("image_id", F.input_file_name().alias("file")).collect()}
    by_pass_one = {name for name, file in files.items() if re.fullmatch(r"part-\d{5}-[0-9a-f]{8}\.parquet", file)}
    assert by_pass_one == {"a.png", "b.jpeg"}
    assert counts["images"]["files_per_split"] == {"unlabeled": len(set(files.values()))}

    secrets = set().union(*(_identifying_values(data) for data in dicoms.values())) | {"DOE_JANE", "IM0001"}
    assert {"DOE^JANE", "PID-0042-XYZ", "Saint Example Hospital", "20200315"} <= secrets
    for written in (raw, one_pass):
        for path in written.rglob("*"):  # every byte of every file written, compressed or not
            if path.is_file():
                content = path.read_bytes()
                assert not [s for s in secrets if s.encode() in content], path
        for cell in _all_cells(written):  # and every decoded Parquet value
            text = cell.decode("latin-1") if isinstance(cell, bytes) else str(cell)
            assert not [s for s in secrets if s in text]


def test_a_dicom_named_like_a_png_does_not_keep_the_png_of_that_name_out_of_raw(spark, tmp_path, config):
    """Pass 1 writes into raw what the paths, metadata and existing ids let in, and the decisions after it
    (which know each file's content) check that choice; pass 2 copies what pass 1 held back. A DICOM file
    named x.png gets its content hash as id, yet by name it comes first, so pass 1 holds back the real
    x.png at a later path as a repeated id: pass 2 must still copy it."""
    import hashlib

    dump, raw = tmp_path / "dump", tmp_path / "raw"
    (dump / "a").mkdir(parents=True)
    (dump / "b").mkdir()
    rng = np.random.default_rng(6)
    dicom = dicom_bytes(rng.integers(0, 256, (24, 20)).astype(np.uint8))
    (dump / "a" / "x.png").write_bytes(dicom)
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(dump / "b" / "x.png")

    counts = ingest(spark, str(dump), str(raw), None, None, config.ingest)
    assert counts["files_listed"] == 2 == counts["ingested"] and counts["quarantined"] == 0
    assert counts["formats"] == {"png": 1, "jpeg": 0, "dicom": 1}
    stored = {row.image_id: bytes(row.png) for row in read_rows(raw, ["image_id", "png"])}
    assert stored.pop("x.png") == (dump / "b" / "x.png").read_bytes()
    assert list(stored) == [hashlib.sha256(dicom).hexdigest()[:32] + ".dcm"]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored.popitem()[1]))), decode_grayscale(dicom))


def _write_pngs(folder: Path, names, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / name)


def test_file_names_with_spaces_and_url_characters_are_each_read_once(spark, tmp_path, config):
    """A file name is not a URL: spaces, '#', '%20' and non-ASCII letters name exactly one file each
    (pass 1 reads the file itself; the file index, which spells paths as URIs, finds the empty one)."""
    names = ["a b.png", "c%20d.png", "e#f.png", "\u00fc.png"]
    dump = tmp_path / "dump" / "my folder"
    _write_pngs(dump, names, seed=4)
    (dump / "empty file.png").write_bytes(b"")
    counts = ingest(spark, str(tmp_path / "dump"), str(tmp_path / "raw"), None, None, config.ingest)
    assert counts["files_listed"] == 5 and counts["ingested"] == 4 and counts["quarantine_reasons"] == {"empty_file": 1}
    rows = spark.read.parquet(str(tmp_path / "raw")).select("image_id", "png").collect()
    assert {row.image_id: bytes(row.png) for row in rows} == {name: (dump / name).read_bytes() for name in names}


def _same_rows(spark, one: Path, two: Path) -> bool:
    first, second = spark.read.parquet(str(one)), spark.read.parquet(str(two))
    return (first.columns == second.columns and first.count() == second.count()
            and first.exceptAll(second).count() == 0 and second.exceptAll(first).count() == 0)


def test_python_workers_and_spark_write_the_same_raw_dataset(spark, tmp_path, config):
    """Pass 2 two ways: the Python workers write raw's files (local paths, the default) or Spark's binaryFile
    source and Parquet writer do (HDFS, S3, ``worker_file_io = false``). Both store the same rows and bytes,
    also when append-new adds to a dataset the other way wrote."""
    from cxr_spark.config import override

    dump = tmp_path / "dump"
    _write_pngs(dump, ["a.png", "b.png", "c.png"], seed=1)
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16), dtype=np.uint8)).save(dump / "d.jpeg")
    dicom = dicom_bytes(np.random.default_rng(3).integers(0, 4096, (12, 10)).astype(np.uint16), BitsStored=12,
                         HighBit=11, PatientName="DOE^JANE", PatientSex="F", ViewPosition="AP")
    (dump / "IM0001.dcm").write_bytes(dicom)
    in_spark = override(config.ingest, worker_file_io=False)
    in_workers = override(config.ingest, worker_file_io=True, row_group_size_mb=1)  # row groups of ~1 MB
    by_workers, by_spark = tmp_path / "raw_workers", tmp_path / "raw_spark"
    counts = ingest(spark, str(dump), str(by_workers), None, None, in_workers)
    assert counts == ingest(spark, str(dump), str(by_spark), None, None, in_spark)
    assert counts["ingested"] == 5 and counts["formats"] == {"png": 3, "jpeg": 1, "dicom": 1}
    assert _same_rows(spark, by_workers, by_spark)
    assert not [name for name in os.listdir(by_workers) if name.startswith(".part-")]  # no attempt left behind

    rng = np.random.default_rng(4)
    for i in range(40):  # 90 KB each (noise does not compress): 3.6 MB in 2 tasks, so 1 MB row groups split
        Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8)).save(dump / f"new_{i:02d}.png")
    added = ingest(spark, str(dump), str(by_spark), None, None, in_workers, mode="append-new")
    assert added == ingest(spark, str(dump), str(by_workers), None, None, in_spark, mode="append-new")
    assert added["ingested"] == 40 and added["skipped_existing"] == 5 and added["rows"] == 45
    assert _same_rows(spark, by_workers, by_spark)
    stored = {row.image_id: bytes(row.png) for row in read_rows(by_spark, ["image_id", "png"])}
    assert {name: stored[name] for name in stored if not name.endswith(".dcm")} == {
        path.name: path.read_bytes() for path in dump.iterdir() if path.suffix != ".dcm"}
    workers_files = [pq.ParquetFile(path).metadata for path in by_spark.glob("part-*.parquet")
                     if not path.name.endswith("-c000.parquet")]  # Spark names its files part-<n>-<uuid>-c000
    assert workers_files and max(meta.num_row_groups for meta in workers_files) > 1


def _content_hashes(spark, raw: Path) -> list[tuple[str, str]]:
    return sorted(tuple(r) for r in spark.read.parquet(str(raw)).select("image_id", "content_sha256").collect())


def test_append_new_adds_only_new_files_and_twice_adds_nothing(spark, tmp_path, config):
    import hashlib

    dump, raw = tmp_path / "dump", tmp_path / "raw"
    first = [f"img_{i:03d}.png" for i in range(12)]
    _write_pngs(dump, first, seed=1)
    base = ingest(spark, str(dump), str(raw), None, None, config.ingest)
    assert base["ingested"] == 12
    _write_pngs(dump, [f"new_{i}.png" for i in range(5)], seed=2)
    (dump / "img_000.png").write_bytes((dump / "img_000.png").read_bytes())  # unchanged content: skipped
    _write_pngs(tmp_path / "changed", ["img_001.png"], seed=3)  # same id, other content: a clash
    (dump / "img_001.png").write_bytes((tmp_path / "changed" / "img_001.png").read_bytes())
    before = dict(_content_hashes(spark, raw))

    added = ingest(spark, str(dump), str(raw), None, None, config.ingest, mode="append-new")
    files = sorted(dump.iterdir())
    assert added["files_listed"] == len(files) == 17
    assert added["ingested"] == 5 and added["skipped_existing"] == 11 and added["quarantined"] == 1
    assert added["files_listed"] == added["ingested"] + added["skipped_existing"] + added["quarantined"]
    assert added["quarantine_reasons"] == {"duplicate_image_id": 1} and added["rows"] == 17
    after = dict(_content_hashes(spark, raw))
    expected_new = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.name.startswith("new_")}
    assert after == {**before, **expected_new}  # old rows kept exactly, the new five added

    again = ingest(spark, str(dump), str(raw), None, None, config.ingest, mode="append-new")
    assert again["ingested"] == 0 and again["skipped_existing"] == 16 and again["rows"] == 17
    assert dict(_content_hashes(spark, raw)) == after


def test_append_new_with_images_out_keeps_images_in_step_with_raw(spark, tmp_path, config):
    """Daily dumps in one pass: each append-new run adds the new files to raw and to images_<size>, which
    then equals preprocess of the whole raw dataset; an images dataset made from another raw is refused."""
    import pytest

    from cxr_spark.config import override
    from cxr_spark.stages.preprocess import preprocess

    dump, raw, images = tmp_path / "dump", tmp_path / "raw", tmp_path / "images_8"
    images_settings = override(config.preprocess, size=8, min_files_per_split=1)

    def append(out=raw):
        return ingest(spark, str(dump), str(out), None, None, config.ingest, mode="append-new",
                      images_out=str(images), images_settings=images_settings)

    _write_pngs(dump, [f"img_{i:03d}.png" for i in range(6)], seed=1)
    first = append()  # no raw dataset yet: everything is new
    assert first["ingested"] == 6 and first["images"]["images"] == 6
    _write_pngs(dump, [f"new_{i}.png" for i in range(3)], seed=2)
    added = append()
    assert added["ingested"] == 3 and added["skipped_existing"] == 6 and added["rows"] == 9
    assert added["images"]["raw_rows"] == added["images"]["images"] == 9
    expected = preprocess(spark, str(raw), str(tmp_path / "expected"), images_settings)
    one, two = spark.read.parquet(str(images)), spark.read.parquet(str(tmp_path / "expected"))
    assert expected["images"] == 9 and one.exceptAll(two).count() == 0 and two.exceptAll(one).count() == 0
    again = append()
    assert again["ingested"] == 0 and again["images"]["images"] == 9
    assert {row.image_id for row in read_rows(images, ["image_id"])} == {p.name for p in dump.iterdir()}

    ingest(spark, str(dump), str(tmp_path / "other_raw"), None, None, config.ingest)
    manifest = (images / "_manifest.json").read_text()
    with pytest.raises(ValueError, match="not made from the raw dataset"):
        append(tmp_path / "other_raw")
    assert (images / "_manifest.json").read_text() == manifest  # refused before anything was written


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")


def test_killed_ingest_leaves_the_previous_dataset_unchanged(spark, tiny_dump, tmp_path, config):
    raw = tmp_path / "raw"
    previous = ingest(spark, str(tiny_dump), str(raw), str(tiny_dump / "Data_Entry_2017.csv"), str(tiny_dump),
                      config.ingest)
    before = _content_hashes(spark, raw)
    manifest_before = (raw / "_manifest.json").read_text()
    conf = tmp_path / "test.conf"
    conf.write_text((ROOT / "conf" / "spark" / "local.conf").read_text()
                    + "\nspark.ui.enabled false\nspark.ui.showConsoleProgress false\n")
    command = [sys.executable, "-m", "cxr_spark.cli", "ingest", "--images", str(tiny_dump), "--metadata",
               str(tiny_dump / "Data_Entry_2017.csv"), "--out", str(raw), "--spark-conf", str(conf)]
    # its own process group, so the kill reaches the driver's JVM as well, and nothing else
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "PYSPARK_PYTHON": sys.executable})
    try:
        hidden = _wait_for(lambda: [p for p in tmp_path.iterdir() if p.name.startswith(".raw.tmp-")], 300,
                           "the hidden temporary output")
        _wait_for(lambda: any(hidden[0].rglob("*")), 120, "the first file in the temporary output")
        os.killpg(process.pid, signal.SIGKILL)
        assert process.wait(60) == -signal.SIGKILL  # killed mid-run, not finished
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert _content_hashes(spark, raw) == before and len(before) == previous["ingested"]
    assert (raw / "_manifest.json").read_text() == manifest_before
    visible = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert sorted(visible) == ["logs", "raw", "test.conf"]  # nothing half-written under a real name
    assert [p.name[:7] for p in (tmp_path / "logs").iterdir()] == ["ingest-"]  # the killed run's log
    assert len(read_rows(raw, ["image_id"])) == previous["ingested"]  # still a readable Petastorm dataset


def test_kaggle_pneumonia_layout_labels_and_splits_from_folders(spark, tmp_path, config):
    dump = tmp_path / "chest_xray"
    rng = np.random.default_rng(9)
    expected = {}
    for split, n_normal, n_pneumonia in (("train", 4, 6), ("val", 1, 2), ("test", 2, 3)):
        for label, n in (("NORMAL", n_normal), ("PNEUMONIA", n_pneumonia)):
            folder = dump / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                name = f"person{i}_{label.lower()}.jpeg"  # the same names recur across splits
                Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)).save(folder / name, "JPEG")
                expected[f"{split}/{label}/{name}"] = (split, label == "PNEUMONIA")
    counts = ingest(spark, str(dump), str(tmp_path / "raw"), None, None, config.ingest)
    assert counts["files_listed"] == len(expected) == counts["ingested"] and counts["quarantined"] == 0
    rows = read_rows(tmp_path / "raw", ["image_id", "split", "labels", "finding_labels"])
    assert {r.image_id: (r.split, bool(r.labels[LABELS.index("Pneumonia")])) for r in rows} == expected
    assert all(r.labels.sum() == int(expected[r.image_id][1]) for r in rows)
    splits = {}
    for split, _ in expected.values():
        splits[split] = splits.get(split, 0) + 1
    assert counts["splits"] == splits
    manifest = json.loads((tmp_path / "raw" / "_manifest.json").read_text())
    assert manifest["task"] == "binary" and manifest["binary_label"] == "Pneumonia" and manifest["layout"] == "kaggle"


def _row_groups(dataset: Path) -> dict[str, list[list[str]]]:
    """Each Parquet file of a dataset (by its path less the run's id) as its row groups' image ids, in order."""
    found = {}
    for path in sorted(dataset.rglob("*.parquet")):
        relative = re.sub(r"-[0-9a-f]{8}(\.c000)?\.parquet$", "", str(path.relative_to(dataset)))
        if path.parent.name.startswith("_"):
            continue
        parquet = pq.ParquetFile(path)
        found[relative] = [parquet.read_row_group(i, columns=["image_id"]).column("image_id").to_pylist()
                           for i in range(parquet.num_row_groups)]
    return found


def test_the_same_dump_mounted_elsewhere_gives_the_same_files_and_row_groups(spark, tiny_dump, tmp_path, config):
    """What each Horovod rank trains on is the dataset's files and row groups (Petastorm shards by row group
    in path order), so they must not depend on where the dump is or on the order Spark's tasks finish."""
    import shutil

    from cxr_spark.config import override

    layouts = []
    for name in ("first", "second"):
        dump = tmp_path / name / "mounted" / "dump"
        shutil.copytree(tiny_dump, dump)
        ingest(spark, str(dump), str(tmp_path / name / "raw"), str(dump / "Data_Entry_2017.csv"), str(dump),
               config.ingest, images_out=str(tmp_path / name / "images_32"),
               images_settings=override(config.preprocess, size=32, min_files_per_split=4))
        layouts.append({dataset: _row_groups(tmp_path / name / dataset) for dataset in ("raw", "images_32")})
    assert layouts[0] == layouts[1]
    assert len(layouts[0]["images_32"]) >= 4 and sum(len(ids) for groups in layouts[0]["images_32"].values()
                                                     for ids in groups) == len(list(tiny_dump.rglob("*.png")))
