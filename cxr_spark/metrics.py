"""Metrics arithmetic on counts: pure functions shared by the Spark aggregation and by tests.

A rate whose denominator is zero is undefined and reported as ``None``, never as 0 or NaN.
"""
from __future__ import annotations

from statistics import fmean
from typing import Iterable

import numpy as np

RATE_NAMES = ("accuracy", "precision", "recall", "specificity", "f1", "auroc")


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


def macro_average(per_label: Iterable[dict]) -> dict[str, float | None]:
    """Unweighted means over labels of each rate, skipping labels where the rate is undefined."""
    per_label = list(per_label)
    macro = {}
    for name in RATE_NAMES:
        values = [row[name] for row in per_label if row.get(name) is not None]
        macro[name] = fmean(values) if values else None
    macro["labels_with_auroc"] = sum(1 for row in per_label if row.get("auroc") is not None)
    return macro


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
