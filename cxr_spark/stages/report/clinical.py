"""What a clinical team asks of an evaluation beyond the exact per-finding metrics: how sure the AUROCs are
(a patient bootstrap), how the model does per subgroup (sex, view, age band), how calibrated its
probabilities are, and, built from these, the figures a reader sees first. Computed by Spark over the
predictions joined to the scored images' attributes; only per-label, per-group or per-bin rows reach the driver.

- **Bootstrap.** Each replicate weighs every resampling unit (a patient; an image whose patient is unknown)
  by a Poisson(1) count, the usual large-sample stand-in for drawing units with replacement, drawn by numpy
  from (seed, replicate) over the units in the order of their keys: the same draw for every finding, whatever
  the partitioning. Spark tasks (the findings spread over them by label, all of a finding's rows in one)
  compute each finding's replicate AUROCs (the weighted Mann-Whitney statistic); Spark takes the 2.5th and
  97.5th percentile (linear interpolation) over the replicates where the finding has weighted positives and
  negatives, and the same percentiles of each replicate's mean AUROC over the findings the macro averages,
  in the replicates where all of them are defined; ``bootstrap.replicates_used`` counts both.
- **Subgroups.** Per attribute and group, per finding: exact AUROC (ties half), support, and sensitivity and
  specificity at the model's tuned threshold (positive when p >= t, at the probabilities' own precision). A
  finding's gap compares the groups with at least :data:`GAP_MIN_CASES` positives and negatives for it.
- **Calibration.** The Brier score, mean (p - y)², and the expected calibration error over the 10 equal-width
  bins of :mod:`cxr_spark.core.histograms`: sum over bins of (n_bin / n) · |fraction positive - mean probability|.
"""
from __future__ import annotations

from statistics import fmean

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from cxr_spark.core.histograms import BINS, bin_edges
from cxr_spark.core.metrics import AGE_BANDS
from cxr_spark.datasets.predictions import bin_column, long_form, misordered_pairs, running_counts

#: The attributes and groups of the subgroup tables, in the order shown. Other values (unknown) are left out.
SUBGROUPS: dict[str, tuple[str, ...]] = {"sex": ("M", "F"), "view": ("PA", "AP"),
                                          "age_band": tuple(name for _, name in AGE_BANDS)}
DEFAULT_REPLICATES = 1000
DEFAULT_SEED = 0
CONFIDENCE = 0.95
GAP_MIN_CASES = 5  # positives and negatives a group needs for its AUROC to count in a subgroup gap


def unit_column(frame: DataFrame) -> tuple[Column, str]:
    """The bootstrap's resampling unit of each image, and its kind: ``"patient"`` when the images carry patient
    ids (an image without one is its own unit), else ``"image"``."""
    if "patient_id" in frame.columns and frame.where(F.col("patient_id").isNotNull()).limit(1).count():
        return (F.coalesce(F.concat(F.lit("p"), F.col("patient_id").cast("string")),
                           F.concat(F.lit("i"), F.col("image_id"))), "patient")
    return F.concat(F.lit("i"), F.col("image_id")), "image"


def replicate_aurocs(units: np.ndarray, y: np.ndarray, p: np.ndarray, n_units: int, replicates: int,
                     seed: int) -> np.ndarray:
    """One finding's AUROC in each replicate (NaN where it has no weighted positives or negatives): unit ``k`` of
    ``n_units`` weighs ``poisson(1)`` drawn by ``numpy.random.default_rng([seed, replicate])``, the same draw for
    every finding. The weighted Mann-Whitney statistic over distinct scores, ties counting half."""
    _, score = np.unique(p, return_inverse=True)  # ascending distinct scores
    positive = y.astype(bool)
    n_scores = int(score.max()) + 1 if len(score) else 0
    aurocs = np.full(replicates, np.nan)
    for replicate in range(replicates):
        weights = np.random.default_rng([seed, replicate]).poisson(1.0, n_units)[units].astype(np.float64)
        pos = np.bincount(score[positive], weights[positive], n_scores)
        neg = np.bincount(score[~positive], weights[~positive], n_scores)
        total_pos, total_neg = pos.sum(), neg.sum()
        if total_pos and total_neg:
            below = np.cumsum(neg) - neg  # negatives scored strictly lower
            aurocs[replicate] = float(np.sum(pos * (below + 0.5 * neg)) / (total_pos * total_neg))
    return aurocs


def bootstrap(spark: SparkSession, frame: DataFrame, labels: list[str], replicates: int = DEFAULT_REPLICATES,
              seed: int = DEFAULT_SEED, macro_of: list[str] | None = None) -> dict:
    """Percentile intervals of each finding's AUROC and of the macro AUROC (the mean over ``macro_of``, by default
    every finding, in the replicates where each of them is defined) over ``replicates`` resamplings of patients
    (:func:`unit_column`): ``{"per_label": {L: [lo, hi] | None}, "macro": [lo, hi] | None, "bootstrap": {...,
    "replicates_used": {L: n, "macro": n}}, "n_patients": int | None}``. Spark tasks, the findings spread over
    them by label, compute each finding's replicates (:func:`replicate_aurocs`); Spark takes the percentiles."""
    unit, kind = unit_column(frame)
    patient = F.col("patient_id") if "patient_id" in frame.columns else F.lit(None).cast("int")
    counted = frame.agg(F.countDistinct(unit).alias("units"), F.countDistinct(patient).alias("patients")).first()
    n_units = int(counted["units"])
    # units numbered in the order of their keys: the draw depends on neither the partitioning nor the row order
    # (a sorted RDD's zipWithIndex: a window over the whole frame would pull it into one partition)
    ordered = frame.select(unit.alias("unit")).distinct().orderBy("unit").rdd.zipWithIndex()
    numbered = spark.createDataFrame(ordered.map(lambda pair: (pair[0][0], pair[1])), "unit string, u long")
    long = long_form(frame.select(unit.alias("unit"), "labels", "probabilities"), "unit").join(numbered, "unit")

    def per_finding(rows: pd.DataFrame) -> pd.DataFrame:
        rows = rows.sort_values(["u", "p"], kind="stable")
        aurocs = replicate_aurocs(rows["u"].to_numpy(), rows["y"].to_numpy(), rows["p"].to_numpy(), n_units,
                                  replicates, seed)
        return pd.DataFrame({"label": int(rows["label"].iloc[0]), "replicate": np.arange(replicates),
                             "auroc": aurocs}).dropna()

    per_replicate = (long.select("label", "u", "y", F.col("p").cast("double").alias("p"))
                     .repartition(len(labels), "label").groupBy("label")
                     .applyInPandas(per_finding, "label int, replicate int, auroc double")).persist()
    low, high = (1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2
    bounds = F.expr(f"percentile(auroc, array({low}, {high}))")
    try:
        rows = per_replicate.groupBy("label").agg(bounds.alias("ci"), F.count("*").alias("n")).collect()
        members = [labels.index(name) for name in (labels if macro_of is None else macro_of)]
        macro = (per_replicate.where(F.col("label").isin(members)).groupBy("replicate")
                 .agg(F.avg("auroc").alias("auroc"), F.count("*").alias("n")).where(F.col("n") == len(members))
                 .agg(bounds.alias("ci"), F.count("*").alias("n")).first()) if members else None
    finally:
        per_replicate.unpersist()
    intervals = {row["label"]: list(row["ci"]) if row["ci"] else None for row in rows}
    used = {labels[row["label"]]: int(row["n"]) for row in rows}
    return {"per_label": {name: intervals.get(index) for index, name in enumerate(labels)},
            "macro": list(macro["ci"]) if macro and macro["ci"] else None,
            "bootstrap": {"replicates": replicates, "seed": seed, "unit": kind, "confidence": CONFIDENCE,
                          "units": n_units, "replicates_used": {**{name: used.get(name, 0) for name in labels},
                                                                "macro": int(macro["n"]) if macro else 0}},
            "n_patients": int(counted["patients"]) if kind == "patient" else None}


def calibration(frame: DataFrame, labels: list[str]) -> dict[str, dict]:
    """Per finding: Brier score, expected calibration error and the 10 bins (one grouped Spark job)."""
    long = long_form(frame)
    p = F.col("p").cast("double")
    rows = long.groupBy("label", bin_column(p).alias("bin")).agg(
        F.count("*").alias("n"), F.sum(p).alias("sum_p"), F.sum("y").alias("sum_y"),
        F.sum((p - F.col("y")) ** 2).alias("sum_squares")).collect()
    cells = {(row["label"], row["bin"]): row for row in rows}
    result = {}
    for index, name in enumerate(labels):
        bins, n_total, squares, gap = [], 0, 0.0, 0.0
        for b, (lower, upper) in enumerate(bin_edges(bins=BINS)):
            row = cells.get((index, b))
            n = int(row["n"]) if row else 0
            mean_p = row["sum_p"] / n if n else None
            positive = row["sum_y"] / n if n else None
            if n:
                n_total, squares = n_total + n, squares + row["sum_squares"]
                gap += n * abs(positive - mean_p)
            bins.append({"lower": lower, "upper": upper, "n": n, "mean_probability": mean_p,
                         "fraction_positive": positive})
        result[name] = {"brier": squares / n_total if n_total else None, "ece": gap / n_total if n_total else None,
                        "bins": bins}
    return result


def _groups(frame: DataFrame) -> DataFrame:
    """One row per image and attribute it has a listed group for: ``attribute``, ``group`` and the image."""
    pairs = F.array(*[F.struct(F.lit(name).alias("attribute"), F.col(name).cast("string").alias("group"))
                      for name in SUBGROUPS])
    exploded = frame.select("labels", "probabilities", F.explode(pairs).alias("pair"))
    listed = F.lit(False)
    for name, groups in SUBGROUPS.items():
        listed = listed | ((F.col("pair.attribute") == name) & F.col("pair.group").isin(*groups))
    return exploded.where(listed).select("pair.attribute", "pair.group", "labels", "probabilities")


def subgroups(frame: DataFrame, labels: list[str], thresholds: list[float], score_type: str) -> dict:
    """``{attribute: {group: {"n_images", "macro_auroc", "per_label": {L: {"auroc", "support", "sensitivity",
    "specificity"}}}}}`` for :data:`SUBGROUPS` (``frame`` has ``sex``, ``view`` and ``age_band``): one Spark job."""
    long = long_form(_groups(frame), "attribute", "group")
    counts = running_counts(long, ("attribute", "group", "label"))
    threshold = F.element_at(F.array(*[F.lit(float(t)).cast(score_type) for t in thresholds]), F.col("label") + 1)
    predicted = F.col("p") >= threshold
    rows = counts.groupBy("attribute", "group", "label").agg(
        F.sum("pos").alias("P"), F.sum("neg").alias("N"), misordered_pairs().alias("misordered"),
        F.sum(F.when(predicted, F.col("pos")).otherwise(0)).alias("tp"),
        F.sum(F.when(~predicted, F.col("neg")).otherwise(0)).alias("tn")).collect()
    cells = {(row["attribute"], row["group"], row["label"]): row for row in rows}
    result: dict = {}
    for attribute, groups in SUBGROUPS.items():
        result[attribute] = {}
        for group in groups:
            per_label, n_images = {}, 0
            for index, name in enumerate(labels):
                row = cells.get((attribute, group, index))
                positives, negatives = (int(row["P"]), int(row["N"])) if row else (0, 0)
                n_images = max(n_images, positives + negatives)
                per_label[name] = {
                    "auroc": 1 - row["misordered"] / (positives * negatives) if positives and negatives else None,
                    "support": positives,
                    "sensitivity": row["tp"] / positives if positives else None,
                    "specificity": row["tn"] / negatives if negatives else None}
            defined = [row["auroc"] for row in per_label.values() if row["auroc"] is not None]
            result[attribute][group] = {"n_images": n_images, "macro_auroc": fmean(defined) if defined else None,
                                        "per_label": per_label}
    return result


def subgroup_gaps(groups: dict, labels: list[str], min_cases: int = GAP_MIN_CASES) -> dict:
    """Per attribute and finding, the largest AUROC difference between its groups with at least ``min_cases``
    positives and as many negatives for the finding (a group of three images has an AUROC, but its gap to the
    others says little); None with fewer than two such groups."""
    gaps: dict = {}
    for attribute, by_group in groups.items():
        gaps[attribute] = {}
        for name in labels:
            cells = {group: (row["per_label"][name], row["n_images"]) for group, row in by_group.items()}
            aurocs = {group: cell["auroc"] for group, (cell, n_images) in cells.items()
                      if cell["auroc"] is not None and min(cell["support"], n_images - cell["support"]) >= min_cases}
            if len(aurocs) < 2:
                gaps[attribute][name] = None
                continue
            highest, lowest = max(aurocs, key=aurocs.get), min(aurocs, key=aurocs.get)
            gaps[attribute][name] = {"gap": aurocs[highest] - aurocs[lowest], "highest": highest, "lowest": lowest,
                                     "groups_compared": len(aurocs)}
    return gaps


def summary(metrics: dict, scored_data: str | None = None) -> dict:
    """What the report opens with, from the metrics already computed (no Spark); ``scored_data``: what the
    scored images were made from (synthetic, real), else the model's training data."""
    aurocs = {name: row["auroc"] for name, row in metrics["per_label"].items() if row["auroc"] is not None}
    eces = {name: row["calibration"]["ece"] for name, row in metrics["per_label"].items()
            if (row.get("calibration") or {}).get("ece") is not None}
    gaps = [{"attribute": attribute, "finding": name, **gap}
            for attribute, by_label in (metrics.get("subgroup_gaps") or {}).items()
            for name, gap in by_label.items() if gap]
    best = max(aurocs, key=aurocs.get) if aurocs else None
    worst = min(aurocs, key=aurocs.get) if aurocs else None
    worst_calibrated = max(eces, key=eces.get) if eces else None
    return {"model": f"{metrics['model']['name']} ({metrics['model']['version']})",
            "data": scored_data or metrics.get("data", "unknown"), "n_images": metrics["n_images"],
            "n_patients": metrics.get("n_patients"), "macro_auroc": metrics["macro"]["auroc"],
            "macro_auroc_ci": metrics["macro"].get("auroc_ci"),
            "best_finding": {"name": best, "auroc": aurocs[best]} if best else None,
            "worst_finding": {"name": worst, "auroc": aurocs[worst]} if worst else None,
            "largest_gap": max(gaps, key=lambda gap: gap["gap"]) if gaps else None,
            "worst_calibrated": {"name": worst_calibrated, "ece": eces[worst_calibrated]} if worst_calibrated else None}
