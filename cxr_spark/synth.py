"""Synthetic NIH ChestX-ray14-style dumps: the real download's layout, learnable findings.

Each image is a plausible frontal chest film (body, lung fields, mediastinum, heart, ribs,
clavicles, noise) drawn at a 256-pixel working resolution, upsampled to the requested size and
given full-resolution grain. Each of the 14 findings draws its own pattern in its own place and
texture, so a small CNN can tell them apart at 128–224 pixels. Everything is a function of
``seed``: the metadata from one generator, each image from a generator seeded by its index.

Like NIH's download, the dump has a ``BBox_List_2017.csv``: the true box of each drawn pattern of the
findings NIH boxed (:data:`BOX_FINDINGS`), in the image's pixel coordinates and NIH's exact format. The
box encloses the pixels where the pattern's layer (before its strength is applied) is at least half
its full value, clipped to where it shows (the lung fields for patterns drawn inside them). Nodule is
left out: its several nodules scatter over both lungs and have no one box.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from cxr_spark.core.guards import UsageError
from cxr_spark.core.image_codec import encode_png
from cxr_spark.core.labels import LABELS, format_finding_labels, parse_finding_labels
from cxr_spark.core.metadata import COLUMN_NAMES, HEADER
from cxr_spark.core.splits import hash_split

log = logging.getLogger(__name__)

WORK = 256  # working resolution of the drawing
IMAGES_PER_FOLDER = 10_000  # the real download's images_NNN/images/ folder size
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
#: The findings the dump boxes (NIH boxed these and Nodule), with BBox_List_2017.csv's spelling of each.
BOX_FINDINGS = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Effusion",
                "Infiltration": "Infiltrate", "Mass": "Mass", "Pneumonia": "Pneumonia",
                "Pneumothorax": "Pneumothorax"}
BBOX_FILE = "BBox_List_2017.csv"
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"  # NIH's header, trailing commas included
SPEC_FILE = "_synth.json"  # the spec and counts of the dump in its folder, written once it is complete


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
# drawing


def _ellipse_mask(cx, cy, ax, ay, angle=0.0):
    mask = np.zeros((WORK, WORK), np.float32)
    cv2.ellipse(mask, (int(cx * WORK), int(cy * WORK)), (max(1, int(ax * WORK)), max(1, int(ay * WORK))),
                angle, 0, 360, 1.0, -1, cv2.LINE_AA)
    return mask


def _blur(a, sigma):
    return cv2.GaussianBlur(a, (0, 0), sigma * WORK)


def _gaussian_blob(cx, cy, sigma_x, sigma_y):
    ys, xs = np.mgrid[0:WORK, 0:WORK].astype(np.float32) / WORK
    return np.exp(-(((xs - cx) / sigma_x) ** 2 + ((ys - cy) / sigma_y) ** 2) / 2)


class _Film:
    """One radiograph under construction: intensity layer plus the lung geometry findings need."""

    def __init__(self, rng: np.random.Generator, emphysema: bool, cardiomegaly: bool):
        self.rng = rng
        jitter = lambda s: rng.uniform(-s, s)  # noqa: E731 - tiny local helper
        self.lung_scale = 1.12 if emphysema else 1.0
        self.cy = 0.47 + jitter(0.02)
        self.lungs = []  # (cx, cy, ax, ay) for the image-left and image-right lung
        for side in (-1, 1):
            self.lungs.append((0.5 + side * (0.18 + jitter(0.01)), self.cy,
                               (0.125 + jitter(0.01)) * self.lung_scale, (0.27 + jitter(0.015)) * self.lung_scale))
        img = np.full((WORK, WORK), 18.0, np.float32)
        img += 135 * _blur(_ellipse_mask(0.5, 0.56, 0.43 + jitter(0.02), 0.52), 0.02)  # body
        lung_mask = sum(_ellipse_mask(*lung) for lung in self.lungs)
        lung_mask[int((self.cy + 0.25 * self.lung_scale) * WORK):] = 0  # diaphragm
        self.lung_mask = np.clip(_blur(lung_mask, 0.008), 0, 1)
        img -= (95 if emphysema else 70) * self.lung_mask
        ribs = np.zeros_like(img)
        for k in range(8):  # posterior ribs: arcs sweeping down and out from the spine
            y = self.cy - 0.24 + k * 0.062
            for side in (-1, 1):
                cv2.ellipse(ribs, (int((0.5 + side * 0.04) * WORK), int(y * WORK)),
                            (int(0.2 * WORK), int(0.05 * WORK)), 0, 0 if side > 0 else 90, 90 if side > 0 else 180,
                            1.0, max(2, WORK // 90), cv2.LINE_AA)
        self.ribs = _blur(ribs, 0.003) * self.lung_mask
        img += 28 * self.ribs
        img += 70 * _blur(_ellipse_mask(0.5, 0.5, 0.045, 0.45), 0.01)  # mediastinum and spine
        heart = 1.55 if cardiomegaly else 1.0
        self.heart = _blur(_ellipse_mask(0.54, 0.64, 0.1 * heart + jitter(0.008), 0.085 * heart), 0.01)
        img += 75 * self.heart
        for side in (-1, 1):  # clavicles
            cv2.line(img, (int(0.5 * WORK), int(0.17 * WORK)),
                     (int((0.5 + side * 0.3) * WORK), int(0.13 * WORK)), 190, WORK // 60, cv2.LINE_AA)
        self.img = img
        self.extent = np.zeros((WORK, WORK), np.float32)  # the current finding's pattern, where it shows

    def lung(self, side=None):
        return self.lungs[self.rng.integers(2) if side is None else side]

    def add(self, amount, layer, in_lung=True):
        shown = layer * (self.lung_mask if in_lung else 1.0)
        self.img += amount * shown
        self.mark(shown)

    def mark(self, layer):
        """Record where the current finding's pattern is (its box is taken from here)."""
        self.extent = np.maximum(self.extent, np.abs(layer))


def _draw_finding(film: _Film, name: str) -> None:
    rng = film.rng
    u = rng.uniform
    cx, cy, ax, ay = film.lung()
    if name == "Atelectasis":  # wedge collapse at a lung base, apex pointing to the hilum
        base_y = cy + ay * 0.85
        pts = np.array([[cx - ax * 0.9, base_y], [cx + ax * 0.9, base_y], [0.5 + (cx - 0.5) * 0.4, cy]])
        mask = np.zeros((WORK, WORK), np.float32)
        cv2.fillPoly(mask, [(pts * WORK).astype(np.int32)], 1.0, cv2.LINE_AA)
        film.add(u(55, 70), _blur(mask, 0.006))
    elif name == "Effusion":  # fluid layering at the base with a flat top
        level = cy + ay * u(0.35, 0.5)
        mask = _ellipse_mask(cx, cy, ax * 1.05, ay * 1.05)
        mask[: int(level * WORK)] = 0
        film.add(u(85, 100), _blur(mask, 0.004), in_lung=False)
    elif name == "Infiltration":  # patchy ill-defined opacities spread through one lung
        layer = np.zeros((WORK, WORK), np.float32)
        for _ in range(14):
            layer += _gaussian_blob(cx + u(-0.8, 0.8) * ax, cy + u(-0.7, 0.7) * ay, 0.015, 0.015)
        film.add(u(35, 45), np.clip(layer, 0, 1.2))
    elif name == "Mass":  # one large sharp-edged round opacity
        film.add(u(80, 95), _blur(_ellipse_mask(cx + u(-0.4, 0.4) * ax, cy + u(-0.5, 0.3) * ay,
                                                u(0.055, 0.075), u(0.055, 0.075)), 0.002), in_lung=False)
    elif name == "Nodule":  # several small round opacities
        for _ in range(int(rng.integers(4, 8))):
            lcx, lcy, lax, lay = film.lung()
            r = u(0.011, 0.016)
            film.add(u(80, 95), _ellipse_mask(lcx + u(-0.7, 0.7) * lax, lcy + u(-0.7, 0.6) * lay, r, r),
                     in_lung=False)
    elif name == "Pneumonia":  # fuzzy lobar cloud crossed by dark air bronchograms
        px, py = cx + u(-0.3, 0.3) * ax, cy + u(0.0, 0.4) * ay
        film.add(u(65, 75), _gaussian_blob(px, py, 0.06, 0.07))
        streaks = np.zeros((WORK, WORK), np.float32)
        for _ in range(5):
            angle = u(0, np.pi)
            dx, dy = np.cos(angle) * 0.05, np.sin(angle) * 0.05
            cv2.line(streaks, (int((px - dx) * WORK), int((py - dy) * WORK)),
                     (int((px + dx) * WORK), int((py + dy) * WORK)), 1.0, max(1, WORK // 128), cv2.LINE_AA)
        film.add(-45, streaks)
    elif name == "Pneumothorax":  # apical-lateral air with no lung markings, edged by the pleural line
        side = 0 if cx < 0.5 else 1
        sign = -1 if side == 0 else 1
        mask = _ellipse_mask(cx + sign * ax * 0.45, cy - ay * 0.35, ax * 0.6, ay * 0.6) * film.lung_mask
        film.img = film.img * (1 - mask) + mask * (film.img - 28 * film.ribs - 25)
        film.mark(mask)
        edge = cv2.morphologyEx((mask > 0.5).astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
        film.add(70, edge.astype(np.float32), in_lung=False)
    elif name == "Consolidation":  # dense homogeneous upper-lobe opacity stopped by the fissure
        mask = _ellipse_mask(cx, cy, ax, ay)
        mask[int((cy - ay * u(0.0, 0.15)) * WORK):] = 0
        film.add(u(85, 100), _blur(mask, 0.004))
    elif name == "Edema":  # bilateral perihilar "bat wing" haze plus Kerley B lines at the bases
        for lcx, lcy, lax, lay in film.lungs:
            film.add(u(40, 50), _gaussian_blob(0.5 + (lcx - 0.5) * 0.55, lcy, 0.06, 0.1))
            lines = np.zeros((WORK, WORK), np.float32)
            outer = lcx + (lax * 0.8 if lcx > 0.5 else -lax * 0.8)
            for k in range(5):
                y = int((lcy + lay * (0.35 + 0.08 * k)) * WORK)
                x0 = int(outer * WORK)
                cv2.line(lines, (x0, y), (x0 + (-1 if lcx > 0.5 else 1) * WORK // 18, y), 1.0, 1, cv2.LINE_AA)
            film.add(55, lines)
    elif name == "Emphysema":  # drawn in _Film: larger, darker lungs; here, sparse bullae
        for _ in range(3):
            lcx, lcy, lax, lay = film.lung()
            r = u(0.02, 0.035)
            film.add(-25, _ellipse_mask(lcx + u(-0.5, 0.5) * lax, lcy - u(0.2, 0.7) * lay, r, r))
    elif name == "Fibrosis":  # reticular cross-hatch in the lung periphery
        layer = np.zeros((WORK, WORK), np.float32)
        step = WORK // 28
        for k in range(-WORK, 2 * WORK, step):
            cv2.line(layer, (k, 0), (k + WORK, WORK), 1.0, 1, cv2.LINE_AA)
            cv2.line(layer, (k, WORK), (k + WORK, 0), 1.0, 1, cv2.LINE_AA)
        periphery = np.clip(film.lung_mask - _blur(_ellipse_mask(0.5, cy, 0.2, ay * 0.8), 0.01), 0, 1)
        film.add(u(40, 50), layer * periphery, in_lung=False)
    elif name == "Pleural_Thickening":  # a bright band along the lateral chest wall
        mask = np.zeros((WORK, WORK), np.float32)
        start, end = (90, 270) if cx < 0.5 else (-90, 90)
        cv2.ellipse(mask, (int(cx * WORK), int(cy * WORK)), (int(ax * WORK), int(ay * WORK)), 0, start, end,
                    1.0, max(3, WORK // 45), cv2.LINE_AA)
        film.add(u(70, 85), _blur(mask, 0.002), in_lung=False)
    elif name == "Hernia":  # hiatal hernia: round gas bubble with a fluid level behind the heart
        hx, hy, r = 0.5 + u(-0.02, 0.02), 0.68 + u(-0.02, 0.02), u(0.045, 0.055)
        film.add(60, _ellipse_mask(hx, hy, r * 1.15, r * 1.15), in_lung=False)
        bubble = _ellipse_mask(hx, hy, r, r)
        bubble[int(hy * WORK):] = 0
        film.add(-130, bubble, in_lung=False)
    elif name != "Cardiomegaly":  # Cardiomegaly is drawn in _Film as an enlarged heart
        raise ValueError(f"no pattern for finding {name!r}")


def _box(extent: np.ndarray, size: int) -> tuple[float, float, float, float] | None:
    """``(x, y, w, h)`` in ``size``-pixel coordinates around the working pixels where ``extent`` >= 0.5."""
    rows, columns = np.nonzero(extent >= 0.5)
    if not len(rows):
        return None
    scale = size / WORK
    return (columns.min() * scale, rows.min() * scale, (columns.max() + 1 - columns.min()) * scale,
            (rows.max() + 1 - rows.min()) * scale)


def draw_radiograph(labels: np.ndarray, size: int, seed: int, index: int) -> np.ndarray:
    """Draw one ``size``×``size`` uint8 chest film showing the findings flagged in ``labels``."""
    return draw_radiograph_and_boxes(labels, size, seed, index)[0]


def draw_radiograph_and_boxes(labels: np.ndarray, size: int, seed: int,
                              index: int) -> tuple[np.ndarray, dict[str, tuple[float, float, float, float]]]:
    """The film of :func:`draw_radiograph` and the true box ``(x, y, w, h)`` of each drawn finding of
    :data:`BOX_FINDINGS` (canonical name -> box, ``size``-pixel coordinates)."""
    rng = np.random.default_rng([seed, index])
    names = [LABELS[i] for i in np.flatnonzero(labels)]
    film = _Film(rng, emphysema="Emphysema" in names, cardiomegaly="Cardiomegaly" in names)
    boxes = {}
    for name in names:
        film.extent[:] = film.heart if name == "Cardiomegaly" else 0  # the enlarged heart is drawn in _Film
        _draw_finding(film, name)
        box = _box(film.extent, size) if name in BOX_FINDINGS else None
        if box:
            boxes[name] = box
    img = _blur(film.img, 0.0025) + rng.normal(0, 4, (WORK, WORK)).astype(np.float32)
    img = img * rng.uniform(0.9, 1.1) + rng.uniform(-10, 10)  # exposure varies between films
    big = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    big += rng.normal(0, 3, (size, size)).astype(np.float32)  # detector grain at full resolution
    return np.clip(big, 0, 255).astype(np.uint8), boxes


# ---------------------------------------------------------------------------------------------
# the dump


def image_relpath(position: int, image_id: str) -> str:
    """``images_001/images/<id>`` … in the real download's folders of 10,000."""
    return f"images_{position // IMAGES_PER_FOLDER + 1:03d}/images/{image_id}"


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
                log.info("synth: %d/%d images written (%.0f s)", done, len(tasks), time.monotonic() - started)
    (out / BBOX_FILE).write_text("".join(f"{line}\n" for line in [BBOX_HEADER, *box_lines]))
    return {
        "images": len(tasks),
        "patients": int(frame["patient_id"].nunique()),
        "train_val_images": split_counts["train_val"],
        "test_images": split_counts["test"],
        "boxes": len(box_lines),
        "bytes": total_bytes,
        "duration_s": round(time.monotonic() - started, 1),
    }


def generate_or_reuse(spec: SynthSpec) -> dict:
    """:func:`generate` unless a dump of the same spec is already complete in ``spec.out`` (its
    :data:`SPEC_FILE`); the counts have ``reused`` true when it was."""
    marker = Path(spec.out) / SPEC_FILE
    # files: dumps written before synth wrote BBox_List_2017.csv are generated again
    wanted = {"n_images": spec.n_images, "size": spec.size, "seed": spec.seed,
              "metadata": spec.metadata and os.path.abspath(spec.metadata), "files": [BBOX_FILE]}
    if marker.exists() and json.loads(marker.read_text()).get("spec") == wanted:
        log.info("synth: reusing the synthetic dump in %s", spec.out)
        return {**json.loads(marker.read_text())["counts"], "reused": True}
    marker.unlink(missing_ok=True)  # a dump half overwritten by a killed run is not the one it described
    counts = generate(spec)
    marker.write_text(json.dumps({"spec": wanted, "counts": counts}, indent=2))
    return {**counts, "reused": False}
