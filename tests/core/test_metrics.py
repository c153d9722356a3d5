"""Metrics arithmetic (cxr_spark.core.metrics) without Spark, each figure against scikit-learn or numpy on the
same labels and scores: rates, averages, curves, tuned thresholds, age bands."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, precision_recall_curve, precision_score,
                             recall_score, roc_curve)

from cxr_spark.core.metrics import (AGE_BANDS, DEFAULT_THRESHOLD, RATE_NAMES, age_band, curve_rates, macro_average,
                                    micro_counts, rates, tune_threshold, tune_thresholds)


def _cases():
    rng = np.random.default_rng(2)
    for n, share in ((50, 0.3), (200, 0.05), (40, 0.9)):
        labels = (rng.random(n) < share).astype(int)
        scores = np.clip(labels * 0.3 + rng.random(n) * 0.7, 0, 1).round(2)
        yield labels, scores


@pytest.mark.parametrize("labels, scores", list(_cases()))
def test_rates_equal_sklearn(labels, scores):
    predicted = scores >= 0.5
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    got = rates(tp=int(tp), fp=int(fp), tn=int(tn), fn=int(fn))
    specificity = recall_score(1 - labels, ~predicted)
    expected = {"accuracy": accuracy_score(labels, predicted), "precision": precision_score(labels, predicted),
                "recall": recall_score(labels, predicted), "specificity": specificity,
                "f1": f1_score(labels, predicted)}
    assert got == pytest.approx(expected, abs=1e-12)


def test_undefined_rates_are_none_never_zero():
    assert rates(tp=0, fp=0, tn=5, fn=0) == {"accuracy": 1.0, "precision": None, "recall": None,
                                             "specificity": 1.0, "f1": None}
    assert rates(tp=3, fp=0, tn=0, fn=0) == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0,
                                             "specificity": None, "f1": 1.0}
    assert set(rates(0, 0, 0, 0).values()) == {None}


def test_macro_is_the_mean_over_defined_labels_and_micro_pools_the_counts():
    rows = [{"tp": 8, "fp": 2, "tn": 85, "fn": 5}, {"tp": 0, "fp": 3, "tn": 97, "fn": 0},
            {"tp": 4, "fp": 4, "tn": 90, "fn": 2}]
    per_label = [{**row, **rates(**row), "auroc": auroc, "average_precision": ap}
                 for row, auroc, ap in zip(rows, (0.9, None, 0.7), (0.8, None, None))]
    macro = macro_average(per_label)
    for name in RATE_NAMES:
        values = [row[name] for row in per_label if row[name] is not None]
        assert macro[name] == pytest.approx(np.mean(values) if values else None), name
    assert macro["recall"] == pytest.approx((8 / 13 + 4 / 6) / 2)  # label 2 has no positives: left out
    assert (macro["labels_with_auroc"], macro["labels_with_average_precision"]) == (2, 1)
    assert macro_average([{"recall": None}], ["recall"]) == {"recall": None}
    micro = micro_counts(rows)
    assert (micro["tp"], micro["fp"], micro["tn"], micro["fn"]) == (12, 9, 272, 7)
    assert micro["precision"] == pytest.approx(12 / 21) and micro["recall"] == pytest.approx(12 / 19)


@pytest.mark.parametrize("labels, scores", list(_cases()))
def test_curve_rates_are_sklearns_roc_and_precision_recall_points(labels, scores):
    thresholds = np.unique(scores)[::-1]  # descending distinct scores
    tp = np.array([int(((scores >= t) & (labels == 1)).sum()) for t in thresholds])
    fp = np.array([int(((scores >= t) & (labels == 0)).sum()) for t in thresholds])
    curves = curve_rates(tp, fp, int(labels.sum()), int((1 - labels).sum()))
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(curves["fpr"], fpr)
    np.testing.assert_allclose(curves["tpr"], tpr)
    precision, recall, _ = precision_recall_curve(labels, scores)
    # sklearn lists the points from the lowest threshold up, and appends (recall 0, precision 1)
    np.testing.assert_allclose(curves["precision"], precision[:-1][::-1])
    np.testing.assert_allclose(curves["recall"], recall[:-1][::-1])


def test_a_curve_without_positives_or_negatives_is_undefined():
    none = curve_rates(np.array([0, 0]), np.array([1, 3]), positives=0, negatives=3)
    assert none["tpr"] is None and none["recall"] is None and none["precision"] is None
    np.testing.assert_allclose(none["fpr"], [0, 1 / 3, 1])
    assert curve_rates(np.array([2]), np.array([0]), positives=2, negatives=0)["fpr"] is None


@pytest.mark.parametrize("labels, scores", list(_cases()))
def test_the_tuned_threshold_maximises_f1_and_is_the_highest_among_ties(labels, scores):
    candidates = np.unique(scores)
    f1 = np.array([f1_score(labels, scores >= t) for t in candidates])
    best = candidates[np.flatnonzero(np.isclose(f1, f1.max()))].max()
    assert tune_threshold(labels, scores) == pytest.approx(best)


def test_thresholds_without_both_classes_are_the_default_and_columns_are_tuned_alone():
    assert tune_threshold(np.zeros(5), np.linspace(0, 1, 5)) == DEFAULT_THRESHOLD
    assert tune_threshold(np.ones(5), np.linspace(0, 1, 5)) == DEFAULT_THRESHOLD
    labels = np.array([[0, 1], [1, 1], [1, 0], [0, 0]])
    scores = np.array([[0.2, 0.9], [0.7, 0.6], [0.6, 0.1], [0.1, 0.3]])
    assert tune_thresholds(labels, scores) == [tune_threshold(labels[:, 0], scores[:, 0]),
                                               tune_threshold(labels[:, 1], scores[:, 1])] == [0.6, 0.6]


def test_age_bands_cover_every_age_once():
    lows = [low for low, _ in AGE_BANDS]
    for age in range(0, 121):
        expected = AGE_BANDS[max(i for i, low in enumerate(lows) if age >= low)][1]
        assert age_band(age) == expected, age
    assert [age_band(a) for a in (17, 18, 39, 40, 59, 60, 79, 80)] == ["0-17", "18-39", "18-39", "40-59", "40-59",
                                                                      "60-79", "60-79", "80+"]
    assert age_band(None) == age_band(-1) == "unknown"


def test_the_tuned_threshold_over_many_small_tied_sets():
    rng = np.random.default_rng(23)
    for case in range(60):
        n = int(rng.integers(3, 25))
        labels = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(int)
        if labels.min() == labels.max():
            labels[0] = 1 - labels[0]
        scores = rng.integers(0, 6, n) / 5  # few distinct scores: many ties
        candidates = np.unique(scores)
        f1 = np.array([f1_score(labels, scores >= t) for t in candidates])
        assert tune_threshold(labels, scores) == candidates[np.flatnonzero(np.isclose(f1, f1.max()))].max(), case


def test_rates_and_undefined_values():
    r = rates(tp=8, fp=2, tn=85, fn=5)
    assert r["precision"] == 0.8 and r["recall"] == 8 / 13 and r["specificity"] == 85 / 87
    assert r["f1"] == pytest.approx(2 * 0.8 * (8 / 13) / (0.8 + 8 / 13)) and r["accuracy"] == 0.93
    empty = rates(tp=0, fp=0, tn=10, fn=0)
    assert empty["precision"] is None and empty["recall"] is None and empty["f1"] is None
    macro = macro_average([{**r, "auroc": 0.9}, {**empty, "auroc": None}])
    assert macro["precision"] == 0.8 and macro["auroc"] == 0.9 and macro["labels_with_auroc"] == 1
