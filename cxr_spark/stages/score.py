"""Score: run a trained model over an ``images_<size>`` dataset (or one split of it) with Spark.

The model's bytes are broadcast once; each Python worker deserialises them once and keeps the model
for every later batch and task (``spark.python.worker.reuse``). Input size and normalisation come
from ``model.json``, never from guesses.
"""
from __future__ import annotations

import argparse
import datetime as dt
import logging
import time

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from cxr_spark.cli_flags import conf_default
from cxr_spark.config import PipelineConfig, ScoreConfig, override
from cxr_spark.core.guards import UsageError, check_input, check_run
from cxr_spark.core.labels import LABELS
from cxr_spark.core.normalization import model_inputs
from cxr_spark.datasets.fields import decode_column
from cxr_spark.datasets.images import images_schema
from cxr_spark.datasets.manifest import finish_manifest, input_version
from cxr_spark.datasets.model_card import MODEL_CARD, MODEL_FILE, load_model_card, loaded_model, predict_probabilities
from cxr_spark.datasets.predictions import PREDICTIONS_DDL
from cxr_spark.io.commit import atomic_output, settle
from cxr_spark.io.parquet_parts import written_rows
from cxr_spark.io.storage import read_bytes, read_json, to_url

log = logging.getLogger(__name__)
TASKS_PER_SLOT = 4  # below this many scan partitions per task slot, rows are spread evenly (_spread_over_slots)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="input", required=True,
                        help="images_<size> dataset (written by preprocess or ingest --images-out)")
    parser.add_argument("--model", required=True, help="model folder written by train (model.keras + model.json)")
    parser.add_argument("--out", required=True, help="predictions dataset to write (replaced atomically)")
    parser.add_argument("--split", help=f"split to score: train, val, test or all {conf_default('score', 'split')}")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write the output even when the split has no image (by default such a run fails and leaves --out as "
                             "it was)")


def check_args(args: argparse.Namespace) -> None:
    """Before Spark starts: the inputs are of their kinds and the paths safe (:mod:`cxr_spark.core.guards`)."""
    check_input("score", "--in", args.input, ("preprocess",))
    check_input("score", "--model", args.model, ("train",), needs=MODEL_CARD)
    check_run({"--in": args.input, "--model": args.model}, {"--out": (args.out, "score")})


def settings(args: argparse.Namespace, config: PipelineConfig) -> ScoreConfig:
    """The run's settings: conf's [score] with the flags given (what ``--print-config`` shows)."""
    return override(config.score, split=args.split)


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    run = settings(args, config)
    return score(spark, args.input, args.model, args.out, run.split, run.batch_size, allow_empty=args.allow_empty)


def _score_partition(card: dict, model_broadcast, batch_size: int):
    size, version = card["input_size"], card["model_version"]
    # a binary model predicts one finding: score against that column of the dataset's labels
    columns = [LABELS.index(name) for name in card["labels"]]
    schema = images_schema(size)

    def predict(batches):
        model = loaded_model(version, model_broadcast.value)
        for frame in batches:
            images = np.stack(decode_column(schema, "image", frame["image"])) if len(frame) else np.zeros((0, size, size))
            inputs = model_inputs(images, card["normalization"])
            probabilities = predict_probabilities(model, inputs, batch_size, len(card["labels"]))
            labels = decode_column(schema, "labels", frame["labels"])
            yield pd.DataFrame({
                "image_id": frame["image_id"], "split": frame["split"],
                "labels": [row[columns].astype(np.int16) for row in labels],
                "probabilities": list(probabilities),
                "view": frame["view"], "sex": frame["sex"], "age": frame["age"].astype("Int32"),
            })

    return predict


def _spread_over_slots(spark: SparkSession, images):
    """One task per task slot, rows dealt out evenly, for a dataset the file scan splits into few partitions.

    A row costs far more to score than to read, so the slowest task sets the job's time. Spark packs
    small files into as few partitions as there are slots and weighs each file by a fixed 4 MB open cost,
    not by its rows: for a 1000-image ``images_128`` the two scoring tasks held 840 and 160 rows. More
    tasks than slots would balance too, but each Python task costs about 0.4 CPU-seconds before it runs:
    PySpark 3.5's worker calls ``importlib.invalidate_caches()`` per task, which on Python 3.11 re-reads
    ``pyspark.zip``'s directory once per importer (CPython gh-103200, fixed in 3.12; SPARK-54744). Larger
    datasets, already split into many byte-balanced partitions, are left as they are (no shuffle).
    """
    slots = spark.sparkContext.defaultParallelism
    if images.rdd.getNumPartitions() >= TASKS_PER_SLOT * slots:
        return images
    return images.repartition(slots)


def score(spark: SparkSession, input_url: str, model_dir: str, out: str, split: str = "test",
          batch_size: int = 64, *, allow_empty: bool = False) -> dict:
    """Write ``predictions`` for ``split`` of ``input_url`` (``all`` for every row); returns counts. A split
    with no image fails (:class:`~cxr_spark.core.guards.UsageError`) unless ``allow_empty``."""
    started = time.time()
    url, model_url = to_url(input_url), to_url(model_dir)
    settle(spark, url)
    card = load_model_card(spark, model_url)
    dataset_size = read_json(spark, f"{url}/_manifest.json")["counts"]["size"]
    if dataset_size != card["input_size"]:
        raise ValueError(f"model {card['model_version']} takes {card['input_size']}px images but {url} holds "
                         f"{dataset_size}px images; preprocess with --size {card['input_size']}")
    model_broadcast = spark.sparkContext.broadcast(read_bytes(f"{model_url}/{MODEL_FILE}"))
    images = spark.read.parquet(url)
    if split != "all":
        images = images.where(F.col("split") == split)
    images = _spread_over_slots(spark, images)
    scored_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    predictions = (images.select("image_id", "split", "labels", "image", "view", "sex", "age")
                   .mapInPandas(_score_partition(card, model_broadcast, batch_size), PREDICTIONS_DDL)
                   .withColumn("model_version", F.lit(card["model_version"]))
                   .withColumn("scored_at", F.lit(scored_at).cast("timestamp")))
    with atomic_output(spark, out, "score") as tmp:
        predictions.write.parquet(tmp)
        n_scored = written_rows(spark, tmp)
        if n_scored == 0 and not allow_empty:
            raise UsageError(f"no image of split {split!r} in {url}: nothing to score; --out is left as it was "
                             f"(--allow-empty writes empty predictions)")
        counts = {"scored": n_scored, "split": split}
        finish_manifest(spark, tmp, "score", started, config={"split": split, "batch_size": batch_size},
                        inputs={"images": input_version(spark, url), "model": input_version(spark, model_url)},
                        counts=counts,
                        extra={"model": {key: card[key] for key in
                                         ("model_version", "model", "task", "labels", "input_size", "thresholds")}})
    model_broadcast.unpersist()
    if n_scored == 0:
        log.warning("no rows of split %r in %s: nothing was scored", split, url)
    return {**counts, "model_version": card["model_version"]}
