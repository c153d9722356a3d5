"""Ingest and preprocess on real local Spark: counts, labels, splits, quarantine, atomic replacement."""
from __future__ import annotations

import csv
import gzip
import json
import shutil
from collections import Counter

import numpy as np
import pytest
from conftest import read_rows

from cxr_spark.core.labels import parse_finding_labels
from cxr_spark.datasets.quarantine import QUARANTINE_DIR, QUARANTINE_SCHEMA
from cxr_spark.io.commit import atomic_output
from cxr_spark.stages.ingest.job import ingest


def _csv_rows(path):
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return {row[0]: row for row in rows}


def test_ingest_counts_reconcile_and_labels_match_the_csv(tiny_raw, tiny_dump):
    raw, counts = tiny_raw
    csv_rows = _csv_rows(tiny_dump / "Data_Entry_2017.csv")
    assert counts["files_listed"] == len(list(tiny_dump.rglob("*.png"))) == len(csv_rows)
    assert counts["files_listed"] == counts["ingested"] + counts["quarantined"]
    assert counts["metadata_rows"] == counts["metadata_matched"] + counts["metadata_quarantined"]
    rows = read_rows(raw, ["image_id", "labels", "patient_id", "png", "content_sha256", "height", "width"])
    assert len(rows) == counts["ingested"] == len(csv_rows)
    png_files = {p.name: p for p in tiny_dump.rglob("*.png")}
    for row in rows:
        assert np.array_equal(row.labels, parse_finding_labels(csv_rows[row.image_id][1]))
        assert row.patient_id == int(csv_rows[row.image_id][3])
        assert bytes(row.png) == png_files[row.image_id].read_bytes()  # original bytes, not re-encoded
        assert (row.height, row.width) == (128, 128)


def test_official_test_list_is_honoured_and_no_patient_spans_splits(spark, tiny_raw, tiny_dump):
    raw, counts = tiny_raw
    frame = spark.read.parquet(str(raw)).select("image_id", "patient_id", "split").toPandas()
    test_list = set((tiny_dump / "test_list.txt").read_text().split())
    assert set(frame.loc[frame["split"] == "test", "image_id"]) == test_list
    assert frame.groupby("patient_id")["split"].nunique().max() == 1
    assert set(frame["split"]) == {"train", "val", "test"}
    assert counts["splits"] == frame["split"].value_counts().to_dict()


def test_bad_files_are_quarantined_with_reasons(spark, tiny_dump, tmp_path, config):
    dump = tmp_path / "dump"
    shutil.copytree(tiny_dump, dump)
    folder = dump / "images_001" / "images"
    good = sorted(folder.glob("*.png"))
    good[0].write_bytes(b"")  # zero bytes
    good[1].write_text("this is not an image")
    (folder / "99999999_000.png").write_bytes(good[2].read_bytes())  # no metadata row
    (dump / "images_002" / "images").mkdir(parents=True)
    shutil.copy(good[3], dump / "images_002" / "images" / good[3].name)  # duplicate image id
    good[4].unlink()  # a metadata row with no image
    counts = ingest(spark, str(dump), str(tmp_path / "raw"), str(dump / "Data_Entry_2017.csv"), str(dump),
                    config.ingest)
    quarantine = spark.read.schema(QUARANTINE_SCHEMA).parquet(str(tmp_path / "raw" / QUARANTINE_DIR)).toPandas()
    reasons = dict(zip(quarantine["image_id"], quarantine["reason"]))
    assert reasons[good[0].name] == "empty_file" and reasons[good[1].name] == "not_an_image"
    assert reasons["99999999_000.png"] == "no_metadata" and reasons[good[4].name] == "no_image"
    assert reasons[good[3].name] == "duplicate_image_id"
    n_files = len(list(dump.rglob("*.png")))
    assert counts["files_listed"] == n_files == counts["ingested"] + counts["quarantined"]
    assert counts["quarantined"] == 4 and counts["metadata_quarantined"] == 1
    assert counts["metadata_rows"] == counts["metadata_matched"] + counts["metadata_quarantined"]


def test_undecodable_pngs_are_quarantined_by_ingest_or_preprocess_and_nothing_is_lost(spark, tiny_dump, tmp_path,
                                                                                       config):
    """Ingest checks a PNG's header and end; preprocess, which decodes it, quarantines what does not decode."""
    from cxr_spark.config import override
    from cxr_spark.stages.preprocess import preprocess

    dump, good, truncated, damaged = _dump_with_undecodable_pngs(tiny_dump, tmp_path)
    raw, images = tmp_path / "raw", tmp_path / "images"
    counts = ingest(spark, str(dump), str(raw), str(dump / "Data_Entry_2017.csv"), str(dump), config.ingest)
    quarantine = spark.read.schema(QUARANTINE_SCHEMA).parquet(str(raw / QUARANTINE_DIR)).toPandas()
    assert quarantine.set_index("image_id").loc[truncated.name, "reason"] == "corrupt_image"
    assert "IEND" in quarantine.set_index("image_id").loc[truncated.name, "detail"]
    assert counts["quarantine_reasons"] == {"corrupt_image": 1}
    assert counts["files_listed"] == len(good) == counts["ingested"] + counts["quarantined"]

    done = preprocess(spark, str(raw), str(images), override(config.preprocess, size=32, min_files_per_split=1))
    later = spark.read.schema(QUARANTINE_SCHEMA).parquet(str(images / QUARANTINE_DIR)).toPandas()
    assert later[["image_id", "reason", "kind"]].values.tolist() == [[damaged.name, "corrupt_image", "file"]]
    assert later["source_path"].iloc[0].endswith(damaged.name)
    assert done["quarantine_reasons"] == {"corrupt_image": 1} and done["quarantined"] == 1
    assert done["raw_rows"] == counts["ingested"] == done["images"] + done["quarantined"]
    stored = {row.image_id for row in read_rows(images, ["image_id"])}
    assert stored == {path.name for path in good} - {truncated.name, damaged.name}
    # image bytes are PNG already: stored without Parquet compression and without a dictionary
    for folder, column in ((raw, "png"), (images, "image")):
        for chunk in _column_chunks(folder, column):
            assert chunk.compression == "UNCOMPRESSED" and not any("DICTIONARY" in e for e in chunk.encodings)


def _dump_with_undecodable_pngs(tiny_dump, tmp_path):
    """A copy of the tiny dump with one PNG cut short (no IEND chunk) and one of the same length whose
    compressed pixels are damaged; returns the dump, its PNGs and those two."""
    dump = tmp_path / "dump"
    shutil.copytree(tiny_dump, dump)
    good = sorted((dump / "images_001" / "images").glob("*.png"))
    truncated, damaged = good[0], good[1]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    data = bytearray(damaged.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    damaged.write_bytes(bytes(data))
    return dump, good, truncated, damaged


def test_one_pass_writes_what_preprocess_writes_and_quarantines_undecodable_pngs_at_ingest(spark, tiny_dump,
                                                                                          tmp_path, config):
    """ingest --images-out: images_<size> from the same pass over the files, equal to preprocess of raw."""
    from cxr_spark.config import override
    from cxr_spark.stages.preprocess import preprocess

    dump, good, truncated, damaged = _dump_with_undecodable_pngs(tiny_dump, tmp_path)
    raw, one_pass, two_stage = tmp_path / "raw", tmp_path / "images_one_pass", tmp_path / "images_two_stage"
    # min_files_per_split=3: pass 1 runs as 3 tasks (1 per core is 2 here), each writing one raw file and one
    # images file per split it has rows of
    images_settings = override(config.preprocess, size=32, min_files_per_split=3)
    counts = ingest(spark, str(dump), str(raw), str(dump / "Data_Entry_2017.csv"), str(dump), config.ingest,
                    images_out=str(one_pass), images_settings=images_settings)
    assert len(list(raw.glob("part-*.parquet"))) == 3
    on_disk = {folder.name.split("=")[1]: len(list(folder.glob("*.parquet"))) for folder in one_pass.glob("split=*")}
    assert counts["images"]["files_per_split"] == on_disk and max(on_disk.values()) == 3
    quarantine = spark.read.schema(QUARANTINE_SCHEMA).parquet(str(raw / QUARANTINE_DIR)).toPandas().set_index("image_id")
    assert quarantine.loc[[truncated.name, damaged.name], "reason"].tolist() == ["corrupt_image"] * 2
    assert "IEND" in quarantine.loc[truncated.name, "detail"] and "decode" in quarantine.loc[damaged.name, "detail"]
    assert counts["files_listed"] == len(good) == counts["ingested"] + counts["quarantined"]
    assert counts["quarantined"] == 2
    images = counts["images"]
    assert images["raw_rows"] == counts["ingested"] == images["images"] and images["quarantined"] == 0
    assert images["splits"] == counts["splits"]
    stored = {row.image_id for row in read_rows(one_pass, ["image_id"])}
    assert stored == {path.name for path in good} - {truncated.name, damaged.name}

    # the independent expectation: preprocess of the raw dataset this ingest wrote
    expected = preprocess(spark, str(raw), str(two_stage), images_settings)
    assert expected["images"] == images["images"]
    # equal statistics, summed in another order (raw's rows are not in the order of the files)
    one_stats, two_stats = images["normalization"], expected["normalization"]
    assert one_stats.keys() == two_stats.keys() and one_stats["n_images"] == two_stats["n_images"]
    assert (two_stats["mean"], two_stats["std"]) == pytest.approx((one_stats["mean"], one_stats["std"]), rel=1e-12)
    one, two = spark.read.parquet(str(one_pass)), spark.read.parquet(str(two_stage))
    assert one.columns == two.columns
    assert one.exceptAll(two).count() == 0 and two.exceptAll(one).count() == 0  # same rows, same image bytes
    manifest = json.loads((one_pass / "_manifest.json").read_text())
    assert manifest["inputs"]["raw"]["url"] == f"file://{raw}" and manifest["written_by"] == "ingest --images-out"
    assert json.loads((one_pass / "_normalization.json").read_text()) == images["normalization"]
    for chunk in _column_chunks(one_pass, "image"):
        assert chunk.compression == "UNCOMPRESSED" and not any("DICTIONARY" in e for e in chunk.encodings)


def _column_chunks(folder, column):
    import pyarrow.parquet as pq

    files = sorted(path for path in folder.rglob("*.parquet") if "_quarantine" not in path.parts)
    assert files
    for path in files:
        metadata = pq.ParquetFile(path).metadata
        index = metadata.schema.names.index(column)
        for group in range(metadata.num_row_groups):
            yield metadata.row_group(group).column(index)


def test_real_samples_get_the_labels_the_real_csv_states(spark, shared_data, tmp_path, config):
    """The real v2020 metadata (bracketed header names with commas) and the real BBox_List_2017."""
    images = tmp_path / "samples"
    images.mkdir()
    for name in ("00000001_000.png", "00027426_000.png"):
        shutil.copy(shared_data / "samples" / name, images / name)
    metadata = shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz"
    bbox = shared_data / "nih" / "BBox_List_2017.csv.gz"
    counts = ingest(spark, str(images), str(tmp_path / "raw"), str(metadata), None, config.ingest, bbox=str(bbox))
    with gzip.open(metadata, "rt", newline="") as handle:  # the csv module's reading of the same file
        plain = {row[0]: row for row in list(csv.reader(handle))[1:]}
    assert counts["ingested"] == 2 and counts["metadata_rows"] == len(plain) == 112_120
    assert counts["metadata_matched"] == 2 and counts["metadata_quarantined"] == 112_118
    rows = {r.image_id: r for r in read_rows(tmp_path / "raw", ["image_id", "labels", "finding_labels", "height",
                                                                 "age", "sex", "view", "follow_up"])}
    assert rows["00000001_000.png"].finding_labels == "Cardiomegaly"
    assert np.flatnonzero(rows["00000001_000.png"].labels).tolist() == [1]  # Cardiomegaly is index 1
    assert rows["00027426_000.png"].labels.sum() == 0 and rows["00027426_000.png"].height == 512
    for image_id, row in rows.items():
        assert (row.age, row.sex, row.view, row.follow_up) == (int(plain[image_id][4]), plain[image_id][5],
                                                               plain[image_id][6], int(plain[image_id][2]))
    with gzip.open(bbox, "rt", newline="") as handle:
        expected = [row[:6] for row in list(csv.reader(handle))[1:]]
    boxes = spark.read.parquet(str(tmp_path / "raw" / "_bbox")).toPandas()
    assert counts["bbox_rows"] == counts["bbox_written"] == len(boxes) == len(expected) == 984
    canonical = Counter("Infiltration" if row[1] == "Infiltrate" else row[1] for row in expected)
    assert Counter(boxes["finding"]) == canonical and "Infiltrate" not in set(boxes["finding"])
    first = boxes[boxes["image_id"] == expected[0][0]].iloc[0]
    assert [first.x, first.y, first.w, first.h] == pytest.approx([float(v) for v in expected[0][2:6]])


def test_failed_run_leaves_previous_output_untouched(spark, tmp_path):
    target = tmp_path / "dataset"
    target.mkdir()
    (target / "part-0.txt").write_text("previous good output")
    (target / "_manifest.json").write_text('{"stage": "score"}')
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_output(spark, str(target), "score") as tmp:
            spark.range(10).write.parquet(tmp)
            raise RuntimeError("killed mid-write")
    assert (target / "part-0.txt").read_text() == "previous good output"
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]  # no temporary output or lock left behind


def test_preprocess_stores_resized_images_and_exact_train_statistics(tiny_images, tiny_raw):
    images, counts = tiny_images
    _, raw_counts = tiny_raw
    assert counts["images"] == raw_counts["ingested"] and counts["splits"] == raw_counts["splits"]
    rows = read_rows(images, ["image", "split"])
    assert all(r.image.shape == (32, 32) and r.image.dtype == np.uint8 for r in rows)
    train = np.stack([r.image for r in rows if r.split == "train"]).astype(np.float64)
    assert counts["normalization"]["n_images"] == len(train)
    assert counts["normalization"]["mean"] == pytest.approx(train.mean(), rel=1e-6)
    assert counts["normalization"]["std"] == pytest.approx(train.std(), rel=1e-5)


def test_index_and_keep_keeps_a_files_own_bytes_only_when_the_plan_and_its_checks_allow(sample_films, tmp_path):
    """Pass 1's work on one file, as a task does it and as the benchmark times it in one process."""
    import hashlib

    import cv2
    import pyarrow.parquet as pq

    from cxr_spark.core.image_codec import decode_grayscale, resize_square
    from cxr_spark.datasets.fields import encode_column
    from cxr_spark.datasets.raw import RawSchema
    from cxr_spark.io.parquet_parts import ParquetPartWriter
    from cxr_spark.stages.ingest.pass1 import index_and_keep, raw_arrow_schema

    first, second = sorted(sample_films.glob("*.png"))
    dicom = next(sample_films.glob("*.dcm"))
    cut = tmp_path / "cut.png"
    cut.write_bytes(first.read_bytes()[:-4096])
    labels = encode_column(RawSchema, "labels", [np.zeros(14, np.uint8)])[0]

    def plan(path):  # the columns the plan gives a file it lets into raw
        return {"image_id": path.name, "patient_id": 7, "follow_up": 0, "age": 58, "sex": "M", "view": "PA",
                "finding_labels": "No Finding", "labels": labels, "split": "train", "source_path": str(path)}

    folder = tmp_path / "part"
    folder.mkdir()
    with ParquetPartWriter(str(folder), "part.parquet", raw_arrow_schema(), image_column="png",
                           row_group_bytes=2**20) as writer:
        results = {path.name: index_and_keep(writer, str(path), 224, columns) for path, columns in
                   ((first, plan(first)), (second, None), (cut, plan(cut)), (dicom, plan(dicom)))}

    assert {name: kept for name, (_, _, kept) in results.items()} == {
        first.name: True, second.name: False, cut.name: False, dicom.name: False}
    for path in (first, second):  # indexed either way: hash, length, the resized image
        row, length, _ = results[path.name]
        data = path.read_bytes()
        assert (row["content_sha256"], length, row["reason"]) == (hashlib.sha256(data).hexdigest(), len(data), None)
        stored = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(stored, resize_square(decode_grayscale(data), 224))
    assert results[cut.name][0]["reason"] == "corrupt_image"
    assert results[dicom.name][0]["format"] == "dicom"
    table = pq.read_table(folder / "part.parquet").to_pylist()
    assert [row["image_id"] for row in table] == [first.name]
    height, width = decode_grayscale(first.read_bytes()).shape
    assert table[0]["png"] == first.read_bytes()
    assert (table[0]["content_sha256"], table[0]["height"], table[0]["width"], table[0]["patient_id"]) == (
        hashlib.sha256(first.read_bytes()).hexdigest(), height, width, 7)


def test_pass_one_writes_the_images_row_of_a_file_it_keeps_beside_its_raw_row(sample_films, tmp_path):
    """With --images-out pass 1 writes a kept file's images_<size> row into its split's folder, while the raw
    writer beside it (the process's shared image buffer) goes on; other files keep their image in the index."""
    import cv2
    import pyarrow.parquet as pq

    from cxr_spark.core.image_codec import decode_grayscale, resize_square
    from cxr_spark.datasets.fields import encode_column
    from cxr_spark.datasets.raw import RawSchema
    from cxr_spark.io.parquet_parts import ParquetPartWriter, PartitionedPartWriter, parquet_parts
    from cxr_spark.stages.ingest.pass1 import images_part_schema, index_and_keep, raw_arrow_schema

    first, second = sorted(sample_films.glob("*.png"))
    dicom = next(sample_films.glob("*.dcm"))
    labels = encode_column(RawSchema, "labels", [np.eye(14, dtype=np.uint8)[3]])[0]

    def plan(path, split):
        return {"image_id": path.name, "patient_id": 9, "follow_up": 2, "age": 61, "sex": "F", "view": "AP",
                "finding_labels": "Effusion", "labels": labels, "split": split, "source_path": str(path)}

    raw, images = tmp_path / "raw", tmp_path / "images"
    raw.mkdir()
    with ParquetPartWriter(str(raw), "part.parquet", raw_arrow_schema(), image_column="png",
                           row_group_bytes=2**20) as writer, \
            PartitionedPartWriter(str(images), "part.parquet", images_part_schema(64), column="split",
                                  image_column="image", row_group_bytes=2**20) as image_writer:
        rows = {path.name: index_and_keep(writer, str(path), 64, plan(path, split), image_writer)[0]
                for path, split in ((first, "train"), (dicom, "train"), (second, "test"))}
        with pytest.raises(ValueError, match="partition value"):
            image_writer.add_image("../train", b"", {})

    assert [row["image_id"] for row in pq.read_table(raw / "part.parquet").to_pylist()] == [first.name, second.name]
    assert [bytes(row["png"]) for row in pq.read_table(raw / "part.parquet").to_pylist()] == [
        first.read_bytes(), second.read_bytes()]
    assert rows[first.name]["image"] is None and rows[second.name]["image"] is None  # in images_<size> instead
    assert rows[dicom.name]["image"] is not None  # DICOM is not kept by pass 1: its image stays in the index
    assert parquet_parts(str(images)) == [str(images / "split=test" / "part.parquet"),
                                          str(images / "split=train" / "part.parquet")]
    for path, split in ((first, "train"), (second, "test")):
        table = pq.read_table(images / f"split={split}" / "part.parquet")
        assert table.schema.names == images_part_schema(64).names  # the image column is not last
        (row,) = table.to_pylist()
        expected = resize_square(decode_grayscale(path.read_bytes()), 64)
        np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_UNCHANGED),
                                      expected)
        assert (row["pixel_mean"], row["pixel_std"]) == pytest.approx((expected.mean(), expected.std()), rel=1e-6)
        assert (row["image_id"], row["age"], row["sex"], row["labels"], row["height"]) == (
            path.name, 61, "F", labels, decode_grayscale(path.read_bytes()).shape[0])

    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError):
        with PartitionedPartWriter(str(failed), "part.parquet", images_part_schema(64), column="split",
                                   image_column="image", row_group_bytes=1) as image_writer:
            image_writer.add_image("val", first.read_bytes(), {**plan(first, "val"), "pixel_mean": 1.0, "pixel_std": 1.0,
                                                          "height": 1, "width": 1, "content_sha256": "0"})
            raise RuntimeError("the task fails after its first row group was written")
    assert (failed / "split=val").is_dir() and parquet_parts(str(failed)) == []  # nothing a reader would see


def test_pass_one_decodes_a_dicom_once_and_stores_the_pixels_decode_resized_gives(sample_films, monkeypatch):
    import cv2

    from cxr_spark.core import image_codec as images_module
    from cxr_spark.core.image_codec import decode_dicom, decode_resized
    from cxr_spark.stages.ingest import files as ingest_module

    data = next(sample_films.glob("*.dcm")).read_bytes()
    expected = decode_resized(data, 224)
    decodes = []
    for module in (ingest_module, images_module):  # every way pass 1 can reach the decoder
        monkeypatch.setattr(module, "decode_dicom", lambda d: decodes.append(len(d)) or decode_dicom(d))
    row = ingest_module.index_file(data, 224)
    assert (row["reason"], row["format"], decodes) == (None, "dicom", [len(data)])
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_UNCHANGED), expected)
    assert (row["pixel_mean"], row["pixel_std"]) == pytest.approx((expected.mean(), expected.std()), rel=1e-5)


def test_a_failed_petastorm_write_gives_the_session_back_its_hadoop_settings(spark, tmp_path):
    from petastorm.etl.dataset_metadata import materialize_dataset

    from cxr_spark.datasets.fields import PETASTORM_HADOOP_KEYS, petastorm_dataset
    from cxr_spark.datasets.raw import RawSchema

    conf = spark.sparkContext._jsc.hadoopConfiguration()
    original = {key: conf.get(key) for key in PETASTORM_HADOOP_KEYS}

    def restore(values):
        for key, value in values.items():
            conf.unset(key) if value is None else conf.set(key, value)

    try:
        conf.set("parquet.block.size", "12345")
        before = {key: conf.get(key) for key in PETASTORM_HADOOP_KEYS}
        with pytest.raises(RuntimeError, match="write failed"):
            with materialize_dataset(spark, f"file://{tmp_path}/upstream", RawSchema, 3):
                raise RuntimeError("write failed")
        assert conf.get("parquet.block.size") == str(3 * 2**20)  # petastorm 0.13.1 leaves its row-group size set
        restore(before)
        with pytest.raises(RuntimeError, match="write failed"):
            with petastorm_dataset(spark, f"file://{tmp_path}/ours", RawSchema, 3):
                assert conf.get("parquet.block.size") == str(3 * 2**20)  # set while the dataset is written
                raise RuntimeError("write failed")
        assert {key: conf.get(key) for key in PETASTORM_HADOOP_KEYS} == before
    finally:
        restore(original)
