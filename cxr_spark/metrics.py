"""Metrics arithmetic on counts: pure functions shared by the Spark aggregation and by tests.

A rate whose denominator is zero is undefined and reported as ``None``, never as 0 or NaN.
"""
from __future__ import annotations

from statistics import fmean
from typing import Iterable

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
