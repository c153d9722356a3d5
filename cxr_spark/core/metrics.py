"""Metrics arithmetic on counts: pure functions shared by the Spark aggregation and by tests.

A rate whose denominator is zero is undefined and reported as ``None``, never as 0 or NaN.
"""
from __future__ import annotations

from statistics import fmean
from typing import Iterable

import numpy as np

COUNT_NAMES = ("tp", "fp", "tn", "fn")
THRESHOLD_RATE_NAMES = ("accuracy", "precision", "recall", "specificity", "f1")
RANKING_NAMES = ("auroc", "average_precision")
RATE_NAMES = THRESHOLD_RATE_NAMES + RANKING_NAMES

#: Age bands of the dataset summary: (lowest age in the band, label). The last band is open-ended.
AGE_BANDS: tuple[tuple[int, str], ...] = ((0, "0-17"), (18, "18-39"), (40, "40-59"), (60, "60-79"), (80, "80+"))
UNKNOWN = "unknown"


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def rates(tp: int, fp: int, tn: int, fn: int) -> dict[str, float | None]:
    """Accuracy, precision, recall (sensitivity), specificity and F1 from one confusion matrix.

    >>> rates(tp=8, fp=2, tn=85, fn=5)["precision"]
    0.8
    """
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
        "precision": precision,
        "recall": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": f1,
    }


def macro_average(per_label: Iterable[dict], names: Iterable[str] = RATE_NAMES) -> dict[str, float | None]:
    """Unweighted means over labels of each rate, skipping labels where the rate is undefined."""
    per_label = list(per_label)
    macro = {}
    for name in names:
        values = [row[name] for row in per_label if row.get(name) is not None]
        macro[name] = fmean(values) if values else None
    for name in RANKING_NAMES:
        if name in macro:
            macro[f"labels_with_{name}"] = sum(1 for row in per_label if row.get(name) is not None)
    return macro


def micro_counts(per_label: Iterable[dict]) -> dict[str, int | float | None]:
    """Micro average: the confusion counts pooled over labels, and the rates of the pooled matrix.

    >>> micro_counts([{"tp": 1, "fp": 0, "tn": 3, "fn": 0}, {"tp": 0, "fp": 1, "tn": 2, "fn": 1}])["precision"]
    0.5
    """
    pooled = {name: 0 for name in COUNT_NAMES}
    for row in per_label:
        for name in COUNT_NAMES:
            pooled[name] += int(row[name])
    return {**pooled, **rates(**pooled)}


def age_band(age: int | None) -> str:
    """The :data:`AGE_BANDS` label of an age in years; :data:`UNKNOWN` when missing or negative.

    >>> age_band(17), age_band(18), age_band(95), age_band(None)
    ('0-17', '18-39', '80+', 'unknown')
    """
    if age is None or age < 0:
        return UNKNOWN
    return [name for low, name in AGE_BANDS if age >= low][-1]


def curve_rates(tp: np.ndarray, fp: np.ndarray, positives: int, negatives: int) -> dict[str, np.ndarray | None]:
    """ROC and precision-recall coordinates from cumulative counts at descending thresholds.

    ``tp[i]``/``fp[i]`` count the positives/negatives scored at or above the i-th highest distinct
    score. The ROC curve gets its (0, 0) origin prepended. A coordinate whose denominator is zero
    (no positives, or no negatives) is ``None``: that curve is undefined.
    """
    tp, fp = np.asarray(tp, dtype=np.float64), np.asarray(fp, dtype=np.float64)
    recall = tp / positives if positives else None
    return {
        "fpr": np.r_[0.0, fp / negatives] if negatives else None,
        "tpr": np.r_[0.0, recall] if recall is not None else None,
        "recall": recall,
        "precision": tp / np.maximum(tp + fp, 1) if recall is not None else None,
    }


DEFAULT_THRESHOLD = 0.5  # used where validation has no positives or no negatives to tune on


def tune_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The decision threshold (positive when score >= t) that maximises F1 on one label's validation set.

    Every distinct score is a candidate; among equal F1 the highest threshold (fewest false
    positives) wins. Without both classes present, :data:`DEFAULT_THRESHOLD`.

    >>> tune_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.35
    """
    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    positives = int(labels.sum())
    if positives == 0 or positives == len(labels):
        return DEFAULT_THRESHOLD
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # the last index of each run of equal scores: thresholding there takes the whole tie
    ends = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    true_positives = np.cumsum(sorted_labels)[ends]
    predicted = ends + 1
    f1 = 2 * true_positives / (predicted + positives)
    best = np.flatnonzero(f1 == f1.max())[0]  # first in descending score order: the highest threshold
    return float(sorted_scores[ends[best]])


def tune_thresholds(labels: np.ndarray, scores: np.ndarray) -> list[float]:
    """:func:`tune_threshold` for every column of an (images × labels) pair of arrays."""
    return [tune_threshold(labels[:, i], scores[:, i]) for i in range(labels.shape[1])]
