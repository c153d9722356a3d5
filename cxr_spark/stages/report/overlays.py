"""Grad-CAM heatmaps on films: where a heatmap peaks, whether the peak is inside a finding's box, and the
overlay drawn for the report.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

DISPLAY_SIZE = 256  # overlays are drawn at least this many pixels wide
MAX_ALPHA = 0.6  # the heatmap's opacity where it is hottest (it fades out where it is cold)
OUT_DIR = "gradcam"  # inside the report folder: gradcam/<finding>/<image>.png


def peak_cell(heatmap: np.ndarray) -> tuple[int, int] | None:
    """``(row, column)`` of the hottest cell (the first in row-major order), None for an all-zero heatmap."""
    if not heatmap.size or not heatmap.max() > 0:
        return None
    row, column = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(row), int(column)


def peak_point(heatmap: np.ndarray, width: int, height: int) -> tuple[float, float] | None:
    """The peak cell's centre in the pixels of a ``width`` × ``height`` image: ``(x, y)``, or None."""
    cell = peak_cell(heatmap)
    if cell is None:
        return None
    rows, columns = heatmap.shape
    return (cell[1] + 0.5) * width / columns, (cell[0] + 0.5) * height / rows


def in_boxes(point: tuple[float, float] | None, boxes: Sequence[Sequence[float]]) -> bool:
    """Whether ``point`` lies in any ``(x, y, w, h)`` box, edges included (no point: False)."""
    if point is None:
        return False
    px, py = point
    return any(x <= px <= x + w and y <= py <= y + h for x, y, w, h in boxes)


def hit_fraction(hits: Sequence[bool]) -> dict:
    """``boxed_images``, ``peaks_in_box`` and ``bbox_hit_fraction`` (None without boxed images).

    >>> hit_fraction([True, False, True])["bbox_hit_fraction"]
    0.6666666666666666
    """
    n, inside = len(hits), int(sum(bool(hit) for hit in hits))
    return {"boxed_images": n, "peaks_in_box": inside, "bbox_hit_fraction": inside / n if n else None}


def overlay_png(film: np.ndarray, heatmap: np.ndarray, *, width: int, height: int,
                boxes: Sequence[Sequence[float]] = (), point: tuple[float, float] | None = None) -> bytes:
    """The film in gray with the heatmap over it (jet colours, opaque where hot, clear where cold), the
    boxes (original ``width`` × ``height`` pixels) in green and the peak as a white cross; PNG bytes."""
    import cv2

    side = max(DISPLAY_SIZE, film.shape[0])
    gray = cv2.cvtColor(cv2.resize(film, (side, side), interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2BGR)
    top = float(heatmap.max()) if heatmap.size else 0.0
    heat = cv2.resize((heatmap / top if top > 0 else np.zeros_like(heatmap)).astype(np.float32), (side, side),
                      interpolation=cv2.INTER_LINEAR)
    colours = cv2.applyColorMap(np.clip(heat * 255, 0, 255).astype(np.uint8), cv2.COLORMAP_JET)
    alpha = (MAX_ALPHA * heat)[..., np.newaxis]
    image = np.clip(gray * (1 - alpha) + colours * alpha, 0, 255).astype(np.uint8)
    sx, sy = side / width, side / height
    for x, y, w, h in boxes:
        cv2.rectangle(image, (round(x * sx), round(y * sy)), (round((x + w) * sx), round((y + h) * sy)),
                      (0, 200, 0), 2)
    if point is not None:
        cv2.drawMarker(image, (round(point[0] * sx), round(point[1] * sy)), (255, 255, 255), cv2.MARKER_CROSS,
                       max(10, side // 20), 2)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("could not encode a Grad-CAM overlay as PNG")
    return data.tobytes()


def overlay_path(finding: str, image_id: str, taken: set[str] | None = None) -> str:
    """``gradcam/<finding>/<image>.png``: the image id without its extension, characters other than
    letters, digits, ``.``, ``_`` and ``-`` as ``_`` (Kaggle ids hold folders); a suffix if ``taken`` has it.

    >>> overlay_path("Effusion", "00013118_008.png"), overlay_path("Pneumonia", "test/PNEUMONIA/p1.jpeg")
    ('gradcam/Effusion/00013118_008.png', 'gradcam/Pneumonia/test_PNEUMONIA_p1.png')
    """
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", re.sub(r"(?i)\.(png|jpe?g|dcm|dicom)$", "", image_id))
    path, n = f"{OUT_DIR}/{finding}/{stem}.png", 1
    while taken is not None and path in taken:
        n += 1
        path = f"{OUT_DIR}/{finding}/{stem}-{n}.png"
    return path
