"""Report: metrics computed by Spark over a predictions dataset, written as ``metrics.json`` (the contract
in DESIGN.md), a readable ``report.md`` and a self-contained ``report.html``.

Every figure is exact and computed by Spark; only small per-label rows reach the driver.

- Confusion counts at the model's tuned thresholds and at 0.5 (positive when p >= t, compared at the
  probabilities' own precision).
- AUROC, ties included: scores are grouped into distinct values and, walking them from the highest
  down with a window, each positive counts the negatives scored above it plus half of those tied with
  it (the Mann-Whitney U statistic, divided by P·N).
- Average precision as scikit-learn defines it: the sum over distinct scores of (R_n - R_{n-1})·P_n,
  ties grouped, from the same running counts.
- Micro averages pool all labels: the summed confusion matrices, and AUROC/AP over the pooled
  (label, image) pairs. Macro averages are unweighted means over the labels where a value is defined.

The ROC and precision-recall curves drawn in the HTML are the running counts at each distinct score;
a label with more than ``max_curve_points`` distinct scores is drawn through an evenly spaced subset
of its exact points (said so in the report). The metrics never use the subset.

Given the images dataset and the model (``--images``, ``--model``), the report also holds Grad-CAM
heatmaps of each finding's highest-scoring images and, where bounding boxes exist, how often their peaks
fall inside them (:mod:`cxr_spark.gradcam`).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from cxr_spark.config import PipelineConfig
from cxr_spark.manifest import finish_manifest, input_version
from cxr_spark.metrics import (AGE_BANDS, COUNT_NAMES, RANKING_NAMES, THRESHOLD_RATE_NAMES, UNKNOWN,
                               macro_average, micro_counts, rates)
from cxr_spark.report_render import render_html, render_markdown
from cxr_spark.commit import atomic_output
from cxr_spark.guards import check_run
from cxr_spark.storage import read_json, to_url, write_bytes, write_json, write_text

log = logging.getLogger(__name__)

HALF = 0.5  # the fixed threshold reported beside the tuned one
MAX_CURVE_POINTS = 2000  # per label and curve, for the plots only
MICRO = -1  # the key of the pooled (micro-average) row in the ranking aggregation
DEMOGRAPHICS = ("view", "sex", "age")
SUMMARY_KEYS = ("split", "view", "sex", "age_band")
__all__ = ["compute_metrics", "evaluate", "render_markdown", "report"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", required=True, help="predictions dataset written by score")
    parser.add_argument("--out", required=True, help="report folder to write (replaced atomically)")
    parser.add_argument("--baseline", metavar="PREDICTIONS_DIR",
                        help="a second predictions dataset of the same images and labels (e.g. the MLlib "
                             "feature baseline); its metrics appear beside the CNN's in the report and under "
                             "'baseline' in metrics.json")
    from cxr_spark.gradcam import DEFAULT_MAX_BOXED, DEFAULT_TOP_K  # imports this module: not at the top

    gradcam = parser.add_argument_group(
        "Grad-CAM", "heatmaps of the highest-scoring images of each finding, saved as OUT/gradcam/<finding>/*.png "
                    "and shown in the report, with the fraction of heatmap peaks inside NIH's boxes. Computed when "
                    "--images or --model is given (the other defaults to what the predictions were scored from).")
    gradcam.add_argument("--images", help="images_<size> dataset the predictions were scored from")
    gradcam.add_argument("--model", help="model folder the predictions were scored with")
    gradcam.add_argument("--bbox", help="BBox_List_2017.csv[.gz], or the Parquet table ingest --bbox wrote "
                                        "(<raw>/_bbox or the raw dataset); default: <raw>/_bbox of the raw dataset "
                                        "behind --images, when there is one")
    gradcam.add_argument("--gradcam-top-k", type=int, default=DEFAULT_TOP_K,
                         help=f"highest-scoring images per finding to draw (default {DEFAULT_TOP_K})")
    gradcam.add_argument("--gradcam-layer", help="layer to take heatmaps from (default: the deepest spatial "
                                                 "feature map after the last convolution)")
    gradcam.add_argument("--gradcam-max-boxed", type=int, default=DEFAULT_MAX_BOXED,
                         help="boxed images per finding whose heatmap peaks are checked, the highest-scoring "
                              f"first (default {DEFAULT_MAX_BOXED})")
    parser.epilog = ("Writes OUT/metrics.json, OUT/report.md and OUT/report.html (self-contained: open it in a "
                     "browser). Per label: confusion matrices at the model's tuned threshold and at 0.5, "
                     "accuracy, precision, recall, specificity, F1, exact AUROC and average precision; macro and "
                     "micro averages; dataset summary; ROC/PR curves; training curves; Grad-CAM heatmaps; "
                     "published reference figures, marked as references.")


def check_args(args: argparse.Namespace) -> None:
    """The run's paths, before Spark starts (:func:`cxr_spark.guards.check_run`)."""
    check_run({"--predictions": args.predictions, "--baseline": args.baseline, "--images": args.images,
               "--model": args.model, "--bbox": args.bbox}, {"--out": (args.out, "report")},
              folders=("--predictions",))


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    from cxr_spark.gradcam import GradcamRequest

    request = GradcamRequest(images=args.images, model=args.model, bbox=args.bbox, top_k=args.gradcam_top_k,
                             layer=args.gradcam_layer, max_boxed=args.gradcam_max_boxed)
    return report(spark, args.predictions, args.out, baseline_url=args.baseline, gradcam=request)


@dataclass
class Evaluation:
    """One predictions dataset evaluated: the metrics (JSON-ready) and the curve points for the plots."""

    metrics: dict
    curves: dict[str, dict] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


def long_form(predictions: DataFrame, *keep: str) -> DataFrame:
    """One row per (image, label): the ``keep`` columns, ``label`` (index), ``y`` (0/1), ``p`` (the
    probability, its own type)."""
    pairs = predictions.select(*keep, F.posexplode(F.arrays_zip("labels", "probabilities")).alias("label", "pair"))
    return pairs.select(*keep, "label", F.col("pair.labels").cast("int").alias("y"),
                        F.col("pair.probabilities").alias("p"))


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


def ranking(long: DataFrame, max_curve_points: int) -> tuple[dict[int, dict], dict[int, list]]:
    """Exact AUROC and average precision per label index and for the pooled pairs (:data:`MICRO`), plus
    the curve points (score, running TP, running FP) in descending score order, at most about
    ``max_curve_points`` per label."""
    pooled = long.unionByName(long.withColumn("label", F.lit(MICRO)))
    by_score = pooled.groupBy("label", "p").agg(F.sum("y").alias("pos"), F.sum(1 - F.col("y")).alias("neg"))
    descending = Window.partitionBy("label").orderBy(F.col("p").desc())
    running = descending.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    ranked = by_score.select(
        "label", "p", "pos", "neg",
        F.sum("pos").over(running).alias("tp"), F.sum("neg").over(running).alias("fp"),
        F.row_number().over(descending).alias("rank"),
        F.count("*").over(Window.partitionBy("label")).alias("n_scores")).persist()
    try:
        summary = ranked.groupBy("label").agg(
            F.sum("pos").alias("n_pos"), F.sum("neg").alias("n_neg"), F.first("n_scores").alias("n_scores"),
            # (positive, negative) pairs in the wrong order: negatives scored above a positive, ties count half
            F.sum(F.col("pos") * (F.col("fp") - 0.5 * F.col("neg"))).alias("misordered"),
            # (R_n - R_{n-1}) * P_n summed, times P: each group adds pos * precision at its threshold
            F.sum(F.col("pos") * F.col("tp") / (F.col("tp") + F.col("fp"))).alias("ap_times_p")).collect()
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


def _undefined(per_label: dict[str, dict]) -> list[str]:
    return [f"{name}.{key}" for name, row in per_label.items() for key in (*THRESHOLD_RATE_NAMES, *RANKING_NAMES)
            if row.get(key) is None] + [f"{name}.at_0_5.{key}" for name, row in per_label.items()
                                        for key in THRESHOLD_RATE_NAMES if row["at_0_5"].get(key) is None]


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
        }
        curves[name] = _curve(points.get(index, []), rank, max_curve_points)
    pooled = ranked.get(MICRO, {})
    micro = {**micro_counts(per_label.values()), "auroc": pooled.get("auroc"),
             "average_precision": pooled.get("average_precision"),
             "at_0_5": micro_counts(row["at_0_5"] for row in per_label.values())}
    curves["micro"] = _curve(points.get(MICRO, []), pooled, max_curve_points)
    return per_label, micro, curves


def _age_band_column(age: Column) -> Column:
    """:func:`cxr_spark.metrics.age_band` as a Spark expression (the first matching band from the top)."""
    column = F.when(age.isNull() | (age < 0), F.lit(UNKNOWN))
    for low, name in reversed(AGE_BANDS):
        column = column.when(age >= low, F.lit(name))
    return column.otherwise(F.lit(UNKNOWN))


def _with_demographics(spark: SparkSession, predictions: DataFrame, manifest: dict) -> tuple[DataFrame, str | None]:
    """The predictions with view, sex and age: their own columns, else joined from the images dataset that
    was scored (found through the predictions' manifest), else unknown."""
    missing = [name for name in DEMOGRAPHICS if name not in predictions.columns]
    if not missing:
        return predictions, "predictions"
    images_url = (manifest.get("inputs") or {}).get("images", {}).get("url")
    if images_url:
        try:
            images = spark.read.parquet(images_url).select("image_id", *missing)
            return predictions.join(images, "image_id", "left"), images_url
        except AnalysisException as error:
            log.warning("dataset summary: cannot read %s from the scored images dataset %s (%s); shown as unknown",
                        ", ".join(missing), images_url, str(error).splitlines()[0])
    else:
        log.warning("dataset summary: the predictions carry no %s and their manifest names no images dataset; "
                    "shown as unknown", ", ".join(missing))
    return predictions.select("*", *[F.lit(None).alias(name) for name in missing]), None


def dataset_summary(spark: SparkSession, predictions: DataFrame, manifest: dict, per_label: dict[str, dict]) -> dict:
    """Images by split, view, sex and age band, images with no finding, and positives per label: one
    grouped Spark job whose few rows are added up on the driver."""
    frame, source = _with_demographics(spark, predictions, manifest)
    keyed = frame.select(
        F.coalesce(F.col("split"), F.lit(UNKNOWN)).alias("split"),
        F.coalesce(F.col("view").cast("string"), F.lit(UNKNOWN)).alias("view"),
        F.coalesce(F.col("sex").cast("string"), F.lit(UNKNOWN)).alias("sex"),
        _age_band_column(F.col("age")).alias("age_band"),
        (F.coalesce(F.array_max("labels"), F.lit(0)) == 0).alias("no_finding"))
    rows = keyed.groupBy(*SUMMARY_KEYS, "no_finding").count().collect()
    summary: dict = {f"by_{key}": {} for key in SUMMARY_KEYS}
    for row in rows:
        for key in SUMMARY_KEYS:
            table = summary[f"by_{key}"]
            table[row[key]] = table.get(row[key], 0) + row["count"]
    band_order = [name for _, name in AGE_BANDS] + [UNKNOWN]
    summary["by_age_band"] = {name: summary["by_age_band"][name] for name in band_order if name in summary["by_age_band"]}
    for key in ("split", "view", "sex"):
        summary[f"by_{key}"] = dict(sorted(summary[f"by_{key}"].items()))
    summary["no_finding"] = sum(row["count"] for row in rows if row["no_finding"])
    summary["positives_by_label"] = {name: row["support"] for name, row in per_label.items()}
    summary["demographics_from"] = source
    images_url = (manifest.get("inputs") or {}).get("images", {}).get("url")
    summary["images_dataset"] = _dataset_splits(spark, images_url) if images_url else None
    return summary


def _dataset_splits(spark: SparkSession, url: str) -> dict | None:
    """The whole scored images dataset's images per split, from its own manifest (None if unreadable)."""
    try:
        counts = read_json(spark, f"{url}/_manifest.json").get("counts", {})
    except (OSError, ValueError, AnalysisException):
        log.warning("dataset summary: no readable manifest in the images dataset %s", url)
        return None
    return {"url": url, "splits": counts.get("splits")}


def training_history(spark: SparkSession, manifest: dict) -> dict | None:
    """The training history in the scored model's ``model.json`` (found through the predictions' manifest)."""
    model_url = (manifest.get("inputs") or {}).get("model", {}).get("url")
    if not model_url:
        return None
    try:
        card = read_json(spark, f"{model_url}/model.json")
    except (OSError, ValueError, AnalysisException):
        log.warning("training curves: no readable model.json in %s", model_url)
        return None
    return {"model_dir": model_url, "history": card.get("history") or {}, "model_version": card.get("model_version")}


def evaluate(spark: SparkSession, predictions_url: str, max_curve_points: int = MAX_CURVE_POINTS,
             summarize: bool = True) -> Evaluation:
    """The metrics contract for one predictions dataset, computed by Spark, plus the plot curves."""
    url = to_url(predictions_url)
    manifest = read_json(spark, f"{url}/_manifest.json")
    model = manifest["model"]
    labels = model["labels"]
    predictions = spark.read.parquet(url)
    n_images = predictions.count()
    per_label, micro, curves = label_metrics(predictions, labels, [model["thresholds"][name] for name in labels],
                                             max_curve_points)
    undefined = _undefined(per_label) + [f"micro.{key}" for key in RANKING_NAMES if micro[key] is None]
    if undefined:
        log.warning("%s: undefined (a zero denominator, or no positives or no negatives), reported as null: %s",
                    url, ", ".join(undefined))
    macro = macro_average(per_label.values())
    macro["at_0_5"] = macro_average((row["at_0_5"] for row in per_label.values()), THRESHOLD_RATE_NAMES)
    metrics = {
        "task": model["task"],
        "labels": labels,
        "n_images": n_images,
        "split": (manifest.get("counts") or {}).get("split"),
        "per_label": per_label,
        "macro": macro,
        "micro": micro,
        "model": {"name": model["model"], "version": model["model_version"], "input_size": model["input_size"]},
        "predictions": url,
    }
    if summarize:
        metrics["dataset"] = dataset_summary(spark, predictions, manifest, per_label)
    return Evaluation(metrics, curves, manifest)


def compute_metrics(spark: SparkSession, predictions_url: str) -> dict:
    """The metrics contract for one predictions dataset, computed by Spark."""
    return evaluate(spark, predictions_url).metrics


def _compare_images(spark: SparkSession, first_url: str, second_url: str) -> dict:
    """How many image ids only one of two predictions datasets holds (one join; counts only)."""
    first = spark.read.parquet(first_url).select("image_id", F.lit(True).alias("in_first"))
    second = spark.read.parquet(second_url).select("image_id", F.lit(True).alias("in_second"))
    row = first.join(second, "image_id", "full_outer").agg(
        F.sum(F.col("in_second").isNull().cast("long")).alias("only_first"),
        F.sum(F.col("in_first").isNull().cast("long")).alias("only_second")).first()
    return {"only_in_model_predictions": int(row["only_first"] or 0),
            "only_in_baseline_predictions": int(row["only_second"] or 0)}


def report(spark: SparkSession, predictions_url: str, out: str, baseline_url: str | None = None,
           max_curve_points: int = MAX_CURVE_POINTS, gradcam=None) -> dict:
    """Write ``metrics.json``, ``report.md`` and ``report.html`` for a predictions dataset (and, with
    ``baseline_url``, a second one shown beside it; with ``gradcam``, a
    :class:`cxr_spark.gradcam.GradcamRequest`, Grad-CAM overlays in ``gradcam/``); returns the metrics."""
    from cxr_spark import gradcam as gradcam_module  # imports this module: not at the top
    from cxr_spark.plots import report_figures  # matplotlib only when a report is drawn

    started = time.time()
    evaluation = evaluate(spark, predictions_url, max_curve_points)
    metrics = evaluation.metrics
    history = training_history(spark, evaluation.manifest)
    inputs = {"predictions": input_version(spark, metrics["predictions"])}
    baseline = None
    if baseline_url:
        baseline = evaluate(spark, baseline_url, max_curve_points, summarize=False)
        if baseline.metrics["labels"] != metrics["labels"]:
            raise ValueError(f"baseline {baseline.metrics['predictions']} scores labels {baseline.metrics['labels']} "
                             f"but {metrics['predictions']} scores {metrics['labels']}; they cannot be compared")
        comparison = _compare_images(spark, metrics["predictions"], baseline.metrics["predictions"])
        if any(comparison.values()):
            log.warning("baseline and model predictions cover different images: %s", comparison)
        metrics["baseline"] = {**baseline.metrics, "image_overlap": comparison}
        inputs["baseline"] = input_version(spark, baseline.metrics["predictions"])
    explained = gradcam_module.run(spark, metrics["predictions"], evaluation.manifest, gradcam)
    metrics["gradcam"] = explained.summary
    inputs.update({f"gradcam_{key}": input_version(spark, url) for key, url in explained.inputs.items()})
    figures = report_figures(metrics, evaluation.curves, baseline.curves if baseline else None,
                             history["history"] if history else None)
    figures.update(explained.overlays)
    training = {key: history[key] for key in ("model_dir", "model_version")} if history else None
    with atomic_output(spark, out, "report") as tmp:
        write_json(spark, f"{tmp}/metrics.json", metrics)
        write_text(spark, f"{tmp}/report.md", render_markdown(metrics))
        write_text(spark, f"{tmp}/report.html", render_html(metrics, figures, training, max_curve_points))
        for path, data in explained.overlays.items():
            write_bytes(f"{tmp}/{path}", data)
        finish_manifest(spark, tmp, "report", started, inputs=inputs,
                        config={"max_curve_points": max_curve_points,
                                "gradcam": dataclasses.asdict(gradcam) if gradcam else None},
                        counts={"n_images": metrics["n_images"], "macro_auroc": metrics["macro"]["auroc"],
                                "gradcam_overlays": len(explained.overlays)})
    return metrics
