"""Pure functions: labels, ages, splits, PNG headers, metric rates. No Spark."""
from __future__ import annotations

import csv
import gzip
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from cxr_spark.images import ImageError, decode_grayscale, encode_png, png_header, resize_square
from cxr_spark.labels import LABELS, UnknownFindingError, format_finding_labels, parse_finding_labels
from cxr_spark.metadata import COLUMN_NAMES, parse_age
from cxr_spark.metrics import macro_average, rates
from cxr_spark.splits import hash_split, official_split
from cxr_spark.synth import read_data_entry_csv


def test_label_order_is_the_canonical_fourteen():
    assert len(LABELS) == 14 and LABELS[0] == "Atelectasis" and LABELS[-1] == "Hernia"
    assert LABELS[7] == "Pneumothorax" and LABELS[12] == "Pleural_Thickening"


def test_parse_and_format_round_trip():
    vector = parse_finding_labels("Hernia|Atelectasis|Effusion")
    assert vector.dtype == np.uint8
    assert [LABELS[i] for i in np.flatnonzero(vector)] == ["Atelectasis", "Effusion", "Hernia"]
    assert format_finding_labels(vector) == "Atelectasis|Effusion|Hernia"
    assert parse_finding_labels("No Finding").sum() == 0
    assert parse_finding_labels("Infiltrate")[LABELS.index("Infiltration")] == 1  # BBox file spelling


def test_unknown_finding_names_the_value():
    with pytest.raises(UnknownFindingError, match="Covid"):
        parse_finding_labels("Effusion|Covid")


def test_real_metadata_label_counts_match_a_plain_csv_count(shared_data):
    """Our parser over the real file agrees with counting the '|'-separated names with the csv module."""
    path = shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz"
    plain = Counter()
    with gzip.open(path, "rt", newline="") as handle:
        rows = csv.reader(handle)
        next(rows)
        for row in rows:
            plain.update(row[1].split("|"))
    table = read_data_entry_csv(str(path))
    assert len(table) == 112_120 and list(table.columns) == list(COLUMN_NAMES)
    totals = np.sum([parse_finding_labels(text) for text in table["finding_labels"]], axis=0)
    assert {name: int(totals[i]) for i, name in enumerate(LABELS)} == {name: plain[name] for name in LABELS}
    assert plain["No Finding"] == 60_361  # the figure stated in shared/data/README.md
    assert table["patient_id"].nunique() == 30_805


@pytest.mark.parametrize("text,years", [("58", 58), ("058Y", 58), ("006M", 0), ("024M", 2), ("", None),
                                        ("abc", None), ("414", None), (None, None)])
def test_parse_age(text, years):
    assert parse_age(text) == years


def test_hash_split_is_stable_and_patient_wise():
    splits = [hash_split(p, seed=3, val_fraction=0.1, test_fraction=0.2) for p in range(20_000)]
    assert splits == [hash_split(p, seed=3, val_fraction=0.1, test_fraction=0.2) for p in range(20_000)]
    shares = Counter(splits)
    assert abs(shares["test"] / 20_000 - 0.2) < 0.015 and abs(shares["val"] / 20_000 - 0.1) < 0.015
    assert hash_split(5, seed=3, val_fraction=0.1, test_fraction=0.2) != "" and official_split(True, 5, 3, 0.5) == "test"
    with pytest.raises(ValueError, match="fractions"):
        hash_split(1, seed=0, val_fraction=0.6, test_fraction=0.5)


def test_png_header_matches_pillow_and_rejects_non_images(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (37, 53), dtype=np.uint8)
    data = encode_png(pixels)
    assert png_header(data)[:2] == Image.open(__import__("io").BytesIO(data)).size
    assert np.array_equal(decode_grayscale(data), pixels)
    for bad, reason in ((b"", "empty_file"), (b"GIF89a" + b"\0" * 40, "not_an_image"), (data[:20], "corrupt_image")):
        with pytest.raises(ImageError) as error:
            png_header(bad)
        assert error.value.reason == reason


def test_decode_converts_rgb_and_16_bit_to_8_bit_gray():
    import cv2

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 200  # pure green: luma 0.587 * 200
    gray = decode_grayscale(cv2.imencode(".png", rgb)[1].tobytes())
    assert gray.shape == (8, 8) and abs(int(gray[0, 0]) - round(0.587 * 200)) <= 1
    deep = np.full((4, 4), 51400, np.uint16)
    assert decode_grayscale(cv2.imencode(".png", deep)[1].tobytes())[0, 0] == 51400 >> 8


def test_resize_square_averages_areas():
    image = np.zeros((8, 8), np.uint8)
    image[:4, :4] = 200
    small = resize_square(image, 2)
    assert small.tolist() == [[200, 0], [0, 0]]


def test_rates_and_undefined_values():
    r = rates(tp=8, fp=2, tn=85, fn=5)
    assert r["precision"] == 0.8 and r["recall"] == 8 / 13 and r["specificity"] == 85 / 87
    assert r["f1"] == pytest.approx(2 * 0.8 * (8 / 13) / (0.8 + 8 / 13)) and r["accuracy"] == 0.93
    empty = rates(tp=0, fp=0, tn=10, fn=0)
    assert empty["precision"] is None and empty["recall"] is None and empty["f1"] is None
    macro = macro_average([{**r, "auroc": 0.9}, {**empty, "auroc": None}])
    assert macro["precision"] == 0.8 and macro["auroc"] == 0.9 and macro["labels_with_auroc"] == 1


def test_model_files_on_a_remote_filesystem_get_a_clear_error(tmp_path):
    from cxr_spark.storage import read_bytes, write_bytes

    write_bytes(f"file://{tmp_path}/model/model.keras", b"weights")
    assert read_bytes(str(tmp_path / "model" / "model.keras")) == b"weights"
    with pytest.raises(NotImplementedError, match="hdfs://nn/m/model.keras needs a local or mounted path"):
        read_bytes("hdfs://nn/m/model.keras")
