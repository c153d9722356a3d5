"""Ingest of real-world dumps on local Spark: pixel formats, decompression bombs, ages, the 2017 metadata
layout (v2020 and the bounding boxes: test_ingest.py). Expectations come from Pillow and the csv module."""
from __future__ import annotations

import csv
import io
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
from conftest import read_rows
from films import big_png_header, dicom_bytes
from PIL import Image

from cxr_spark.core.image_formats import MAX_PIXELS
from cxr_spark.datasets.quarantine import QUARANTINE_DIR, QUARANTINE_SCHEMA, REASONS
from cxr_spark.stages.ingest.files import index_file
from cxr_spark.stages.ingest.job import ingest

# Pillow mode -> the conversion ingest must count (None: already 8-bit gray; "unsupported": refused)
PILLOW_MODES = {"L": None, "RGB": "rgb", "RGBA": "rgba", "P": "palette", "I;16": "16bit", "I": "16bit",
                "LA": "unsupported", "CMYK": "unsupported"}


def _write_mixed_dump(folder: Path) -> None:
    """PNGs and JPEGs in every mode a hospital export produces, plus a decompression-bomb header."""
    rng = np.random.default_rng(11)
    folder.mkdir(parents=True)
    plan = [("L", "PNG", 3), ("RGB", "PNG", 2), ("RGBA", "PNG", 2), ("P", "PNG", 2), ("I;16", "PNG", 2),
            ("LA", "PNG", 1), ("L", "JPEG", 2), ("RGB", "JPEG", 1), ("CMYK", "JPEG", 1)]
    for mode, fmt, n in plan:
        for i in range(n):
            gray = Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8))
            image = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257) if mode == "I;16" else gray.convert(mode)
            suffix = "png" if fmt == "PNG" else "jpg"
            image.save(folder / f"{mode.replace(';', '')}_{i}.{suffix}", fmt)
    side = int(MAX_PIXELS ** 0.5) + 1
    (folder / "bomb.png").write_bytes(big_png_header(side, side))
    (folder / "notes.PNG").write_text("not an image")


def _expected_fates(folder: Path) -> tuple[Counter, Counter]:
    """Conversions and quarantine reasons, from Pillow's own reading of each file's header."""
    conversions, reasons = Counter(), Counter()
    for path in folder.iterdir():
        try:
            image = Image.open(path)
        except Exception:  # noqa: BLE001 - Pillow cannot read it at all
            reasons["not_an_image"] += 1
            continue
        fate = PILLOW_MODES[image.mode]
        if image.width * image.height > MAX_PIXELS:
            reasons["image_too_large"] += 1
        elif fate == "unsupported":
            reasons["unsupported_format"] += 1
        elif fate is not None:
            conversions[fate] += 1
    return conversions, reasons


def _quarantine(spark, raw: Path):
    return spark.read.schema(QUARANTINE_SCHEMA).parquet(str(raw / QUARANTINE_DIR)).toPandas()


def test_pixel_formats_are_converted_counted_or_quarantined(spark, tmp_path, config):
    dump = tmp_path / "mixed"
    _write_mixed_dump(dump)
    conversions, reasons = _expected_fates(dump)
    counts = ingest(spark, str(dump), str(tmp_path / "raw"), None, None, config.ingest)
    n_files = len(list(dump.iterdir()))
    assert counts["files_listed"] == n_files == counts["ingested"] + counts["quarantined"]
    assert counts["converted"] == {name: conversions[name] for name in ("rgb", "rgba", "16bit", "palette")}
    assert counts["quarantine_reasons"] == dict(reasons)
    assert counts["splits"] == {"unlabeled": n_files - sum(reasons.values())}
    assert counts["formats"]["jpeg"] == len([p for p in dump.glob("*.jpg") if Image.open(p).mode != "CMYK"])
    from cxr_spark.core.image_codec import decode_grayscale

    rows = read_rows(tmp_path / "raw", ["image_id", "png", "width", "height"])
    for row in rows:  # original bytes kept; every accepted one decodes to the 8-bit gray Pillow computes
        original = (dump / row.image_id).read_bytes()
        assert bytes(row.png) == original and (row.width, row.height) == (48, 40)
        decoded, expected = decode_grayscale(original), np.asarray(Image.open(io.BytesIO(original)).convert("L"))
        if Image.open(io.BytesIO(original)).mode.startswith("I"):
            expected = np.asarray(Image.open(io.BytesIO(original))).astype(np.uint16) >> 8
        assert decoded.shape == expected.shape and np.abs(decoded.astype(int) - expected).max() <= 1, row.image_id


def _rewrite_csv(source: Path, target: Path, ages: dict, trailing_comma: bool) -> None:
    """Copy a Data_Entry CSV changing some ages; optionally end every line with an empty column (2017 copies)."""
    with open(source, newline="") as handle:
        rows = list(csv.reader(handle))
    with open(target, "w", newline="") as handle:
        for row in rows:
            if row[0] in ages:
                row[4] = ages[row[0]]
            handle.write(",".join(row) + ("," if trailing_comma else "") + "\n")


def test_2017_layout_with_trailing_comma_and_bad_ages(spark, tiny_dump, tmp_path, config):
    dump = tmp_path / "dump"
    shutil.copytree(tiny_dump, dump)
    ids = sorted(p.name for p in dump.rglob("*.png"))
    ages = {ids[0]: "58Y?", ids[1]: "abc", ids[2]: "058Y", ids[3]: "006M"}
    _rewrite_csv(tiny_dump / "Data_Entry_2017.csv", dump / "Data_Entry_2017.csv", ages, trailing_comma=True)
    counts = ingest(spark, str(dump), str(tmp_path / "raw"), str(dump / "Data_Entry_2017.csv"), str(dump),
                    config.ingest)
    quarantine = _quarantine(spark, tmp_path / "raw")
    reasons = dict(zip(quarantine["image_id"], quarantine["reason"]))
    assert reasons == {ids[0]: "unparseable_age", ids[1]: "unparseable_age"}
    assert counts["files_listed"] == len(ids) == counts["ingested"] + counts["quarantined"]
    assert counts["metadata_rows"] == len(ids) == counts["metadata_matched"] + counts["metadata_quarantined"]
    rows = {r.image_id: r for r in read_rows(tmp_path / "raw", ["image_id", "age", "labels", "view"])}
    assert rows[ids[2]].age == 58 and rows[ids[3]].age == 0
    with open(dump / "Data_Entry_2017.csv", newline="") as handle:  # the csv module's reading of the same lines
        plain = {row[0]: row for row in list(csv.reader(handle))[1:]}
    assert all(len(row) == 12 and row[-1] == "" for row in plain.values())
    assert all(rows[i].view == plain[i][6] for i in rows)


def test_every_malformed_dicom_is_quarantined_with_a_one_line_detail_that_names_no_one():
    # Seeded random damage to a DICOM (a few bytes changed, sometimes cut short). pydicom decodes elements
    # lazily and raised TypeError, AttributeError, NotImplementedError, ... from inside ingest (the whole
    # Spark job failed) for 190 of 3,000 such files before every error became corrupt_image.
    pixels = np.arange(400, dtype=np.uint16).reshape(20, 20)
    good = dicom_bytes(pixels, WindowCenter=200, WindowWidth=300, PatientName="Doe^Jane", PatientAge="062Y")
    rng = np.random.default_rng(0)
    reasons = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on each oddity it reads past
        for _ in range(1000):
            data = bytearray(good)
            for _ in range(rng.integers(1, 4)):
                data[int(rng.integers(128, len(data)))] = int(rng.integers(0, 256))
            if rng.random() < 0.3:
                data = data[:int(rng.integers(132, len(data)))]
            row = index_file(bytes(data), 16)  # ingest's pass 1 over one file, as a Spark task runs it
            reasons.add(row["reason"])
            if row["reason"] is not None:
                assert row["reason"] in REASONS and row["image"] is None
                assert "\n" not in row["detail"] and "Doe" not in row["detail"] and "Jane" not in row["detail"]
            else:
                assert row["image"] is not None
    assert {None, "corrupt_image", "unsupported_format"} <= reasons
