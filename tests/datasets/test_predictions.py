"""Per-label metrics of a predictions dataset computed by Spark, against numpy on the same rows."""
from __future__ import annotations

import numpy as np

from cxr_spark.core.metrics import DEFAULT_THRESHOLD
from cxr_spark.datasets.predictions import PREDICTIONS_DDL, long_form, tuned_thresholds


def _best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Every distinct score tried as a threshold (positive when p >= t), F1 from its confusion matrix; the
    highest threshold of the best F1; 0.5 without both classes."""
    if y.all() or not y.any():
        return 0.5
    best = None
    for t in sorted(set(p.tolist()), reverse=True):
        tp, fp, fn = int(((p >= t) & (y == 1)).sum()), int(((p >= t) & (y == 0)).sum()), int(((p < t) & (y == 1)).sum())
        f1 = 2 * tp / (2 * tp + fp + fn)
        if best is None or f1 > best[0]:
            best = (f1, t)
    return best[1]


def test_thresholds_tuned_by_spark_are_the_best_f1_numpy_finds_ties_and_one_class_labels_included(spark):
    rng = np.random.default_rng(5)
    n_images, n_labels = 300, 5
    labels = (rng.random((n_images, n_labels)) < [0.3, 0.05, 0.5, 0.0, 1.0]).astype(np.int16)  # 3: none, 4: all
    scores = np.clip(labels * 0.25 + rng.random((n_images, n_labels)) * 0.75, 0, 1).astype(np.float32)
    scores[:, 2] = np.round(scores[:, 2] * 8) / 8  # nine distinct scores: every threshold is a tie
    rows = [(f"{i:05d}.png", "val", labels[i].tolist(), scores[i].tolist(), "PA", "M", 50) for i in range(n_images)]
    frame = spark.createDataFrame(rows, PREDICTIONS_DDL)
    thresholds, images = tuned_thresholds(long_form(frame), n_labels)
    expected = [_best_f1_threshold(labels[:, k], scores[:, k]) for k in range(n_labels)]
    assert images == n_images
    assert thresholds == expected
    assert thresholds[3] == thresholds[4] == DEFAULT_THRESHOLD and len(set(thresholds[:3])) == 3


def test_thresholds_of_no_rows_are_the_default_and_tuned_on_no_image(spark):
    empty = spark.createDataFrame([], PREDICTIONS_DDL)
    assert tuned_thresholds(long_form(empty), 3) == ([DEFAULT_THRESHOLD] * 3, 0)
