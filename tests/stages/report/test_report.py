"""Spark's report figures equal an independent single-machine computation (scikit-learn, numpy, pandas)
on the same predictions: both confusion matrices, every rate, exact AUROC and average precision, micro
and macro averages, curve points, the dataset summary; ties, a label with no positives and one with no
negatives included."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix, f1_score,
                             precision_recall_curve, precision_score, recall_score, roc_auc_score, roc_curve)

from cxr_spark.core.labels import LABELS
from cxr_spark.core.metrics import age_band
from cxr_spark.stages.report.job import compute_metrics, evaluate, report

N = 400
VIEWS, SEXES = np.array(["PA", "AP"]), np.array(["M", "F"])


def write_predictions(spark, url, labels, probabilities, names, thresholds, *, demographics=None, task="multilabel",
                      model="small_cnn", version="m-1", inputs=None):
    """A predictions dataset as score writes it (Parquet in several files + ``_manifest.json``)."""
    columns = {"image_id": [f"{i:08d}_000.png" for i in range(len(labels))], "split": ["test"] * len(labels),
               "labels": [[int(v) for v in row] for row in labels],
               "probabilities": [[float(v) for v in row] for row in probabilities]}
    ddl = "image_id string, split string, labels array<smallint>, probabilities array<float>"
    if demographics is not None:
        columns.update({key: [_plain(v) for v in values] for key, values in demographics.items()})
        ddl += ", view string, sex string, age int"
    rows = list(zip(*columns.values()))
    spark.createDataFrame(rows, ddl).repartition(4).write.parquet(str(url))
    manifest = {"stage": "score", "counts": {"split": "test"}, "inputs": inputs or {},
                "model": {"model_version": version, "model": model, "task": task, "labels": list(names),
                          "input_size": 32, "thresholds": dict(zip(names, thresholds))}}
    (url / "_manifest.json").write_text(json.dumps(manifest))
    return url


def _plain(value):
    """A Python value Spark's row converter accepts (numpy scalars are not)."""
    return value.item() if isinstance(value, np.generic) else value


def _demographics(rng, n):
    ages = rng.integers(1, 95, n).astype(object)
    ages[rng.random(n) < 0.1] = None
    views = VIEWS[rng.integers(0, 2, n)].astype(object)
    views[:5] = None
    return {"view": views, "sex": SEXES[rng.integers(0, 2, n)], "age": ages}


@pytest.fixture(scope="module")
def predictions(spark, tmp_path_factory):
    """400 rows; scores rounded to 2 decimals (many ties); Hernia has no positives, Edema no negatives."""
    rng = np.random.default_rng(11)
    labels = (rng.random((N, 14)) < np.linspace(0.05, 0.5, 14)).astype(np.int16)
    labels[:, LABELS.index("Hernia")] = 0
    labels[:, LABELS.index("Edema")] = 1
    probabilities = np.clip(labels * 0.3 + rng.random((N, 14)) * 0.7, 0, 1).round(2).astype(np.float32)
    probabilities[:7, 0] = 0.5  # scores exactly at the fixed threshold
    thresholds = [float(t) for t in np.linspace(0.3, 0.7, 14).round(2)]
    demographics = _demographics(rng, N)
    model_dir = tmp_path_factory.mktemp("model")
    history = {"loss": [0.7, 0.5, 0.4], "val_loss": [0.72, 0.6, 0.55], "auroc": [0.55, 0.6, 0.7],
               "val_auroc": [0.5, 0.58, 0.61]}
    (model_dir / "model.json").write_text(json.dumps({"model_version": "m-1", "history": history}))
    url = write_predictions(spark, tmp_path_factory.mktemp("predictions") / "predictions", labels, probabilities,
                            LABELS, thresholds, demographics=demographics,
                            inputs={"model": {"url": f"file://{model_dir}", "stage": "train"}})
    return url, labels, probabilities, dict(zip(LABELS, thresholds)), demographics


@pytest.fixture(scope="module")
def evaluation(spark, predictions):
    return evaluate(spark, str(predictions[0]))


def _expected_rates(y, predicted):
    """Rates by scikit-learn; None where scikit-learn would divide by zero."""
    tn, fp, fn, tp = confusion_matrix(y, predicted, labels=[0, 1]).ravel()
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "accuracy": accuracy_score(y, predicted),
            "precision": precision_score(y, predicted, zero_division=0) if tp + fp else None,
            "recall": recall_score(y, predicted, zero_division=0) if tp + fn else None,
            "specificity": recall_score(y, predicted, pos_label=0, zero_division=0) if tn + fp else None,
            "f1": f1_score(y, predicted, zero_division=0) if tp + fp + fn else None}


def _assert_block(actual: dict, expected: dict, where: str):
    for key, value in expected.items():
        if value is None:
            assert actual[key] is None, f"{where}.{key}"
        else:
            assert actual[key] == pytest.approx(float(value), abs=1e-12), f"{where}.{key}"


def test_both_confusion_matrices_and_rates_equal_sklearn(evaluation, predictions):
    _, labels, probabilities, thresholds, _ = predictions
    metrics = evaluation.metrics
    assert metrics["n_images"] == N and metrics["labels"] == list(LABELS)
    for i, name in enumerate(LABELS):
        row, y, p = metrics["per_label"][name], labels[:, i], probabilities[:, i]
        _assert_block(row, _expected_rates(y, p >= np.float32(thresholds[name])), name)
        _assert_block(row["at_0_5"], _expected_rates(y, p >= np.float32(0.5)), f"{name}.at_0_5")
        assert row["support"] == y.sum() and row["n_distinct_scores"] == len(np.unique(p))
    # the undefined cases really occur in this data
    assert metrics["per_label"]["Hernia"]["recall"] is None and metrics["per_label"]["Edema"]["specificity"] is None


def test_auroc_and_average_precision_are_exact_with_ties(evaluation, predictions):
    _, labels, probabilities, _, _ = predictions
    for i, name in enumerate(LABELS):
        row, y, p = evaluation.metrics["per_label"][name], labels[:, i], probabilities[:, i]
        if 0 < y.sum() < len(y):
            assert row["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12), name
        else:
            assert row["auroc"] is None, name
        if y.sum():
            assert row["average_precision"] == pytest.approx(average_precision_score(y, p), abs=1e-12), name
        else:
            assert row["average_precision"] is None, name
    assert evaluation.metrics["per_label"]["Edema"]["average_precision"] == 1.0  # no negatives: every cut is pure


def test_micro_averages_equal_sklearn(evaluation, predictions):
    _, labels, probabilities, thresholds, _ = predictions
    micro = evaluation.metrics["micro"]
    for block, cut in ((micro, np.array([thresholds[n] for n in LABELS], np.float32)), (micro["at_0_5"], np.float32(0.5))):
        predicted = (probabilities >= cut).astype(int)
        assert block["tp"] == int((predicted & labels).sum()) and block["fn"] == int(((1 - predicted) & labels).sum())
        assert block["precision"] == pytest.approx(precision_score(labels, predicted, average="micro"), abs=1e-12)
        assert block["recall"] == pytest.approx(recall_score(labels, predicted, average="micro"), abs=1e-12)
        assert block["f1"] == pytest.approx(f1_score(labels, predicted, average="micro"), abs=1e-12)
        assert block["accuracy"] == pytest.approx((predicted == labels).mean(), abs=1e-12)
    assert micro["auroc"] == pytest.approx(roc_auc_score(labels, probabilities, average="micro"), abs=1e-12)
    assert micro["average_precision"] == pytest.approx(
        average_precision_score(labels, probabilities, average="micro"), abs=1e-12)


def test_macro_is_the_mean_over_defined_labels(evaluation, predictions):
    _, labels, probabilities, _, _ = predictions
    macro = evaluation.metrics["macro"]
    defined = [i for i in range(14) if 0 < labels[:, i].sum() < len(labels)]
    assert macro["auroc"] == pytest.approx(np.mean([roc_auc_score(labels[:, i], probabilities[:, i])
                                                    for i in defined]), abs=1e-12)
    assert macro["labels_with_auroc"] == len(defined) == 12
    with_positives = [i for i in range(14) if labels[:, i].sum()]
    assert macro["average_precision"] == pytest.approx(np.mean([average_precision_score(
        labels[:, i], probabilities[:, i]) for i in with_positives]), abs=1e-12)
    assert macro["labels_with_average_precision"] == 13
    f1_at_half = f1_score(labels, probabilities >= np.float32(0.5), average=None, zero_division=np.nan)
    assert macro["at_0_5"]["f1"] == pytest.approx(np.nanmean(f1_at_half), abs=1e-12)


def test_curve_points_are_sklearns_curves(evaluation, predictions):
    _, labels, probabilities, _, _ = predictions
    i = LABELS.index("Mass")
    curve = evaluation.curves["Mass"]
    fpr, tpr, roc_thresholds = roc_curve(labels[:, i], probabilities[:, i], drop_intermediate=False)
    assert np.allclose(np.r_[0, curve["fp"] / curve["negatives"]], fpr)
    assert np.allclose(np.r_[0, curve["tp"] / curve["positives"]], tpr)
    assert np.allclose(curve["scores"], roc_thresholds[1:])
    precision, recall, _ = precision_recall_curve(labels[:, i], probabilities[:, i])
    # sklearn lists ascending thresholds and appends (recall 0, precision 1)
    assert np.allclose(curve["tp"] / (curve["tp"] + curve["fp"]), precision[:-1][::-1])
    assert np.allclose(curve["tp"] / curve["positives"], recall[:-1][::-1])
    assert not curve["thinned"] and evaluation.curves["Hernia"]["positives"] == 0


def test_curves_with_more_scores_than_the_plot_limit_are_an_exact_subset(spark, predictions):
    url, labels, probabilities, _, _ = predictions
    evaluation = evaluate(spark, str(url), max_curve_points=10, summarize=False)
    i = LABELS.index("Mass")
    full = {(float(s), int(tp), int(fp)) for s, tp, fp in zip(*_running_counts(labels[:, i], probabilities[:, i]))}
    curve = evaluation.curves["Mass"]
    plotted = set(zip(curve["scores"].tolist(), curve["tp"].tolist(), curve["fp"].tolist()))
    assert curve["thinned"] and 8 <= len(plotted) <= 11 and plotted <= full
    assert (curve["tp"][-1], curve["fp"][-1]) == (labels[:, i].sum(), N - labels[:, i].sum())
    # the metrics stay exact
    assert evaluation.metrics["per_label"]["Mass"]["auroc"] == pytest.approx(
        roc_auc_score(labels[:, i], probabilities[:, i]), abs=1e-12)


def _running_counts(y, p):
    scores = np.unique(p)[::-1]
    return (scores.astype(np.float64), np.array([(y[p >= s]).sum() for s in scores]),
            np.array([(1 - y[p >= s]).sum() for s in scores]))


def _expected_summary(demographics, labels):
    frame = pd.DataFrame(demographics)
    ages = pd.to_numeric(frame["age"])
    bands = pd.cut(ages, [0, 18, 40, 60, 80, np.inf], right=False, labels=["0-17", "18-39", "40-59", "60-79", "80+"])
    return {"by_view": frame["view"].fillna("unknown").value_counts().to_dict(),
            "by_sex": frame["sex"].value_counts().to_dict(),
            "by_age_band": bands.cat.add_categories("unknown").fillna("unknown").value_counts().loc[
                lambda counts: counts > 0].to_dict(),
            "no_finding": int((labels.sum(axis=1) == 0).sum()),
            "positives_by_label": dict(zip(LABELS, labels.sum(axis=0).tolist()))}


def test_dataset_summary_equals_pandas(evaluation, predictions):
    _, labels, _, _, demographics = predictions
    summary = evaluation.metrics["dataset"]
    assert summary["by_split"] == {"test": N} and summary["demographics_from"] == "predictions"
    for key, expected in _expected_summary(demographics, labels).items():
        assert summary[key] == expected, key
    assert [age_band(a) for a in (0, 17, 18, 39, 40, 79, 80, None)] == [
        "0-17", "0-17", "18-39", "18-39", "40-59", "60-79", "80+", "unknown"]


def test_demographics_come_from_the_scored_images_dataset_when_predictions_lack_them(spark, predictions, tmp_path):
    url, labels, probabilities, thresholds, demographics = predictions
    images = tmp_path / "images_32"
    rows = [(f"{i:08d}_000.png", *(_plain(demographics[key][i]) for key in ("view", "sex", "age")))
            for i in range(N)]
    spark.createDataFrame(rows, "image_id string, view string, sex string, age int").write.parquet(str(images))
    (images / "_manifest.json").write_text(json.dumps({"counts": {"splits": {"train": 9, "val": 2, "test": N}}}))
    bare = write_predictions(spark, tmp_path / "bare", labels, probabilities, LABELS, thresholds.values(),
                             inputs={"images": {"url": f"file://{images}", "stage": "preprocess"}})
    summary = compute_metrics(spark, str(bare))["dataset"]
    assert summary["demographics_from"] == f"file://{images}"
    assert summary["images_dataset"]["splits"] == {"train": 9, "val": 2, "test": N}
    for key, expected in _expected_summary(demographics, labels).items():
        assert summary[key] == expected, key


def test_missing_probabilities_are_a_clear_error(spark, tmp_path):
    probabilities = np.full((6, 2), 0.4, np.float32)
    probabilities[3, 1] = np.nan
    url = write_predictions(spark, tmp_path / "nan", np.ones((6, 2)), probabilities, ["Mass", "Nodule"], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"NaN.*'Nodule': 1"):
        compute_metrics(spark, str(url))


def test_report_writes_metrics_json_markdown_and_html(spark, predictions, tmp_path, caplog):
    url, labels, probabilities, thresholds, _ = predictions
    with caplog.at_level("WARNING", logger="cxr_spark.stages.report.job"):
        metrics = report(spark, str(url), str(tmp_path / "report"))
    assert "Hernia.auroc" in caplog.text and "Edema.specificity" in caplog.text  # undefined, said out loud
    written = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert set(written["per_label"]["Mass"]) >= {"threshold", "tp", "fp", "tn", "fn", "accuracy", "precision",
                                                  "recall", "specificity", "f1", "auroc", "support",
                                                  "average_precision", "at_0_5"}
    assert written["per_label"]["Hernia"]["auroc"] is None and written["per_label"]["Hernia"]["recall"] is None
    assert written["micro"]["tp"] == metrics["micro"]["tp"] == sum(r["tp"] for r in written["per_label"].values())
    markdown = (tmp_path / "report" / "report.md").read_text()
    for i, name in enumerate(LABELS):  # each finding's row: its support and sklearn's confusion counts
        tn, fp, fn, tp = confusion_matrix(labels[:, i], probabilities[:, i] >= thresholds[name], labels=[0, 1]).ravel()
        assert f"| {name} | {int(labels[:, i].sum())} | {thresholds[name]:.3f} | {tp} | {fp} | {tn} | {fn} |" in markdown
    defined = [roc_auc_score(labels[:, i], probabilities[:, i]) for i in range(14) if 0 < labels[:, i].sum() < N]
    macro_row = next(line for line in markdown.splitlines() if line.startswith("| macro (mean over labels) |"))
    assert f"| {np.mean(defined):.3f} |" in macro_row  # the unweighted mean of the defined AUROCs
    # the per-finding row at the tuned threshold (support 0, then the threshold)
    hernia = next(line for line in markdown.splitlines() if line.startswith(f"| Hernia | 0 | {thresholds['Hernia']:.3f} |"))
    assert hernia.count("n/a") == 3  # recall, AUROC, AP undefined without positives
    page = (tmp_path / "report" / "report.html").read_text()
    for section in ("summary", "dataset", "metrics", "uncertainty", "operating-points", "subgroups", "calibration",
                    "curves", "confusion", "training", "baseline", "gradcam", "references"):
        assert f'<section id="{section}">' in page, section
    # ROC, PR, 2 confusion grids, training, reliability diagrams
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 6
    assert not re.search(r'(src|href)="(http|//)', page)  # nothing fetched from elsewhere
    assert "published reference, not our result" in page and "0.9248" in page
    assert f"{written['macro']['auroc']:.3f}" in page


def test_baseline_metrics_appear_beside_the_model(spark, predictions, tmp_path):
    url, labels, _, thresholds, _ = predictions
    rng = np.random.default_rng(5)
    scores = rng.random((N, 14)).round(3).astype(np.float32)
    baseline_url = write_predictions(spark, tmp_path / "features_predictions", labels, scores, LABELS,
                                     [0.5] * 14, model="logistic<regression>", version="lr&1")
    metrics = report(spark, str(url), str(tmp_path / "report"), baseline_url=str(baseline_url))
    baseline = json.loads((tmp_path / "report" / "metrics.json").read_text())["baseline"]
    assert baseline["model"]["name"] == "logistic<regression>" and baseline["image_overlap"] == {
        "only_in_model_predictions": 0, "only_in_baseline_predictions": 0}
    i = LABELS.index("Effusion")
    assert baseline["per_label"]["Effusion"]["auroc"] == pytest.approx(roc_auc_score(labels[:, i], scores[:, i]),
                                                                       abs=1e-12)
    defined = [i for i in range(14) if 0 < labels[:, i].sum() < N]  # Hernia and Edema have one class only
    assert len(defined) == 12
    assert baseline["macro"]["auroc"] == pytest.approx(np.mean([roc_auc_score(labels[:, i], scores[:, i])
                                                                for i in defined]), abs=1e-12)
    recalls = [recall_score(labels[:, i], scores[:, i] >= 0.5) for i in range(14) if labels[:, i].sum()]
    assert baseline["macro"]["recall"] == pytest.approx(np.mean(recalls), abs=1e-12)
    page = (tmp_path / "report" / "report.html").read_text()
    section = page.split('<section id="baseline">')[1].split("</section>")[0]
    assert "logistic&lt;regression&gt;" in section and "<regression>" not in page  # escaped
    assert f"{baseline['per_label']['Effusion']['auroc']:.3f}" in section
    assert f"{metrics['per_label']['Effusion']['auroc']:.3f}" in section


def test_a_baseline_with_other_labels_is_refused(spark, predictions, tmp_path):
    url = predictions[0]
    other = write_predictions(spark, tmp_path / "other", np.zeros((4, 1)), np.zeros((4, 1)), ["Mass"], [0.5])
    with pytest.raises(ValueError, match="cannot be compared"):
        report(spark, str(url), str(tmp_path / "report"), baseline_url=str(other))
    assert not (tmp_path / "report").exists()


def test_binary_task_prints_the_seed_papers_table(spark, tmp_path):
    rng = np.random.default_rng(3)
    y = (rng.random((60, 1)) < 0.6).astype(int)
    p = np.clip(y * 0.4 + rng.random((60, 1)) * 0.6, 0, 1).round(2).astype(np.float32)
    url = write_predictions(spark, tmp_path / "binary", y, p, ["Pneumonia"], [0.45], task="binary")
    metrics = report(spark, str(url), str(tmp_path / "report"))
    markdown = (tmp_path / "report" / "report.md").read_text()
    tn, fp, fn, tp = confusion_matrix(y[:, 0], p[:, 0] >= np.float32(0.45)).ravel()
    accuracy = accuracy_score(y[:, 0], p[:, 0] >= np.float32(0.45))
    assert f"| Pneumonia | 0.450 | {tn} | {fp} | {fn} | {tp} | {100 * accuracy:.2f}% |" in markdown
    assert metrics["per_label"]["Pneumonia"]["accuracy"] == pytest.approx(accuracy)
    references = markdown.split("Kaggle pneumonia")[1]
    assert f"| accuracy | 91.16% | {100 * accuracy:.2f}% |" in references


def test_the_command_line_takes_a_baseline():
    from cxr_spark.cli import args_parser

    parser = args_parser()
    args = parser.parse_args(["report", "--predictions", "p", "--out", "o", "--baseline", "features_predictions"])
    assert (args.predictions, args.out, args.baseline) == ("p", "o", "features_predictions")
    assert parser.parse_args(["report", "--predictions", "p", "--out", "o"]).baseline is None
