"""The clinical evaluation computed by Spark equals an independent single-machine computation (scikit-learn,
numpy, pandas) on the same predictions joined to the scored images' attributes: operating points, calibration
bins, ECE and Brier, subgroup AUROCs, supports, sensitivities and specificities, the gaps and the summary;
the bootstrap intervals agree with a plain numpy patient bootstrap within sampling error."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import brier_score_loss, roc_auc_score, roc_curve
from test_report import write_predictions

from cxr_spark.core.metrics import age_band
from cxr_spark.stages.report.job import Bootstrap, evaluate, report

NAMES = ["Atelectasis", "Effusion", "Mass"]
PATIENTS, IMAGES_PER_PATIENT, LONE_IMAGES = 60, 6, 12


@pytest.fixture(scope="module")
def clustered(spark, tmp_path_factory):
    """Patients whose images share their findings and most of their scores (so resampling patients and
    resampling images give clearly different intervals), a few images with no patient id (three of them the
    only 80+ images), and the attributes only in the images dataset (sex and age per patient, view per image)."""
    rng = np.random.default_rng(5)
    n = PATIENTS * IMAGES_PER_PATIENT + LONE_IMAGES
    patient = np.r_[np.repeat(np.arange(PATIENTS), IMAGES_PER_PATIENT), np.full(LONE_IMAGES, -1)]
    patient_labels = (rng.random((PATIENTS + 1, 3)) < [0.35, 0.5, 0.2]).astype(int)
    patient_scores = rng.random((PATIENTS + 1, 3))
    labels = patient_labels[patient]
    labels[-LONE_IMAGES:] = (rng.random((LONE_IMAGES, 3)) < 0.4).astype(int)
    scores = np.clip(0.25 * labels + 0.6 * patient_scores[patient] + 0.15 * rng.random((n, 3)), 0, 1)
    scores = scores.round(3).astype(np.float32)  # ties
    scores[:20, 0] = 0.5
    sex = np.array(["M", "F"])[rng.integers(0, 2, PATIENTS + 1)][patient]
    age = rng.integers(5, 80, PATIENTS + 1)[patient]
    age[-3:] = 85  # the 80+ band: three lone images, too few for its AUROC to count in a gap
    labels[-3:, 0] = [1, 0, 0]
    view = np.array(["PA", "AP", "LL"])[rng.integers(0, 3, n)]  # LL is no listed group: left out of the tables
    ids = [f"{i:08d}_000.png" for i in range(n)]
    folder = tmp_path_factory.mktemp("clinical")
    attributes = pd.DataFrame({"image_id": ids, "patient_id": [None if p < 0 else int(p) for p in patient],
                               "view": view, "sex": sex, "age": age.astype(int)})
    rows = list(zip(ids, [None if p < 0 else int(p) for p in patient], view.tolist(), sex.tolist(),
                    [int(a) for a in age]))
    spark.createDataFrame(rows, "image_id string, patient_id int, view string, sex string, age int"
                          ).write.parquet(str(folder / "images"))
    thresholds = [0.45, 0.5, 0.4]
    url = write_predictions(spark, folder / "predictions", labels, scores, NAMES, thresholds,
                            inputs={"images": {"url": f"file://{folder / 'images'}", "stage": "preprocess"}})
    metrics = evaluate(spark, str(url), bootstrap=Bootstrap(1000, 3)).metrics
    frame = attributes.assign(labels=list(labels), scores=list(scores))
    return metrics, frame, labels, scores, thresholds


def test_operating_points_equal_sklearn_roc_points(clustered):
    metrics, _, labels, scores, _ = clustered
    for i, name in enumerate(NAMES):
        fpr, tpr, thresholds = roc_curve(labels[:, i], scores[:, i], drop_intermediate=False)
        points = metrics["per_label"][name]["operating_points"]
        for target in (0.90, 0.95):
            # sensitivity at specificity >= target: the highest TPR, first (highest threshold) among ties
            meets = np.flatnonzero(1 - fpr >= target)
            best = meets[np.argmax(tpr[meets])]
            point = points[f"sensitivity_at_specificity_{target:.2f}"]
            assert point["sensitivity"] == pytest.approx(tpr[best], abs=1e-12)
            assert point["specificity"] == pytest.approx(1 - fpr[best], abs=1e-12)
            assert point["threshold"] == (None if np.isinf(thresholds[best]) else float(thresholds[best]))
            meets = np.flatnonzero(tpr >= target)
            best = meets[np.argmax(1 - fpr[meets])]
            point = points[f"specificity_at_sensitivity_{target:.2f}"]
            assert (point["threshold"], point["sensitivity"]) == (float(thresholds[best]), pytest.approx(tpr[best]))
            assert point["specificity"] == pytest.approx(1 - fpr[best], abs=1e-12)


def test_calibration_bins_ece_and_brier_equal_numpy(clustered):
    metrics, _, labels, scores, _ = clustered
    edges = np.linspace(0, 1, 11)
    for i, name in enumerate(NAMES):
        p, y = scores[:, i].astype(np.float64), labels[:, i]
        n, _ = np.histogram(p, edges)  # numpy's bins: [a, b) and the last [a, b]
        sum_p, _ = np.histogram(p, edges, weights=p)
        sum_y, _ = np.histogram(p, edges, weights=y)
        calibration = metrics["per_label"][name]["calibration"]
        assert [b["n"] for b in calibration["bins"]] == n.tolist() and n.sum() == len(p)
        assert np.allclose([(b["lower"], b["upper"]) for b in calibration["bins"]], np.c_[edges[:-1], edges[1:]])
        for row, count, total_p, total_y in zip(calibration["bins"], n, sum_p, sum_y):
            if count:
                assert row["mean_probability"] == pytest.approx(total_p / count, abs=1e-12)
                assert row["fraction_positive"] == pytest.approx(total_y / count, abs=1e-12)
            else:
                assert row["mean_probability"] is None and row["fraction_positive"] is None
        filled = n > 0
        ece = np.sum(n[filled] / len(p) * np.abs(sum_y[filled] / n[filled] - sum_p[filled] / n[filled]))
        assert calibration["ece"] == pytest.approx(ece, abs=1e-12)
        assert calibration["brier"] == pytest.approx(brier_score_loss(y, p), abs=1e-12)


def test_subgroups_equal_sklearn_on_the_joined_attributes(clustered):
    metrics, frame, labels, scores, thresholds = clustered
    frame = frame.assign(age_band=[age_band(int(a)) for a in frame["age"]])
    groups = {"sex": ["M", "F"], "view": ["PA", "AP"], "age_band": ["0-17", "18-39", "40-59", "60-79", "80+"]}
    assert {a: list(g) for a, g in metrics["subgroups"].items()} == groups
    for attribute, names in groups.items():
        for group in names:
            rows = (frame[attribute] == group).to_numpy()
            got = metrics["subgroups"][attribute][group]
            assert got["n_images"] == rows.sum()
            aurocs = []
            for i, name in enumerate(NAMES):
                y, p = labels[rows, i], scores[rows, i]
                cell = got["per_label"][name]
                predicted = p >= np.float32(thresholds[i])
                assert cell["support"] == y.sum()
                if 0 < y.sum() < len(y):
                    aurocs.append(roc_auc_score(y, p))
                    assert cell["auroc"] == pytest.approx(aurocs[-1], abs=1e-12)
                else:
                    assert cell["auroc"] is None
                assert cell["sensitivity"] == (pytest.approx((predicted & (y == 1)).sum() / y.sum())
                                               if y.sum() else None)
                assert cell["specificity"] == (pytest.approx((~predicted & (y == 0)).sum() / (y == 0).sum())
                                               if (y == 0).sum() else None)
            assert got["macro_auroc"] == (pytest.approx(np.mean(aurocs)) if aurocs else None)
    for attribute, names in groups.items():
        for name in NAMES:
            # groups with at least 5 positives and 5 negatives for the finding, counted from the joined frame
            i = NAMES.index(name)
            enough = [g for g in names if min(labels[(frame[attribute] == g).to_numpy(), i].sum(),
                                              (1 - labels[(frame[attribute] == g).to_numpy(), i]).sum()) >= 5]
            aurocs = {g: metrics["subgroups"][attribute][g]["per_label"][name]["auroc"] for g in enough}
            gap = metrics["subgroup_gaps"][attribute][name]
            if len(aurocs) < 2:
                assert gap is None
                continue
            assert gap["groups_compared"] == len(aurocs)
            assert gap["gap"] == pytest.approx(max(aurocs.values()) - min(aurocs.values()))
            assert aurocs[gap["highest"]] == max(aurocs.values()) and aurocs[gap["lowest"]] == min(aurocs.values())


def _numpy_bootstrap(units: np.ndarray, labels: np.ndarray, scores: np.ndarray, replicates: int, seed: int):
    """Draw units with replacement; per replicate each finding's AUROC (scikit-learn) and their mean."""
    rng = np.random.default_rng(seed)
    distinct = np.unique(units)
    members = [np.flatnonzero(units == unit) for unit in distinct]
    per_label, macro = [], []
    for _ in range(replicates):
        rows = np.concatenate([members[k] for k in rng.integers(0, len(distinct), len(distinct))])
        aurocs = [roc_auc_score(labels[rows, i], scores[rows, i]) if 0 < labels[rows, i].sum() < len(rows)
                  else np.nan for i in range(labels.shape[1])]
        per_label.append(aurocs)
        macro.append(np.nanmean(aurocs))
    per_label = np.array(per_label)
    return ([np.nanpercentile(per_label[:, i], [2.5, 97.5]) for i in range(labels.shape[1])],
            np.percentile(macro, [2.5, 97.5]))


def test_bootstrap_resamples_patients_and_agrees_with_numpy_within_sampling_error(clustered):
    metrics, frame, labels, scores, _ = clustered
    units = np.array([f"p{p}" if p is not None else f"i{i}" for i, p in zip(frame["image_id"], frame["patient_id"])])
    by_patient, macro = _numpy_bootstrap(units, labels, scores, 1000, 1)
    by_image, _ = _numpy_bootstrap(frame["image_id"].to_numpy(), labels, scores, 1000, 1)
    for i, name in enumerate(NAMES):
        ours, theirs = np.array(metrics["per_label"][name]["auroc_ci"]), by_patient[i]
        width = theirs[1] - theirs[0]
        assert ours[0] < metrics["per_label"][name]["auroc"] < ours[1]
        # Monte Carlo error of a 2.5% percentile over 1,000 replicates is a few percent of the width
        assert np.abs(ours - theirs).max() < 0.15 * width, (name, ours, theirs)
        # resampling images would ignore that a patient's images move together: a much narrower interval
        assert by_image[i][1] - by_image[i][0] < 0.7 * width
    assert np.abs(np.array(metrics["macro"]["auroc_ci"]) - macro).max() < 0.15 * (macro[1] - macro[0])
    assert {key: value for key, value in metrics["bootstrap"].items() if key != "replicates_used"} == {
        "replicates": 1000, "seed": 3, "unit": "patient", "confidence": 0.95, "units": PATIENTS + LONE_IMAGES}
    # every finding has positives and negatives in every replicate of 72 units here
    assert metrics["bootstrap"]["replicates_used"] == {**{name: 1000 for name in NAMES}, "macro": 1000}
    assert metrics["n_patients"] == PATIENTS


def test_bootstrap_is_seeded(spark, clustered):
    metrics = clustered[0]
    again = evaluate(spark, metrics["predictions"], bootstrap=Bootstrap(1000, 3)).metrics
    other = evaluate(spark, metrics["predictions"], bootstrap=Bootstrap(1000, 4)).metrics
    assert again["macro"]["auroc_ci"] == metrics["macro"]["auroc_ci"]
    assert other["macro"]["auroc_ci"] != metrics["macro"]["auroc_ci"]


def test_report_opens_with_a_summary_of_the_independent_figures(spark, clustered, tmp_path):
    metrics, _, labels, scores, _ = clustered
    written = report(spark, metrics["predictions"], str(tmp_path / "report"), bootstrap=Bootstrap(200, 0))
    on_disk = json.loads((tmp_path / "report" / "metrics.json").read_text())
    summary = on_disk["summary"]
    aurocs = {name: roc_auc_score(labels[:, i], scores[:, i]) for i, name in enumerate(NAMES)}
    assert summary["best_finding"]["name"] == max(aurocs, key=aurocs.get)
    assert summary["worst_finding"]["name"] == min(aurocs, key=aurocs.get)
    assert summary["macro_auroc"] == pytest.approx(np.mean(list(aurocs.values())))
    assert summary["macro_auroc_ci"] == written["macro"]["auroc_ci"] and summary["n_patients"] == PATIENTS
    eces = {name: row["calibration"]["ece"] for name, row in on_disk["per_label"].items()}
    assert summary["worst_calibrated"] == {"name": max(eces, key=eces.get), "ece": max(eces.values())}
    gaps = [(gap["gap"], attribute, name) for attribute, rows in on_disk["subgroup_gaps"].items()
            for name, gap in rows.items() if gap]
    largest = max(gaps)
    assert (summary["largest_gap"]["attribute"], summary["largest_gap"]["finding"]) == largest[1:]
