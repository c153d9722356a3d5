"""Synthetic NIH ChestX-ray14-style dumps: the real download's layout, learnable findings.

Each image is a plausible frontal chest film (body, lung fields, mediastinum, heart, ribs,
clavicles, noise) drawn at a 256-pixel working resolution, upsampled to the requested size and
given full-resolution grain. Each of the 14 findings draws its own pattern in its own place and
texture, so a small CNN can tell them apart at 128–224 pixels. Everything is a function of
``seed``: the metadata from one generator, each image from a generator seeded by its index.

The drawing and the boxes: :mod:`cxr_spark.synth_drawing`.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_spark.core.guards import UsageError
from cxr_spark.core.image_codec import encode_png
from cxr_spark.core.labels import LABELS, format_finding_labels, parse_finding_labels
from cxr_spark.core.metadata import COLUMN_NAMES, HEADER, SYNTH_SPEC_FILE
from cxr_spark.core.splits import hash_split
from cxr_spark.io.console import progress_line
from cxr_spark.synth_drawing import BOX_FINDINGS, draw_radiograph_and_boxes

log = logging.getLogger(__name__)

FIRST_FOLDER, IMAGES_PER_FOLDER = 4_999, 10_000  # images in NIH's images_001/, and in each later one
#: Built-in per-finding prevalence: NIH's real frequencies (shared/data/README.md) floored at 10%,
#: so a 1,000-image demo has enough positives of every finding, Hernia included, to learn and score.
REAL_FREQUENCY = {
    "Atelectasis": 0.103, "Cardiomegaly": 0.025, "Effusion": 0.119, "Infiltration": 0.177,
    "Mass": 0.052, "Nodule": 0.056, "Pneumonia": 0.013, "Pneumothorax": 0.047,
    "Consolidation": 0.042, "Edema": 0.021, "Emphysema": 0.022, "Fibrosis": 0.015,
    "Pleural_Thickening": 0.030, "Hernia": 0.002,
}
DEMO_PREVALENCE = np.array([max(REAL_FREQUENCY[name], 0.10) for name in LABELS])
TEST_FRACTION = 0.2  # of patients, for the generated test_list.txt (NIH's is ~23% of images)
BBOX_FILE = "BBox_List_2017.csv"
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"  # NIH's header, trailing commas included
SPEC_FILE = SYNTH_SPEC_FILE  # the spec and counts of the dump in its folder, written once it is complete


@dataclass(frozen=True)
class SynthSpec:
    """Where and how to generate; plain values so it pickles to worker processes."""

    out: str
    n_images: int = 1000
    size: int = 1024
    seed: int = 0
    metadata: str | None = None
    processes: int = 0  # 0: one per core


# ---------------------------------------------------------------------------------------------
# metadata


def sample_metadata(n_images: int, seed: int, metadata_csv: str | None = None) -> pd.DataFrame:
    """Rows in the Data_Entry layout: from a real CSV's patients when given, else built-in frequencies."""
    rng = np.random.default_rng(seed)
    if metadata_csv:
        return _sample_real_patients(n_images, rng, metadata_csv)
    rows = []
    patient = 0
    while len(rows) < n_images:
        patient += 1
        n_follow = min(int(rng.geometric(1 / 3.6)), n_images - len(rows))
        age, sex = int(np.clip(rng.normal(47, 17), 1, 95)), "M" if rng.random() < 0.565 else "F"
        for follow_up in range(n_follow):
            labels = (rng.random(len(LABELS)) < DEMO_PREVALENCE).astype(np.uint8)
            rows.append({
                "image_id": f"{patient:08d}_{follow_up:03d}.png",
                "finding_labels": format_finding_labels(labels),
                "follow_up": follow_up,
                "patient_id": patient,
                "age_text": str(min(age + follow_up // 4, 95)),
                "sex": sex,
                "view": "PA" if rng.random() < 0.6 else "AP",
                "original_width": int(rng.integers(2500, 3057)),
                "original_height": int(rng.integers(2048, 3057)),
                "pixel_spacing_x": 0.143,
                "pixel_spacing_y": 0.143,
            })
    return pd.DataFrame(rows, columns=list(COLUMN_NAMES))


def _sample_real_patients(n_images: int, rng: np.random.Generator, path: str) -> pd.DataFrame:
    """Every row of the file when ``n_images`` is its row count; otherwise whole patients, in a seeded
    random order, while they fit into ``n_images`` (one more patient's first follow-ups fill what no whole
    patient fits). The rows keep the file's order, so the dump's folders follow it as NIH's do."""
    table = read_data_entry_csv(path)
    if n_images > len(table):
        raise UsageError(f"--n-images {n_images}: --metadata {path} has only {len(table)} rows")
    if n_images == len(table):
        return table
    patients, first_row, sizes = np.unique(table["patient_id"].to_numpy(), return_index=True, return_counts=True)
    taken = np.zeros(len(patients), bool)
    total = 0
    for k in rng.permutation(len(patients)):
        if total + sizes[k] <= n_images:
            taken[k], total = True, total + sizes[k]
            if total == n_images:
                break
    keep = table["patient_id"].isin(patients[taken]).to_numpy()
    if total < n_images:
        extra = patients[~taken][np.argmin(first_row[~taken])]  # the untaken patient first in the file
        follow_ups = table.groupby("patient_id").cumcount()
        keep |= ((table["patient_id"] == extra) & (follow_ups < n_images - total)).to_numpy()
    return table[keep].reset_index(drop=True)


def read_data_entry_csv(path: str) -> pd.DataFrame:
    """Read a Data_Entry CSV (gzip or not, 2017 or v2020) positionally into :data:`COLUMN_NAMES`."""
    return pd.read_csv(path, header=None, skiprows=1, names=list(COLUMN_NAMES),
                       usecols=range(len(COLUMN_NAMES)), dtype={"age_text": str})


def write_metadata(frame: pd.DataFrame, out: Path, seed: int) -> dict[str, int]:
    """Write ``Data_Entry_2017.csv`` and patient-wise ``train_val_list.txt`` / ``test_list.txt``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "Data_Entry_2017.csv", "w", newline="") as handle:
        handle.write(HEADER + "\n")
        frame.to_csv(handle, header=False, index=False)
    is_test = frame["patient_id"].map(
        lambda p: hash_split(p, seed, val_fraction=0.0, test_fraction=TEST_FRACTION) == "test")
    (out / "test_list.txt").write_text("".join(f"{name}\n" for name in frame.loc[is_test, "image_id"]))
    (out / "train_val_list.txt").write_text(
        "".join(f"{name}\n" for name in frame.loc[~is_test, "image_id"]))
    return {"test": int(is_test.sum()), "train_val": int((~is_test).sum())}


# ---------------------------------------------------------------------------------------------
# the dump


def image_relpath(position: int, image_id: str) -> str:
    """The image's path in NIH's download: its first 4,999 images in ``images_001/images/``, then
    10,000 per folder (``images_012`` holds the last 7,121 of the 112,120).

    >>> [image_relpath(i, "x.png") for i in (0, 4998, 4999, 14999, 112119)]  # doctest: +NORMALIZE_WHITESPACE
    ['images_001/images/x.png', 'images_001/images/x.png', 'images_002/images/x.png',
     'images_003/images/x.png', 'images_012/images/x.png']
    """
    folder = 1 if position < FIRST_FOLDER else (position - FIRST_FOLDER) // IMAGES_PER_FOLDER + 2
    return f"images_{folder:03d}/images/{image_id}"


def _write_one(task) -> tuple[int, list[str]]:
    """Draw and write one image; returns its file size and its BBox_List lines."""
    out, position, image_id, finding_labels, size, seed = task
    pixels, boxes = draw_radiograph_and_boxes(parse_finding_labels(finding_labels), size, seed, position)
    path = Path(out) / image_relpath(position, image_id)
    path.write_bytes(encode_png(pixels, compression=3))
    return path.stat().st_size, [bbox_line(image_id, name, box) for name, box in boxes.items()]


def bbox_line(image_id: str, finding: str, box: tuple[float, float, float, float]) -> str:
    """One BBox_List_2017.csv line as NIH writes it: NIH's finding spelling, numbers to 15 significant digits.

    >>> bbox_line("00000001_000.png", "Infiltration", (256.0, 64.5, 100.25, 1 / 3))
    '00000001_000.png,Infiltrate,256,64.5,100.25,0.333333333333333'
    """
    return ",".join([image_id, BOX_FINDINGS[finding], *(format(float(v), ".15g") for v in box)])


def generate(spec: SynthSpec) -> dict:
    """Write a synthetic dump to ``spec.out``; returns counts for the run summary."""
    started = time.monotonic()
    out = Path(spec.out)
    frame = sample_metadata(spec.n_images, spec.seed, spec.metadata)
    for folder in {image_relpath(i, "x").rsplit("/", 1)[0] for i in range(len(frame))}:
        (out / folder).mkdir(parents=True, exist_ok=True)
    split_counts = write_metadata(frame, out, spec.seed)
    tasks = [(str(out), i, row.image_id, row.finding_labels, spec.size, spec.seed)
             for i, row in enumerate(frame.itertuples(index=False))]
    processes = spec.processes or os.cpu_count() or 1
    total_bytes, report_every, box_lines = 0, max(1, len(tasks) // 10), []
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        for done, (nbytes, lines) in enumerate(pool.imap(_write_one, tasks, chunksize=8), start=1):
            total_bytes += nbytes
            box_lines += lines
            if done % report_every == 0 or done == len(tasks):
                log.info("  %s", progress_line("synth", done, len(tasks), time.monotonic() - started, "images"))
    (out / BBOX_FILE).write_text("".join(f"{line}\n" for line in [BBOX_HEADER, *box_lines]))
    counts = {
        "images": len(tasks),
        "patients": int(frame["patient_id"].nunique()),
        "train_val_images": split_counts["train_val"],
        "test_images": split_counts["test"],
        "boxes": len(box_lines),
        "bytes": total_bytes,
        "duration_s": round(time.monotonic() - started, 1),
    }
    # last: the mark of a complete synthetic dump (ingest records its datasets as data "synthetic")
    (out / SPEC_FILE).write_text(json.dumps({"spec": _marker_spec(spec), "counts": counts}, indent=2))
    return counts


def _marker_spec(spec: SynthSpec) -> dict:
    """What :data:`SPEC_FILE` records of the spec: a dump is reused only for the same one."""
    # files: dumps written before synth wrote BBox_List_2017.csv are generated again
    return {"n_images": spec.n_images, "size": spec.size, "seed": spec.seed,
            "metadata": spec.metadata and os.path.abspath(spec.metadata), "files": [BBOX_FILE]}


def generate_or_reuse(spec: SynthSpec) -> dict:
    """:func:`generate` unless a dump of the same spec is already complete in ``spec.out`` (its
    :data:`SPEC_FILE`); the counts have ``reused`` true when it was."""
    marker = Path(spec.out) / SPEC_FILE
    if marker.exists() and json.loads(marker.read_text()).get("spec") == _marker_spec(spec):
        log.info("synth: reusing the synthetic dump in %s", spec.out)
        return {**json.loads(marker.read_text())["counts"], "reused": True}
    marker.unlink(missing_ok=True)  # a dump half overwritten by a killed run is not the one it described
    return {**generate(spec), "reused": False}
