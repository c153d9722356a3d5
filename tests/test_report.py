"""Spark's confusion counts and AUROC equal an independent single-machine computation (scikit-learn)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from cxr_spark.labels import LABELS
from cxr_spark.report import compute_metrics, render_markdown, report


@pytest.fixture(scope="module")
def predictions(spark, tmp_path_factory):
    """400 rows; scores rounded to 2 decimals (many ties); Hernia has no positives, Edema no negatives."""
    rng = np.random.default_rng(11)
    n = 400
    labels = (rng.random((n, 14)) < np.linspace(0.05, 0.5, 14)).astype(np.int16)
    labels[:, LABELS.index("Hernia")] = 0
    labels[:, LABELS.index("Edema")] = 1
    probabilities = np.clip(labels * 0.3 + rng.random((n, 14)) * 0.7, 0, 1).round(2).astype(np.float32)
    thresholds = {name: float(t) for name, t in zip(LABELS, np.linspace(0.3, 0.7, 14).round(2))}
    frame = pd.DataFrame({"image_id": [f"{i:08d}_000.png" for i in range(n)], "split": "test",
                          "labels": list(labels), "probabilities": list(probabilities)})
    url = tmp_path_factory.mktemp("predictions") / "predictions"
    spark.createDataFrame(frame, "image_id string, split string, labels array<smallint>, "
                                 "probabilities array<float>").repartition(4).write.parquet(str(url))
    manifest = {"counts": {"split": "test"}, "model": {"model_version": "m-1", "model": "small_cnn",
                "task": "multilabel", "labels": list(LABELS), "input_size": 32, "thresholds": thresholds}}
    (url / "_manifest.json").write_text(json.dumps(manifest))
    return url, labels, probabilities, thresholds


def test_counts_and_auroc_equal_sklearn(spark, predictions):
    url, labels, probabilities, thresholds = predictions
    metrics = compute_metrics(spark, str(url))
    assert metrics["n_images"] == len(labels) and metrics["labels"] == list(LABELS)
    for i, name in enumerate(LABELS):
        row = metrics["per_label"][name]
        y, p = labels[:, i], probabilities[:, i]
        tn, fp, fn, tp = confusion_matrix(y, p >= np.float32(thresholds[name]), labels=[0, 1]).ravel()
        assert (row["tp"], row["fp"], row["tn"], row["fn"]) == (tp, fp, tn, fn), name
        assert row["support"] == y.sum()
        if 0 < y.sum() < len(y):
            assert row["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12), name
        else:
            assert row["auroc"] is None, name
        assert row["recall"] == (pytest.approx(tp / (tp + fn)) if tp + fn else None)


def test_macro_is_the_mean_over_defined_labels(spark, predictions):
    url, labels, probabilities, _ = predictions
    metrics = compute_metrics(spark, str(url))
    defined = [i for i in range(14) if 0 < labels[:, i].sum() < len(labels)]
    expected = np.mean([roc_auc_score(labels[:, i], probabilities[:, i]) for i in defined])
    assert metrics["macro"]["auroc"] == pytest.approx(expected, abs=1e-12)
    assert metrics["macro"]["labels_with_auroc"] == len(defined) == 12


def test_report_writes_metrics_json_and_markdown(spark, predictions, tmp_path):
    url, labels, _, _ = predictions
    report(spark, str(url), str(tmp_path / "report"))
    written = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(written["per_label"]["Mass"]) >= {"threshold", "tp", "fp", "tn", "fn", "accuracy", "precision",
                                                  "recall", "specificity", "f1", "auroc", "support"}
    assert written["per_label"]["Hernia"]["auroc"] is None
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert markdown == render_markdown(written)
    assert "| Hernia | 0 |" in markdown and "n/a" in markdown
