"""A predictions dataset (``score``'s, the features baseline's): its columns, and the per-label metrics of
one, computed by Spark so that only small per-label rows reach the driver.

- Confusion counts at the model's tuned thresholds and at 0.5 (positive when p >= t, compared at the
  probabilities' own precision).
- AUROC, ties included: scores are grouped into distinct values and, walking them from the highest
  down with a window, each positive counts the negatives scored above it plus half of those tied with
  it (the Mann-Whitney U statistic, divided by P·N).
- Average precision as scikit-learn defines it: the sum over distinct scores of (R_n - R_{n-1})·P_n,
  ties grouped, from the same running counts.
- Micro averages pool all labels: the summed confusion matrices, and AUROC/AP over the pooled
  (label, image) pairs.

- Decision thresholds tuned for the best F1 (:func:`tuned_thresholds`), from the same running counts.

The ROC and precision-recall curves are the running counts at each distinct score; a label with more
than ``max_curve_points`` distinct scores is drawn through an evenly spaced subset of its exact points.
The metrics never use the subset.
"""
from __future__ import annotations

import numpy as np
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from cxr_spark.core.histograms import BINS
from cxr_spark.core.metrics import COUNT_NAMES, DEFAULT_THRESHOLD, micro_counts, rates

# view, sex and age ride along for the report's dataset summary (no names or other identifying fields).
PREDICTIONS_DDL = ("image_id string, split string, labels array<smallint>, probabilities array<float>, "
                   "view string, sex string, age int")

HALF = 0.5  # the fixed threshold reported beside the tuned one
MAX_CURVE_POINTS = 2000  # per label and curve, for the plots only
MICRO = -1  # the key of the pooled (micro-average) row in the ranking aggregation


def bin_column(value: Column, low: float = 0.0, high: float = 1.0, bins: int = BINS) -> Column:
    """:func:`cxr_spark.core.histograms.bin_index` as a Spark expression (in double, clipped into the bins)."""
    scaled = F.floor((value.cast("double") - F.lit(float(low))) * F.lit(float(bins)) / F.lit(float(high - low)))
    return F.least(F.greatest(scaled, F.lit(0)), F.lit(bins - 1)).cast("int")


def long_form(predictions: DataFrame, *keep: str) -> DataFrame:
    """One row per (image, label): the ``keep`` columns, ``label`` (index), ``y`` (0/1), ``p`` (the
    probability, its own type)."""
    pairs = predictions.select(*keep, F.posexplode(F.arrays_zip("labels", "probabilities")).alias("label", "pair"))
    return pairs.select(*keep, "label", F.col("pair.labels").cast("int").alias("y"),
                        F.col("pair.probabilities").alias("p"))


def running_counts(long: DataFrame, keys: tuple[str, ...] = ("label",), weight: Column | None = None) -> DataFrame:
    """One row per ``keys`` (by default the label) and distinct score ``p``: its positives and negatives (``pos``,
    ``neg``; each row counts ``weight``, default 1), the running ``tp`` and ``fp`` from the highest score down to
    it (ties taken whole), and its ``rank`` in that order."""
    weight = F.lit(1) if weight is None else weight
    by_score = long.groupBy(*keys, "p").agg(F.sum(weight * F.col("y")).alias("pos"),
                                            F.sum(weight * (1 - F.col("y"))).alias("neg"))
    descending = Window.partitionBy(*keys).orderBy(F.col("p").desc())
    running = descending.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    return by_score.select(*keys, "p", "pos", "neg", F.sum("pos").over(running).alias("tp"),
                           F.sum("neg").over(running).alias("fp"), F.row_number().over(descending).alias("rank"))


def misordered_pairs() -> Column:
    """Summed over a label's :func:`running_counts` rows: its (positive, negative) pairs in the wrong order, the
    negatives scored above each positive, ties counting half (AUROC = 1 - this / (P·N), Mann-Whitney)."""
    return F.sum(F.col("pos") * (F.col("fp") - 0.5 * F.col("neg")))


def tuned_thresholds(long: DataFrame, n_labels: int) -> tuple[list[float], int]:
    """:func:`cxr_spark.core.metrics.tune_threshold` of each of ``n_labels`` labels of ``long`` (rows of
    :func:`long_form`), computed by Spark so that one row per label reaches the driver; and the images
    they were tuned on.

    Each distinct score is a candidate (positive when p >= t); F1 there is 2·TP / (predicted positives +
    positives), from running counts in descending score order, ties taken whole. The highest threshold
    of the best F1 wins. A label without both classes gets :data:`DEFAULT_THRESHOLD`.
    """
    whole = Window.partitionBy("label")
    counted = running_counts(long).select(
        "label", F.col("p").cast("double").alias("p"), "tp", (F.col("tp") + F.col("fp")).alias("predicted"),
        F.sum("pos").over(whole).alias("positives"), F.sum(F.col("pos") + F.col("neg")).over(whole).alias("images"))
    f1 = 2 * F.col("tp") / (F.col("predicted") + F.col("positives"))
    rows = counted.groupBy("label", "positives", "images").agg(
        F.max(F.struct(f1.alias("f1"), F.col("p"))).alias("best")).collect()  # ties of F1: the highest p
    thresholds = [DEFAULT_THRESHOLD] * n_labels
    for row in rows:
        if 0 < row["positives"] < row["images"]:
            thresholds[row["label"]] = row["best"]["p"]
    return thresholds, max((row["images"] for row in rows), default=0)


def _confusion(prefix: str, predicted: Column) -> list[Column]:
    positive, negative = F.col("y") == 1, F.col("y") == 0
    cells = {"tp": predicted & positive, "fp": predicted & negative, "tn": ~predicted & negative,
             "fn": ~predicted & positive}
    return [F.sum(cells[name].cast("long")).alias(prefix + name) for name in COUNT_NAMES]


def confusion_counts(long: DataFrame, labels: list[str], thresholds: list[float], score_type: str) -> dict[int, dict]:
    """Per label index: confusion counts at ``thresholds`` and at 0.5 (``half_`` prefix), one Spark job.

    Raises ValueError naming the label when a probability is missing or NaN or a label is not 0/1.
    """
    # Thresholds are applied at the probabilities' own precision: 0.39f >= 0.39 must hold for float scores.
    threshold = F.element_at(F.array(*[F.lit(float(t)).cast(score_type) for t in thresholds]), F.col("label") + 1)
    invalid = F.col("p").isNull() | F.isnan("p") | F.col("y").isNull() | ~F.col("y").isin(0, 1)
    rows = long.groupBy("label").agg(*_confusion("", F.col("p") >= threshold),
                                     *_confusion("half_", F.col("p") >= F.lit(HALF).cast(score_type)),
                                     F.sum(invalid.cast("long")).alias("invalid")).collect()
    bad = {labels[row["label"]] if 0 <= row["label"] < len(labels) else f"#{row['label']}": row["invalid"]
           for row in rows if row["invalid"] or not 0 <= row["label"] < len(labels)}
    if bad:
        raise ValueError(f"predictions hold missing/NaN probabilities, labels other than 0/1, or arrays whose length "
                         f"is not {len(labels)} (the model's labels); rows per label: {bad}")
    return {row["label"]: row.asDict() for row in rows}


#: The operating points a clinical team asks for: name -> (the rate that must reach the target, the target).
OPERATING_POINTS = {"sensitivity_at_specificity_0.90": ("specificity", 0.90),
                    "sensitivity_at_specificity_0.95": ("specificity", 0.95),
                    "specificity_at_sensitivity_0.90": ("sensitivity", 0.90),
                    "specificity_at_sensitivity_0.95": ("sensitivity", 0.95)}


def _operating_point_columns() -> list[Column]:
    """Per label, over its exact ROC points (:func:`running_counts` rows with ``n_pos``/``n_neg``): for each of
    :data:`OPERATING_POINTS`, the best point meeting the target, ties to the highest threshold. Meeting a
    specificity, the most true positives; meeting a sensitivity, the fewest false positives."""
    sensitivity = F.col("tp") / F.col("n_pos")
    specificity = 1 - F.col("fp") / F.col("n_neg")
    p = F.col("p").cast("double")
    columns = []
    for name, (rate, target) in OPERATING_POINTS.items():
        meets, key = (specificity, F.col("tp")) if rate == "specificity" else (sensitivity, -F.col("fp"))
        point = F.struct(key.alias("key"), p.alias("p"), F.col("tp").alias("tp"), F.col("fp").alias("fp"))
        columns.append(F.max(F.when(meets >= target, point)).alias(name))  # distinct p: the key, then p decides
    return columns


def _operating_points(row, n_pos: int, n_neg: int) -> dict[str, dict]:
    """:data:`OPERATING_POINTS` as metrics.json holds them. Calling nothing positive (threshold ``None``,
    sensitivity 0, specificity 1) is the highest threshold of all: a specificity target only it meets, or whose
    best sensitivity is 0, gives it. Without positives or negatives every value is ``None``."""
    points = {}
    for name, (rate, _target) in OPERATING_POINTS.items():
        point = {"threshold": None, "sensitivity": None, "specificity": None}
        found = row[name]
        if n_pos and n_neg:
            if found is None or (rate == "specificity" and found["key"] == 0):
                point.update(sensitivity=0.0, specificity=1.0)
            else:
                point.update(threshold=found["p"], sensitivity=found["tp"] / n_pos,
                             specificity=1 - found["fp"] / n_neg)
        points[name] = point
    return points


def ranking(long: DataFrame, max_curve_points: int) -> tuple[dict[int, dict], dict[int, list]]:
    """Exact AUROC and average precision per label index and for the pooled pairs (:data:`MICRO`), plus
    the curve points (score, running TP, running FP) in descending score order, at most about
    ``max_curve_points`` per label."""
    pooled = long.unionByName(long.withColumn("label", F.lit(MICRO)))
    whole = Window.partitionBy("label")
    ranked = running_counts(pooled).select("*", F.count("*").over(whole).alias("n_scores"),
                                           F.sum("pos").over(whole).alias("n_pos"),
                                           F.sum("neg").over(whole).alias("n_neg")).persist()
    try:
        summary = ranked.groupBy("label").agg(
            F.first("n_pos").alias("n_pos"), F.first("n_neg").alias("n_neg"), F.first("n_scores").alias("n_scores"),
            misordered_pairs().alias("misordered"),
            # (R_n - R_{n-1}) * P_n summed, times P: each group adds pos * precision at its threshold
            F.sum(F.col("pos") * F.col("tp") / (F.col("tp") + F.col("fp"))).alias("ap_times_p"),
            *_operating_point_columns()).collect()
        # Plot points: every exact point up to max_curve_points, else an evenly spaced subset of them (and the last).
        step_changes = (F.floor(F.col("rank") * max_curve_points / F.col("n_scores"))
                        != F.floor((F.col("rank") - 1) * max_curve_points / F.col("n_scores")))
        points = ranked.where(step_changes | (F.col("rank") == F.col("n_scores"))).select(
            "label", "rank", F.col("p").cast("double").alias("p"), "tp", "fp").collect()
    finally:
        ranked.unpersist()
    results = {}
    for row in summary:
        n_pos, n_neg = int(row["n_pos"]), int(row["n_neg"])
        results[row["label"]] = {
            "positives": n_pos, "negatives": n_neg, "n_distinct_scores": int(row["n_scores"]),
            "auroc": 1.0 - row["misordered"] / (n_pos * n_neg) if n_pos and n_neg else None,
            "average_precision": row["ap_times_p"] / n_pos if n_pos else None,
            "operating_points": _operating_points(row, n_pos, n_neg),
        }
    curves: dict[int, list] = {}
    for row in sorted(points, key=lambda r: (r["label"], r["rank"])):
        curves.setdefault(row["label"], []).append((row["p"], int(row["tp"]), int(row["fp"])))
    return results, curves


def _curve(points: list, ranked: dict, max_curve_points: int) -> dict:
    scores, tp, fp = (np.array(column) for column in zip(*points)) if points else (np.zeros(0),) * 3
    return {"scores": scores, "tp": tp, "fp": fp, "positives": ranked.get("positives", 0),
            "negatives": ranked.get("negatives", 0), "n_distinct_scores": ranked.get("n_distinct_scores", 0),
            "thinned": ranked.get("n_distinct_scores", 0) > max_curve_points}


def label_metrics(predictions: DataFrame, labels: list[str], thresholds: list[float],
                  max_curve_points: int = MAX_CURVE_POINTS) -> tuple[dict[str, dict], dict, dict[str, dict]]:
    """Per-label metrics, the micro averages and the curve points of one predictions DataFrame, by Spark."""
    score_type = predictions.schema["probabilities"].dataType.elementType.simpleString()
    long = long_form(predictions)
    counts = confusion_counts(long, labels, thresholds, score_type)
    ranked, points = ranking(long, max_curve_points)
    per_label, curves = {}, {}
    for index, name in enumerate(labels):
        row = counts.get(index, {})
        tuned = {key: int(row.get(key) or 0) for key in COUNT_NAMES}
        half = {key: int(row.get("half_" + key) or 0) for key in COUNT_NAMES}
        rank = ranked.get(index, {})
        per_label[name] = {
            "threshold": float(thresholds[index]), **tuned, **rates(**tuned),
            "auroc": rank.get("auroc"), "average_precision": rank.get("average_precision"),
            "support": tuned["tp"] + tuned["fn"], "n_distinct_scores": rank.get("n_distinct_scores", 0),
            "at_0_5": {"threshold": HALF, **half, **rates(**half)},
            "operating_points": rank.get("operating_points"),
        }
        curves[name] = _curve(points.get(index, []), rank, max_curve_points)
    pooled = ranked.get(MICRO, {})
    micro = {**micro_counts(per_label.values()), "auroc": pooled.get("auroc"),
             "average_precision": pooled.get("average_precision"),
             "at_0_5": micro_counts(row["at_0_5"] for row in per_label.values())}
    curves["micro"] = _curve(points.get(MICRO, []), pooled, max_curve_points)
    return per_label, micro, curves
