"""Drawing synthetic chest films and the boxes of the findings drawn on them (used by :mod:`cxr_spark.synth`).

Each image is a plausible frontal chest film (body, lung fields, mediastinum, heart, ribs,
clavicles, noise) drawn at a 256-pixel working resolution, upsampled to the requested size and
given full-resolution grain. Each of the 14 findings draws its own pattern in its own place and
texture, so a small CNN can tell them apart at 128–224 pixels. Each image is a function of the seed and
its index alone.

Like NIH's download, the dump has a ``BBox_List_2017.csv``: the true box of each drawn pattern of the
findings NIH boxed (:data:`BOX_FINDINGS`), in the image's pixel coordinates and NIH's exact format. The
box encloses the pixels where the pattern's layer (before its strength is applied) is at least half
its full value, clipped to where it shows (the lung fields for patterns drawn inside them). Nodule is
left out: its several nodules scatter over both lungs and have no one box.
"""
from __future__ import annotations

import cv2
import numpy as np

from cxr_spark.core.labels import LABELS

WORK = 256  # working resolution of the drawing
#: The findings the dump boxes (NIH boxed these and Nodule), with BBox_List_2017.csv's spelling of each.
BOX_FINDINGS = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Effusion",
                "Infiltration": "Infiltrate", "Mass": "Mass", "Pneumonia": "Pneumonia",
                "Pneumothorax": "Pneumothorax"}


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


