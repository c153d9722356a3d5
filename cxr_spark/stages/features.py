"""Features stage: the ``features`` dataset (one :func:`~cxr_spark.core.image_features.image_features` vector
per image of ``images_<size>``) and a Spark MLlib logistic-regression baseline on it.

The arithmetic lives in :mod:`cxr_spark.core.image_features`; this module only runs it over Arrow batches,
writes the dataset and fits the baseline.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
import time
from multiprocessing.pool import ThreadPool

import numpy as np
import pandas as pd
from pyspark import inheritable_thread_target
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cxr_spark.cli_flags import conf_default
from cxr_spark.config import FeaturesConfig, PipelineConfig, override
from cxr_spark.core.guards import UsageError, check_input, check_run
from cxr_spark.core.image_features import (FEATURE_NAMES, LUNG_COLUMNS, LUNG_ROWS, MEDIASTINUM_COLUMNS, image_features,
                                           lung_regions)
from cxr_spark.core.labels import LABELS
from cxr_spark.core.metrics import DEFAULT_THRESHOLD, macro_average
from cxr_spark.datasets.fields import decode_column
from cxr_spark.datasets.images import images_schema
from cxr_spark.datasets.manifest import code_version, finish_manifest, input_version
from cxr_spark.datasets.predictions import PREDICTIONS_DDL, label_metrics, long_form, tuned_thresholds
from cxr_spark.io.commit import atomic_output, settle
from cxr_spark.io.storage import read_json, to_url

log = logging.getLogger(__name__)
FEATURES_DDL = "image_id string, split string, labels array<smallint>, features array<double>"
BASELINE_MODEL = "mllib_logistic_regression"
MLLIB_FOLDER = "_mllib"  # inside the baseline predictions folder; Spark's readers skip "_" names
TRAIN_SPLIT, THRESHOLD_SPLIT, EVAL_SPLIT = "train", "val", "test"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="input", required=True, help="images_<size> dataset (written by preprocess or ingest --images-out)")
    parser.add_argument("--out", required=True, help="features dataset to write (replaced atomically)")
    parser.add_argument("--baseline-out", help="also train the MLlib baseline (one logistic regression per "
                                               "finding) on train, tune thresholds on val, and write its test "
                                               "predictions here, in score's format, with the fitted "
                                               f"models in {MLLIB_FOLDER}/ (replaced atomically)")
    parser.add_argument("--max-iter", type=int, help=f"logistic regression iterations {conf_default('features', 'max_iter')}")
    parser.add_argument("--reg-param", type=float, help=f"L2 regularisation of the baseline {conf_default('features', 'reg_param')}")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write the output even when the input has no image (by default such a run fails and leaves --out as "
                             "it was)")


def check_args(args: argparse.Namespace) -> None:
    """Before Spark starts: the input is an images dataset and the paths safe (:mod:`cxr_spark.core.guards`)."""
    check_input("features", "--in", args.input, ("preprocess",))
    check_run({"--in": args.input}, {"--out": (args.out, "features"),
                                     "--baseline-out": (args.baseline_out, "features-baseline")})


def settings(args: argparse.Namespace, config: PipelineConfig) -> FeaturesConfig:
    """The run's settings: conf's [features] with the flags given (what ``--print-config`` shows)."""
    return override(config.features, max_iter=args.max_iter, reg_param=args.reg_param)


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    return features(spark, args.input, args.out, settings(args, config), baseline_out=args.baseline_out,
                    allow_empty=args.allow_empty)


def _features_partition(size: int):
    """The mapInPandas function: PNG-encoded images in, one feature array per image out."""
    schema = images_schema(size)

    def compute(batches):
        for frame in batches:
            images = decode_column(schema, "image", frame["image"])
            for image_id, image in zip(frame["image_id"], images):
                if image.shape != (size, size):
                    raise ValueError(f"{image_id}: image is {image.shape}, the dataset declares {size}x{size}")
            matrix = image_features(np.stack(images)) if images else np.zeros((0, len(FEATURE_NAMES)))
            yield pd.DataFrame({
                "image_id": frame["image_id"], "split": frame["split"],
                "labels": [row.astype(np.int16) for row in decode_column(schema, "labels", frame["labels"])],
                "features": list(matrix),
            })

    return compute


def _dataset_size(spark: SparkSession, url: str) -> int:
    try:
        return int(read_json(spark, f"{url}/_manifest.json")["counts"]["size"])
    except Exception as error:  # noqa: BLE001 - any missing or foreign manifest gets the same explanation
        raise ValueError(f"{url} is not an images_<size> dataset written by preprocess: its _manifest.json "
                         f"has no counts.size ({type(error).__name__}: {error})") from error


def features(spark: SparkSession, input_url: str, out: str, settings: FeaturesConfig,
             baseline_out: str | None = None, allow_empty: bool = False) -> dict:
    """Write the ``features`` dataset of ``images_<size>``, and the MLlib baseline when ``baseline_out``
    is given; returns the counts (images per split, number of features, baseline test macro AUROC)."""
    from pyspark.ml.functions import array_to_vector

    started = time.time()
    url, out_url = to_url(input_url), to_url(out)
    settle(spark, url)
    size = _dataset_size(spark, url)
    images = spark.read.parquet(url)
    n_images = images.count()
    if n_images == 0 and not allow_empty:
        raise UsageError(f"{url} has no image: nothing to compute; --out is left as it was "
                         f"(--allow-empty writes an empty features dataset)")
    vectors = (images.select("image_id", "split", "labels", "image")
               .mapInPandas(_features_partition(size), FEATURES_DDL)
               .withColumn("features", array_to_vector("features")))
    with atomic_output(spark, out_url, "features") as tmp:
        vectors.write.parquet(tmp)
        written = spark.read.parquet(tmp)
        by_split = {row["split"]: row["count"] for row in written.groupBy("split").count().collect()}
        counts = {"images": sum(by_split.values()), "splits": dict(sorted(by_split.items())),
                  "n_features": len(FEATURE_NAMES), "size": size}
        if counts["images"] != n_images:
            raise RuntimeError(f"features wrote {counts['images']} rows from {n_images} images in {url}")
        if baseline_out:
            features_input = {"url": out_url, "stage": "features", "code_version": code_version(),
                              "finished_at": "written by the same run"}
            baseline = train_baseline(spark, written, baseline_out, size, settings,
                                      {"features": features_input, "images": input_version(spark, url)})
            counts["baseline_test_macro_auroc"] = baseline["macro_auroc"]
        else:
            baseline = None
            log.info("no --baseline-out: only the features dataset is written")
        finish_manifest(spark, tmp, "features", started, config=settings, inputs={"images": input_version(spark, url)},
                        counts=counts, extra={"feature_names": list(FEATURE_NAMES),
                                              "lung_regions": {"fractions": {"rows": LUNG_ROWS,
                                                                             "columns": LUNG_COLUMNS,
                                                                             "mediastinum_columns": MEDIASTINUM_COLUMNS},
                                                               "pixels": lung_regions(size)}})
    return {**counts, **({"baseline": baseline} if baseline else {})}


def _class_weights(positives: int, total: int, balance: bool) -> tuple[float, float]:
    """(negative, positive) example weights: each class weighs half of the train set when balanced."""
    if not balance or positives in (0, total):
        return 1.0, 1.0
    return total / (2.0 * (total - positives)), total / (2.0 * positives)


def _probabilities(n_labels: int):
    from pyspark.ml.functions import vector_to_array

    return F.array(*[vector_to_array(F.col(f"probability_{i}"))[1] for i in range(n_labels)]).cast("array<float>")


def train_baseline(spark: SparkSession, vectors: DataFrame, out: str, size: int, settings: FeaturesConfig,
                   inputs: dict) -> dict:
    """Fit a standard scaler and one logistic regression per label on the train split of ``vectors``,
    tune thresholds on val, and write test predictions to ``out`` in ``score``'s format; returns counts."""
    from pyspark.ml import PipelineModel
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import StandardScaler

    started = time.time()
    n_labels = len(LABELS)
    train = vectors.where(F.col("split") == TRAIN_SPLIT)
    totals = train.agg(F.count("*").alias("n"),
                       *[F.sum(F.col("labels")[i]).alias(f"pos_{i}") for i in range(n_labels)]).first()
    n_train = int(totals["n"])
    if n_train == 0:
        raise ValueError(f"the baseline needs a {TRAIN_SPLIT!r} split; the features have none")
    positives = [int(totals[f"pos_{i}"] or 0) for i in range(n_labels)]
    scaler = StandardScaler(inputCol="features", outputCol="scaled", withMean=True, withStd=True).fit(train)
    targets = []
    for i, count in enumerate(positives):
        negative_weight, positive_weight = _class_weights(count, n_train, settings.balance_classes)
        targets += [F.col("labels")[i].cast("double").alias(f"y_{i}"),
                    F.when(F.col("labels")[i] == 1, positive_weight).otherwise(negative_weight).alias(f"w_{i}")]
    scaled_train = scaler.transform(train).select("scaled", *targets).cache()

    def fit(i: int):
        regression = LogisticRegression(
            featuresCol="scaled", labelCol=f"y_{i}", weightCol=f"w_{i}", maxIter=settings.max_iter,
            regParam=settings.reg_param, standardization=False, family="binomial",
            probabilityCol=f"probability_{i}", rawPredictionCol=f"raw_{i}", predictionCol=f"prediction_{i}")
        fitted = regression.fit(scaled_train)
        log.info("baseline %s: %d/%d train positives, %d iterations", LABELS[i], positives[i], n_train,
                 fitted.summary.totalIterations if positives[i] not in (0, n_train) else 0)
        return fitted

    try:
        # Each L-BFGS iteration is a tiny Spark job whose cost is mostly scheduling, so a few findings are
        # fitted at once from driver threads (as pyspark's OneVsRest does with its `parallelism`).
        with ThreadPool(max(1, settings.parallelism)) as pool:
            models = pool.map(inheritable_thread_target(fit), range(n_labels))
    finally:
        scaled_train.unpersist()
    model = PipelineModel(stages=[scaler, *models])
    digest = hashlib.sha256()
    for fitted in models:
        digest.update(fitted.coefficients.toArray().tobytes() + np.float64(fitted.intercept).tobytes())
    model_version = f"{BASELINE_MODEL}-{digest.hexdigest()[:12]}"

    scored = model.transform(vectors.where(F.col("split").isin(THRESHOLD_SPLIT, EVAL_SPLIT)))
    scored = scored.select("image_id", "split", "labels", _probabilities(n_labels).alias("probabilities"))
    thresholds, tuned_on = tuned_thresholds(long_form(scored.where(F.col("split") == THRESHOLD_SPLIT)), n_labels)
    if not tuned_on:
        log.warning("no %r rows: every baseline threshold is %s", THRESHOLD_SPLIT, DEFAULT_THRESHOLD)
    scored_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    predictions = (scored.where(F.col("split") == EVAL_SPLIT)
                   .withColumn("model_version", F.lit(model_version))
                   .withColumn("scored_at", F.lit(scored_at).cast("timestamp")))
    card = {"model_version": model_version, "model": BASELINE_MODEL, "task": "multilabel", "labels": list(LABELS),
            "input_size": size, "thresholds": dict(zip(LABELS, map(float, thresholds))),
            "feature_names": list(FEATURE_NAMES), "mllib_model": MLLIB_FOLDER,
            "train_positives": dict(zip(LABELS, positives))}
    with atomic_output(spark, out, "features-baseline") as tmp:
        predictions.write.parquet(tmp)
        model.write().save(f"{tmp}/{MLLIB_FOLDER}")
        written = spark.read.schema(PREDICTIONS_DDL + ", model_version string, scored_at timestamp").parquet(tmp)
        n_scored = written.count()
        macro_auroc = (macro_average(label_metrics(written, list(LABELS), thresholds)[0].values())["auroc"]
                       if n_scored else None)
        counts = {"scored": n_scored, "split": EVAL_SPLIT, "train": n_train, "val": tuned_on,
                  "macro_auroc": macro_auroc}
        finish_manifest(spark, tmp, "features-baseline", started, config=settings, inputs=inputs, counts=counts,
                        extra={"model": card, "model_version": model_version})
    if n_scored == 0:
        log.warning("no %r rows: the baseline scored nothing", EVAL_SPLIT)
    return {**counts, "model_version": model_version}
