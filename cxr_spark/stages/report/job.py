"""Report: metrics computed by Spark over a predictions dataset, written as ``metrics.json`` (the contract
in DESIGN.md), a readable ``report.md`` and a self-contained ``report.html``.

Every figure is exact and computed by Spark (:mod:`cxr_spark.datasets.predictions` says how); only
small per-label rows reach the driver. Macro averages are unweighted means over the labels where a value
is defined.

Given the images dataset and the model (``--images-dataset``, ``--model``), the report also holds Grad-CAM
heatmaps of each finding's highest-scoring images and, where bounding boxes exist, how often their peaks
fall inside them (:mod:`cxr_spark.stages.report.gradcam`).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass, field

from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from cxr_spark.cli_flags import deprecated_alias, nonnegative_int, positive_int
from cxr_spark.config import PipelineConfig
from cxr_spark.core.guards import check_input, check_run
from cxr_spark.core.metrics import AGE_BANDS, RANKING_NAMES, THRESHOLD_RATE_NAMES, UNKNOWN, macro_average
from cxr_spark.datasets.manifest import finish_manifest, input_version
from cxr_spark.datasets.model_card import MODEL_CARD
from cxr_spark.datasets.predictions import MAX_CURVE_POINTS, label_metrics
from cxr_spark.io.commit import atomic_output
from cxr_spark.io.storage import read_json, to_url, write_bytes, write_json, write_text
from cxr_spark.io.tracking import log_test_metrics
from cxr_spark.stages.report import clinical
from cxr_spark.stages.report.render import render_html, render_markdown

log = logging.getLogger(__name__)

DEMOGRAPHICS = ("view", "sex", "age")
ATTRIBUTES = {"patient_id": "int", "view": "string", "sex": "string", "age": "int"}  # joined from the images
SUMMARY_KEYS = ("split", "view", "sex", "age_band")
__all__ = ["compute_metrics", "evaluate", "render_markdown", "report"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", required=True,
                        help="predictions dataset written by score (or features --baseline-out)")
    parser.add_argument("--out", required=True, help="report folder to write (replaced atomically)")
    parser.add_argument("--baseline", metavar="PREDICTIONS_DIR",
                        help="a second predictions dataset of the same images and labels (e.g. the MLlib "
                             "feature baseline); its metrics appear beside the CNN's in the report and under "
                             "'baseline' in metrics.json")
    parser.add_argument("--bootstrap-replicates", type=positive_int, default=clinical.DEFAULT_REPLICATES,
                        metavar="R", help="patient-bootstrap replicates of the 95%% AUROC intervals (default "
                                          f"{clinical.DEFAULT_REPLICATES})")
    parser.add_argument("--bootstrap-seed", type=nonnegative_int, default=clinical.DEFAULT_SEED,
                        help=f"seed of the bootstrap's resampling (default {clinical.DEFAULT_SEED})")
    from cxr_spark.stages.report.gradcam import DEFAULT_MAX_BOXED, DEFAULT_TOP_K  # imports this module: not at the top

    gradcam = parser.add_argument_group(
        "Grad-CAM", "heatmaps of the highest-scoring images of each finding, saved as OUT/gradcam/<finding>/*.png "
                    "and shown in the report, with the fraction of heatmap peaks inside NIH's boxes. Computed when "
                    "--images-dataset or --model is given (the other defaults to what the predictions were scored "
                    "from).")
    gradcam.add_argument("--images-dataset", dest="images",
                         help="images_<size> dataset the predictions were scored from")
    deprecated_alias(parser, "--images", "--images-dataset")
    gradcam.add_argument("--model", help="model folder the predictions were scored with")
    gradcam.add_argument("--bbox", help="BBox_List_2017.csv[.gz], or the Parquet table ingest --bbox wrote "
                                        "(<raw>/_bbox or the raw dataset); default: <raw>/_bbox of the raw dataset "
                                        "behind --images-dataset, when there is one")
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


PREDICTIONS_KINDS = ("score", "features-baseline")  # manifest stages of the predictions a report reads


def check_args(args: argparse.Namespace) -> None:
    """Before Spark starts: the inputs are of their kinds and the paths safe (:mod:`cxr_spark.core.guards`)."""
    check_input("report", "--predictions", args.predictions, PREDICTIONS_KINDS)
    check_input("report", "--baseline", args.baseline, PREDICTIONS_KINDS)
    check_input("report", "--images-dataset", args.images, ("preprocess",))
    check_input("report", "--model", args.model, ("train",), needs=MODEL_CARD)
    check_run({"--predictions": args.predictions, "--baseline": args.baseline, "--images-dataset": args.images,
               "--model": args.model, "--bbox": args.bbox}, {"--out": (args.out, "report")})


def settings(args: argparse.Namespace, config: PipelineConfig) -> dict[str, dict]:
    """The run's settings (report has no conf section: its flags), as ``--print-config`` shows them."""
    return {"report": {"max_curve_points": MAX_CURVE_POINTS, "bootstrap_replicates": args.bootstrap_replicates,
                       "bootstrap_seed": args.bootstrap_seed, "gradcam_top_k": args.gradcam_top_k,
                       "gradcam_layer": args.gradcam_layer, "gradcam_max_boxed": args.gradcam_max_boxed}}


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    from cxr_spark.stages.report.gradcam import GradcamRequest

    run = settings(args, config)["report"]
    request = GradcamRequest(images=args.images, model=args.model, bbox=args.bbox, top_k=run["gradcam_top_k"],
                             layer=run["gradcam_layer"], max_boxed=run["gradcam_max_boxed"])
    return report(spark, args.predictions, args.out, baseline_url=args.baseline,
                  max_curve_points=run["max_curve_points"], gradcam=request,
                  bootstrap=Bootstrap(run["bootstrap_replicates"], run["bootstrap_seed"]))


@dataclass
class Evaluation:
    """One predictions dataset evaluated: the metrics (JSON-ready) and the curve points for the plots."""

    metrics: dict
    curves: dict[str, dict] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


def _undefined(per_label: dict[str, dict]) -> list[str]:
    return [f"{name}.{key}" for name, row in per_label.items() for key in (*THRESHOLD_RATE_NAMES, *RANKING_NAMES)
            if row.get(key) is None] + [f"{name}.at_0_5.{key}" for name, row in per_label.items()
                                        for key in THRESHOLD_RATE_NAMES if row["at_0_5"].get(key) is None]


def _age_band_column(age: Column) -> Column:
    """:func:`cxr_spark.core.metrics.age_band` as a Spark expression (the first matching band from the top)."""
    column = F.when(age.isNull() | (age < 0), F.lit(UNKNOWN))
    for low, name in reversed(AGE_BANDS):
        column = column.when(age >= low, F.lit(name))
    return column.otherwise(F.lit(UNKNOWN))


def with_attributes(spark: SparkSession, predictions: DataFrame, manifest: dict) -> tuple[DataFrame, str | None]:
    """The predictions with patient_id, view, sex, age and age_band: their own columns, else joined from the
    images dataset that was scored (found through the predictions' manifest), else unknown (null); and where
    view, sex and age came from."""
    missing = [name for name in ATTRIBUTES if name not in predictions.columns]
    source = "predictions" if all(name in predictions.columns for name in DEMOGRAPHICS) else None
    images_url = (manifest.get("inputs") or {}).get("images", {}).get("url")
    frame = predictions
    if missing and images_url:
        try:
            images = spark.read.parquet(images_url)
            joined = [name for name in missing if name in images.columns]
            frame = predictions.join(images.select("image_id", *joined), "image_id", "left")
            missing = [name for name in missing if name not in joined]
            source = source or images_url
        except AnalysisException as error:
            log.warning("cannot read %s from the scored images dataset %s (%s); shown as unknown",
                        ", ".join(missing), images_url, str(error).splitlines()[0])
    if [name for name in missing if name in DEMOGRAPHICS]:
        log.warning("the predictions carry no %s and no images dataset they name holds them; shown as unknown",
                    ", ".join(name for name in missing if name in DEMOGRAPHICS))
    frame = frame.select("*", *[F.lit(None).cast(ATTRIBUTES[name]).alias(name) for name in missing])
    return frame.withColumn("age_band", _age_band_column(F.col("age"))), source


def dataset_summary(spark: SparkSession, frame: DataFrame, source: str | None, manifest: dict,
                    per_label: dict[str, dict]) -> dict:
    """Images by split, view, sex and age band, images with no finding, and positives per label: one
    grouped Spark job whose few rows are added up on the driver (``frame``: :func:`with_attributes`)."""
    keyed = frame.select(
        F.coalesce(F.col("split"), F.lit(UNKNOWN)).alias("split"),
        F.coalesce(F.col("view").cast("string"), F.lit(UNKNOWN)).alias("view"),
        F.coalesce(F.col("sex").cast("string"), F.lit(UNKNOWN)).alias("sex"),
        F.col("age_band"),
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
    return {"model_dir": model_url, "history": card.get("history") or {}, "model_version": card.get("model_version"),
            "card": {key: card[key] for key in MODEL_CARD_FACTS if key in card}}


#: What the report's model card repeats from ``model.json``: how the model was trained, from what, and where it
#: is tracked.
MODEL_CARD_FACTS = ("best_epoch", "best_val_loss", "ended", "data", "code_version", "libraries", "command", "mlflow")


@dataclass(frozen=True)
class Bootstrap:
    """How the AUROC intervals are resampled (:func:`cxr_spark.stages.report.clinical.bootstrap`)."""

    replicates: int = clinical.DEFAULT_REPLICATES
    seed: int = clinical.DEFAULT_SEED


def evaluate(spark: SparkSession, predictions_url: str, max_curve_points: int = MAX_CURVE_POINTS,
             summarize: bool = True, bootstrap: Bootstrap = Bootstrap()) -> Evaluation:
    """The metrics contract for one predictions dataset, computed by Spark, plus the plot curves; with
    ``summarize``, the dataset summary and the clinical evaluation too."""
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
        frame, source = with_attributes(spark, predictions, manifest)
        frame = frame.select("image_id", "split", "labels", "probabilities", *ATTRIBUTES, "age_band").persist()
        try:
            metrics["dataset"] = dataset_summary(spark, frame, source, manifest, per_label)
            _clinical(spark, frame, metrics, [model["thresholds"][name] for name in labels], bootstrap)
        finally:
            frame.unpersist()
    return Evaluation(metrics, curves, manifest)


def _clinical(spark: SparkSession, frame: DataFrame, metrics: dict, thresholds: list[float],
              resampling: Bootstrap) -> None:
    """Add the bootstrap intervals, calibration, subgroups and their gaps to ``metrics``
    (:mod:`cxr_spark.stages.report.clinical`)."""
    labels, per_label = metrics["labels"], metrics["per_label"]
    intervals = clinical.bootstrap(spark, frame, labels, resampling.replicates, resampling.seed,
                                   macro_of=[name for name in labels if per_label[name]["auroc"] is not None])
    for name, interval in intervals["per_label"].items():
        per_label[name]["auroc_ci"] = interval
    metrics["macro"]["auroc_ci"] = intervals["macro"]
    metrics["bootstrap"], metrics["n_patients"] = intervals["bootstrap"], intervals["n_patients"]
    for name, row in clinical.calibration(frame, labels).items():
        per_label[name]["calibration"] = row
    score_type = frame.schema["probabilities"].dataType.elementType.simpleString()
    metrics["subgroups"] = clinical.subgroups(frame, labels, thresholds, score_type)
    metrics["subgroup_gaps"] = clinical.subgroup_gaps(metrics["subgroups"], labels)


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
           max_curve_points: int = MAX_CURVE_POINTS, gradcam=None, bootstrap: Bootstrap = Bootstrap()) -> dict:
    """Write ``metrics.json``, ``report.md`` and ``report.html`` for a predictions dataset (and, with
    ``baseline_url``, a second one shown beside it; with ``gradcam``, a
    :class:`cxr_spark.stages.report.gradcam.GradcamRequest`, Grad-CAM overlays in ``gradcam/``); returns the metrics."""
    from cxr_spark.core.plots import report_figures  # matplotlib only when a report is drawn
    from cxr_spark.stages.report import gradcam as gradcam_module  # imports this module: not at the top

    started = time.time()
    evaluation = evaluate(spark, predictions_url, max_curve_points, bootstrap=bootstrap)
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
    if history:
        metrics["model_card"] = history["card"]
        metrics["data"] = history["card"].get("data", "unknown")
    scored = (evaluation.manifest.get("inputs") or {}).get("images") or {}
    metrics["summary"] = clinical.summary(metrics, scored.get("data") or evaluation.manifest.get("data"))
    with atomic_output(spark, out, "report") as tmp:
        write_json(spark, f"{tmp}/metrics.json", metrics)
        write_text(spark, f"{tmp}/report.md", render_markdown(metrics))
        write_text(spark, f"{tmp}/report.html", render_html(metrics, figures, training, max_curve_points))
        for path, data in explained.overlays.items():
            write_bytes(f"{tmp}/{path}", data)
        finish_manifest(spark, tmp, "report", started, inputs=inputs,
                        config={"max_curve_points": max_curve_points,
                                "gradcam": dataclasses.asdict(gradcam) if gradcam else None,
                                "bootstrap": dataclasses.asdict(bootstrap)},
                        counts={"n_images": metrics["n_images"], "macro_auroc": metrics["macro"]["auroc"],
                                "gradcam_overlays": len(explained.overlays)})
    record = (metrics.get("model_card") or {}).get("mlflow")
    if record:  # the evaluation on the training run; the report stands without it
        try:
            log_test_metrics(record, metrics, prefix=metrics.get("split") or "test")
        except Exception as error:  # noqa: BLE001 - a tracking store that cannot be reached is reported, not fatal
            log.warning("report: could not log the metrics to MLflow run %s: %s", record.get("run_id"), error)
    return metrics
