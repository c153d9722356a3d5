"""Report: confusion-matrix metrics computed by Spark over a predictions dataset, written as
``metrics.json`` (the contract in DESIGN.md) and a readable ``report.md``.

AUROC is exact, ties included: for each label, scores are grouped into distinct values, and each
positive at score s counts the negatives below s plus half of those tied at s (the Mann-Whitney U
statistic divided by P·N). Only one small row per label reaches the driver.
"""
from __future__ import annotations

import argparse
import logging
import time

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from cxr_spark.config import PipelineConfig
from cxr_spark.manifest import finish_manifest, input_version
from cxr_spark.metrics import macro_average, rates
from cxr_spark.storage import atomic_output, read_json, to_url, write_json, write_text

log = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", required=True, help="predictions dataset written by score")
    parser.add_argument("--out", required=True, help="report folder to write (replaced atomically)")


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    return report(spark, args.predictions, args.out)


def label_metrics(predictions: DataFrame, labels: list[str], thresholds: list[float]) -> list[dict]:
    """Per-label confusion counts at ``thresholds`` (positive when p >= t) and exact AUROC, by Spark."""
    pairs = predictions.select(F.posexplode(F.arrays_zip("labels", "probabilities")).alias("label", "pair"))
    long = pairs.select("label", F.col("pair.labels").cast("int").alias("y"),
                        F.col("pair.probabilities").cast("float").alias("p"))
    # Thresholds are applied at the probabilities' own (float32) precision: 0.39f >= 0.39 must hold.
    threshold = F.element_at(F.array(*[F.lit(float(t)).cast("float") for t in thresholds]), F.col("label") + 1)
    predicted = F.col("p") >= threshold
    counts = long.groupBy("label").agg(
        F.sum((predicted & (F.col("y") == 1)).cast("long")).alias("tp"),
        F.sum((predicted & (F.col("y") == 0)).cast("long")).alias("fp"),
        F.sum((~predicted & (F.col("y") == 0)).cast("long")).alias("tn"),
        F.sum((~predicted & (F.col("y") == 1)).cast("long")).alias("fn"))
    by_score = long.groupBy("label", "p").agg(F.sum("y").alias("pos"), F.sum(1 - F.col("y")).alias("neg"))
    below = Window.partitionBy("label").orderBy("p").rowsBetween(Window.unboundedPreceding, -1)
    ranked = by_score.withColumn("neg_below", F.coalesce(F.sum("neg").over(below), F.lit(0)))
    auroc = ranked.groupBy("label").agg(
        F.sum(F.col("pos") * (F.col("neg_below") + 0.5 * F.col("neg"))).alias("u"),
        F.sum("pos").alias("n_pos"), F.sum("neg").alias("n_neg"))
    rows = {row["label"]: row for row in counts.join(auroc, "label").collect()}
    per_label = []
    for index, name in enumerate(labels):
        row = rows.get(index)
        tp, fp, tn, fn = (int(row[k]) if row else 0 for k in ("tp", "fp", "tn", "fn"))
        defined = row is not None and row["n_pos"] > 0 and row["n_neg"] > 0
        per_label.append({
            "label": name, "threshold": float(thresholds[index]), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            **rates(tp, fp, tn, fn),
            "auroc": float(row["u"]) / (row["n_pos"] * row["n_neg"]) if defined else None,
            "support": tp + fn,
        })
    return per_label


def compute_metrics(spark: SparkSession, predictions_url: str) -> dict:
    """The metrics contract for one predictions dataset, computed by Spark."""
    url = to_url(predictions_url)
    manifest = read_json(spark, f"{url}/_manifest.json")
    model = manifest["model"]
    labels = model["labels"]
    predictions = spark.read.parquet(url)
    n_images = predictions.count()
    per_label = label_metrics(predictions, labels, [model["thresholds"][name] for name in labels])
    undefined = [row["label"] for row in per_label if row["auroc"] is None]
    if undefined:
        log.warning("AUROC undefined (no positives or no negatives) for: %s", ", ".join(undefined))
    return {
        "task": model["task"],
        "labels": labels,
        "n_images": n_images,
        "split": manifest["counts"].get("split"),
        "per_label": {row.pop("label"): row for row in per_label},
        "macro": macro_average(per_label),
        "model": {"name": model["model"], "version": model["model_version"], "input_size": model["input_size"]},
        "predictions": url,
    }


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def render_markdown(metrics: dict) -> str:
    """A readable report: per-label confusion counts and rates, then the macro averages."""
    lines = [
        f"# cxr-spark evaluation: {metrics['model']['name']} ({metrics['model']['version']})",
        "",
        f"{metrics['n_images']} images of split `{metrics['split']}`, task `{metrics['task']}`, "
        f"input {metrics['model']['input_size']}px. Counts computed by Spark over `{metrics['predictions']}`.",
        "",
        "| finding | support | threshold | TP | FP | TN | FN | accuracy | precision | recall | specificity | F1 | AUROC |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in metrics["per_label"].items():
        cells = [row[k] for k in ("support", "threshold", "tp", "fp", "tn", "fn", "accuracy", "precision",
                                  "recall", "specificity", "f1", "auroc")]
        lines.append(f"| {name} | " + " | ".join(_fmt(c) for c in cells) + " |")
    macro = metrics["macro"]
    lines.append("| **macro** | | | | | | | " + " | ".join(
        f"**{_fmt(macro[k])}**" for k in ("accuracy", "precision", "recall", "specificity", "f1", "auroc")) + " |")
    lines += ["", "`n/a`: undefined (a zero denominator, or no positives or no negatives for AUROC).", ""]
    return "\n".join(lines)


def report(spark: SparkSession, predictions_url: str, out: str) -> dict:
    """Write ``metrics.json`` and ``report.md`` for a predictions dataset; returns the metrics."""
    started = time.time()
    metrics = compute_metrics(spark, predictions_url)
    with atomic_output(spark, out) as tmp:
        write_json(spark, f"{tmp}/metrics.json", metrics)
        write_text(spark, f"{tmp}/report.md", render_markdown(metrics))
        finish_manifest(spark, tmp, "report", started, config={},
                        inputs={"predictions": input_version(spark, metrics["predictions"])},
                        counts={"n_images": metrics["n_images"], "macro_auroc": metrics["macro"]["auroc"]})
    return metrics

