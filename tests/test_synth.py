"""The synthetic dump has the NIH download's layout and is deterministic."""
from __future__ import annotations

import csv
import gzip
import hashlib

import cv2
import numpy as np
import pytest
from PIL import Image

from cxr_spark.core.guards import UsageError
from cxr_spark.core.labels import LABELS, parse_finding_labels
from cxr_spark.core.metadata import HEADER
from cxr_spark.synth import (SynthSpec, generate, generate_or_reuse, image_relpath, read_data_entry_csv,
                             sample_metadata, write_metadata)
from cxr_spark.synth_drawing import BOX_FINDINGS, draw_radiograph, draw_radiograph_and_boxes


def test_layout_header_and_patient_wise_lists(tiny_dump):
    lines = (tiny_dump / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == HEADER
    table = read_data_entry_csv(str(tiny_dump / "Data_Entry_2017.csv"))
    pngs = sorted(p.relative_to(tiny_dump).as_posix() for p in tiny_dump.rglob("*.png"))
    assert pngs == sorted(f"images_001/images/{name}" for name in table["image_id"])
    test = set((tiny_dump / "test_list.txt").read_text().split())
    train_val = set((tiny_dump / "train_val_list.txt").read_text().split())
    assert test and train_val and not test & train_val and test | train_val == set(table["image_id"])
    patient_of = dict(zip(table["image_id"], table["patient_id"]))
    assert not {patient_of[i] for i in test} & {patient_of[i] for i in train_val}
    with Image.open(tiny_dump / pngs[0]) as image:
        assert image.mode == "L" and image.size == (128, 128)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    digests = []
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate(SynthSpec(out=str(tmp_path / run), n_images=6, size=64, seed=seed, processes=1))
        digests.append(hashlib.sha256(b"".join(p.read_bytes() for p in sorted((tmp_path / run).rglob("*.png")))
                                      + (tmp_path / run / "Data_Entry_2017.csv").read_bytes()).hexdigest())
    assert digests[0] == digests[1] != digests[2]


def test_each_finding_changes_the_film():
    """Every finding's pattern changes pixels relative to the same film without it."""
    base = draw_radiograph(np.zeros(14, np.uint8), 256, seed=1, index=0).astype(int)
    for i in range(14):
        labels = np.zeros(14, np.uint8)
        labels[i] = 1
        changed = np.abs(draw_radiograph(labels, 256, seed=1, index=0).astype(int) - base) > 20
        assert changed.mean() > 0.001, f"finding {i} is invisible"


def test_sampling_from_real_metadata_keeps_real_rows(shared_data, tmp_path):
    source = read_data_entry_csv(str(shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz"))
    generate(SynthSpec(out=str(tmp_path), n_images=12, size=32, seed=5, processes=1,
                       metadata=str(shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz")))
    written = read_data_entry_csv(str(tmp_path / "Data_Entry_2017.csv"))
    assert len(written) == 12
    merged = written.merge(source, on="image_id", suffixes=("", "_real"))
    assert len(merged) == 12 and (merged["finding_labels"] == merged["finding_labels_real"]).all()
    assert (merged["patient_id"] == merged["patient_id_real"]).all()


def test_a_complete_dump_of_the_same_spec_is_reused_and_any_other_generated_again(tmp_path):
    spec = SynthSpec(out=str(tmp_path), n_images=4, size=32, seed=2, processes=1)
    first = generate_or_reuse(spec)
    written = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*.png")}
    assert not first["reused"] and len(written) == 4
    assert generate_or_reuse(spec) == {**first, "reused": True}
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*.png")} == written  # untouched
    other = generate_or_reuse(SynthSpec(out=str(tmp_path), n_images=4, size=32, seed=3, processes=1))
    assert not other["reused"]
    assert {p.read_bytes() for p in tmp_path.rglob("*.png")}.isdisjoint(data for _, data in written.values())
    (tmp_path / "_synth.json").unlink()  # as a run killed while generating leaves it
    assert not generate_or_reuse(SynthSpec(out=str(tmp_path), n_images=4, size=32, seed=3, processes=1))["reused"]


def _csv_rows(path) -> list[tuple[str, ...]]:
    """Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age, Patient Gender, View Position of
    each data row, read with the csv module."""
    with (gzip.open(path, "rt", newline="") if str(path).endswith(".gz") else open(path, newline="")) as handle:
        return [tuple(row[:7]) for row in list(csv.reader(handle))[1:]]


def test_every_row_of_real_metadata_when_n_is_its_row_count(shared_data, tmp_path):
    source_path = shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz"
    source = _csv_rows(source_path)
    frame = sample_metadata(len(source), seed=3, metadata_csv=str(source_path))
    write_metadata(frame, tmp_path, seed=3)
    assert _csv_rows(tmp_path / "Data_Entry_2017.csv") == source  # every row, in the file's order
    assert {image_id for image_id, *_ in source} == set((tmp_path / "test_list.txt").read_text().split()) | set(
        (tmp_path / "train_val_list.txt").read_text().split())
    folders = {image_relpath(i, image_id).split("/")[0] for i, image_id in enumerate(frame["image_id"])}
    assert folders == {f"images_{k:03d}" for k in range(1, 13)}  # NIH's twelve folders


def test_fewer_images_than_real_rows_are_whole_real_patients(shared_data):
    source_path = shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz"
    source = _csv_rows(source_path)
    picked = {}
    for seed in (1, 1, 2):
        frame = sample_metadata(1000, seed=seed, metadata_csv=str(source_path))
        rows = [tuple(str(v) for v in row) for row in
                frame[["image_id", "finding_labels", "follow_up", "patient_id", "age_text", "sex", "view"]].itertuples(
                    index=False)]
        chosen = {row[3] for row in rows}
        assert len(rows) == 1000 and rows == [row for row in source if row[3] in chosen]  # whole patients, file order
        picked.setdefault(seed, []).append(rows)
    assert picked[1][0] == picked[1][1] != picked[2][0]


def test_a_patient_is_cut_only_when_no_whole_one_fits_and_too_many_images_are_refused(shared_data, tmp_path):
    with gzip.open(shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz", "rt") as handle:
        lines = [next(handle) for _ in range(12)]
    small = tmp_path / "Data_Entry_small.csv"
    small.write_text("".join(lines[:4] + lines[5:10]))  # the header, patient 1's 3 rows and 5 of patient 3's
    rows = _csv_rows(small)
    assert [row[3] for row in rows] == ["1"] * 3 + ["3"] * 5
    for seed in (0, 1, 2, 3):
        assert list(sample_metadata(3, seed, str(small))["image_id"]) == [row[0] for row in rows[:3]]
        # 4: patient 1 whole, then the first follow-up of patient 3 (no whole patient fits the last one)
        assert list(sample_metadata(4, seed, str(small))["image_id"]) == [row[0] for row in rows[:4]]
    assert list(sample_metadata(8, 0, str(small))["image_id"]) == [row[0] for row in rows]
    with pytest.raises(UsageError, match=r"--n-images 9: .* has only 8 rows"):
        sample_metadata(9, 0, str(small))


def _seen_box(name: str, index: int, size: int = 256) -> tuple[tuple, tuple]:
    """The written box of one drawn finding, and the box around the pixels the finding visibly changes:
    the same film drawn without it, its exposure (a random scale and offset drawn after the findings)
    undone by a least-squares fit over the unclipped pixels, the residual smoothed, and its pixels at
    half the largest change or more."""
    labels = np.zeros(len(LABELS), np.uint8)
    labels[LABELS.index(name)] = 1
    with_finding, boxes = draw_radiograph_and_boxes(labels, size, seed=1, index=index)
    a, b = with_finding.astype(np.float64), draw_radiograph(np.zeros(len(LABELS), np.uint8), size, 1, index)
    unclipped = (np.minimum(a, b) > 0) & (np.maximum(a, b) < 255)
    slope, intercept = np.polyfit(b[unclipped], a[unclipped], 1)
    residual = np.where(unclipped, a - slope * b - intercept, 0).astype(np.float32)
    change = np.abs(cv2.GaussianBlur(residual, (0, 0), 1.5))
    ys, xs = np.nonzero(change >= 0.5 * change.max())
    return boxes[name], (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min())


def _iou(a, b) -> float:
    width = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    height = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return width * height / (a[2] * a[3] + b[2] * b[3] - width * height)


def test_each_box_is_where_its_finding_changes_the_film():
    for name in BOX_FINDINGS:
        overlaps = [_iou(*_seen_box(name, index)) for index in range(8)]
        assert min(overlaps) >= 0.7 and np.mean(overlaps) >= 0.8, (name, np.round(overlaps, 2))
    labels = np.zeros(len(LABELS), np.uint8)
    labels[[LABELS.index("Nodule"), LABELS.index("Emphysema")]] = 1
    assert draw_radiograph_and_boxes(labels, 64, seed=1, index=0)[1] == {}  # findings NIH did not box, or scattered


def test_bbox_list_has_nihs_format_and_a_box_per_drawn_boxed_finding(tiny_dump):
    lines = (tiny_dump / "BBox_List_2017.csv").read_text().split("\n")
    assert lines[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,," and lines[-1] == ""
    rows = list(csv.reader(lines[1:-1]))
    assert rows and all(len(row) == 6 for row in rows)
    table = read_data_entry_csv(str(tiny_dump / "Data_Entry_2017.csv"))
    nih_name = {"Infiltration": "Infiltrate"}
    drawn = {(row.image_id, nih_name.get(LABELS[i], LABELS[i])) for row in table.itertuples()
             for i in np.flatnonzero(parse_finding_labels(row.finding_labels)) if LABELS[i] in BOX_FINDINGS}
    assert {(row[0], row[1]) for row in rows} == drawn and len(rows) == len(drawn)
    assert "Infiltrate" in {row[1] for row in rows} and "Nodule" not in {row[1] for row in rows}
    for row in rows:
        x, y, w, h = (float(v) for v in row[2:])
        assert w > 0 and h > 0 and 0 <= x and x + w <= 128 and 0 <= y and y + h <= 128, row
