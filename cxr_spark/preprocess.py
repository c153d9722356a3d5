"""Preprocess: decode and resize the ``raw`` dataset into ``images_<size>``, with the train split's
normalisation statistics stored beside it (``_normalization.json``).

Stored images stay uint8; normalisation is applied by the training and scoring input pipelines.

This is the one stage that decodes a PNG (ingest checks only its header and end), so a raw row whose
pixels cannot be decoded is quarantined here, in ``<images>/_quarantine/`` with ingest's columns and
reasons, and the counts reconcile: raw rows = images + quarantined.
"""
from __future__ import annotations

import argparse
import logging
import math
import time

import cv2
import numpy as np
import pandas as pd
from petastorm.etl.dataset_metadata import materialize_dataset
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from cxr_spark.config import PipelineConfig, PreprocessConfig, override
from cxr_spark.images import ImageError, decode_grayscale, resize_square
from cxr_spark.ingest import QUARANTINE_DIR, QUARANTINE_SCHEMA
from cxr_spark.manifest import finish_manifest, input_version
from cxr_spark.schemas import encode_column, images_schema, metadata_columns
from cxr_spark.storage import atomic_output, image_rows_writer, to_url, write_json

log = logging.getLogger(__name__)
NORMALIZATION_FILE = "_normalization.json"
PNG_BYTES_PER_PIXEL = 0.6  # a resized radiograph stored as PNG, measured on synthetic and real samples


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="input", required=True, help="raw dataset written by ingest")
    parser.add_argument("--out", required=True, help="images dataset to write (replaced atomically)")
    parser.add_argument("--size", type=int, help="output side in pixels (default from conf: 224)")


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    return preprocess(spark, args.input, args.out, override(config.preprocess, size=args.size))


def _resize_partition(size: int):
    """The mapInPandas function: PNG bytes in, resized and re-encoded image plus its statistics out.

    A row that cannot be decoded is left out (and logged); :func:`_quarantine_rows` finds it afterwards.
    """
    schema = images_schema(size)
    keep = metadata_columns()

    def resize(batches):
        for frame in batches:
            rows, images, means, stds = [], [], [], []
            for row, (image_id, png) in enumerate(zip(frame["image_id"], frame["png"])):
                try:
                    pixels = resize_square(decode_grayscale(png), size)
                except ImageError as error:
                    log.warning("preprocess: %s is quarantined: %s", image_id, error)
                    continue
                mean, std = cv2.meanStdDev(pixels)
                rows.append(row)
                images.append(pixels)
                means.append(mean[0, 0])
                stds.append(std[0, 0])
            out = frame[keep].iloc[rows].reset_index(drop=True)
            out["image"] = encode_column(schema, "image", images)
            out["pixel_mean"] = np.asarray(means, np.float32)
            out["pixel_std"] = np.asarray(stds, np.float32)
            yield out

    return resize


def _decode_failures(batches):
    """The mapInPandas function: the quarantine row of each raw row given (its decoding error)."""
    for frame in batches:
        reasons, details = [], []
        for png in frame["png"]:
            try:
                decode_grayscale(png)
                reasons.append(None)  # decodes after all: the reconciliation below fails the run
                details.append("decoded when checked again, yet missing from the written images")
            except ImageError as error:
                reasons.append(error.reason)
                details.append(error.detail)
        yield pd.DataFrame({"source_path": frame["source_path"], "image_id": frame["image_id"],
                            "reason": reasons, "detail": details, "kind": "file"})


def _quarantine_rows(spark: SparkSession, raw, written, n_rows: int, n_images: int):
    """Raw rows missing from the written images, each with the reason it could not be decoded."""
    if n_images == n_rows:
        return spark.createDataFrame([], QUARANTINE_SCHEMA)
    missing = raw.join(written.select("image_id"), "image_id", "left_anti")
    return missing.mapInPandas(_decode_failures, QUARANTINE_SCHEMA)


def preprocess(spark: SparkSession, input_url: str, out: str, settings: PreprocessConfig) -> dict:
    """Write ``images_<size>`` from ``raw``; returns counts and the train split's mean/std."""
    started = time.time()
    size = settings.size
    schema = images_schema(size)
    raw = spark.read.parquet(to_url(input_url))
    n_rows = raw.count()
    est_bytes = n_rows * size * size * PNG_BYTES_PER_PIXEL
    files_per_split = max(settings.min_files_per_split,
                          math.ceil(est_bytes / (settings.row_group_size_mb * 2**20)))
    spark_schema = schema.as_spark_schema()
    # Resize first, then shuffle: the shuffle moves small resized rows, not the original PNGs.
    images = (raw.mapInPandas(_resize_partition(size), spark_schema)
              .repartition(files_per_split, "image_id"))
    with atomic_output(spark, out) as tmp:
        with materialize_dataset(spark, tmp, schema, settings.row_group_size_mb):
            image_rows_writer(images.write, "image").partitionBy("split").parquet(tmp)
        written = spark.read.parquet(tmp)
        by_split = {r["split"]: r["count"] for r in written.groupBy("split").count().collect()}
        _quarantine_rows(spark, raw, written, n_rows, sum(by_split.values())).coalesce(1).write.parquet(
            f"{tmp}/{QUARANTINE_DIR}")
        quarantine = spark.read.schema(QUARANTINE_SCHEMA).parquet(f"{tmp}/{QUARANTINE_DIR}")
        reasons = {r["reason"]: r["count"] for r in quarantine.groupBy("reason").count().collect()}
        stats = (written.where("split = 'train'")
                 .agg(F.count("*").alias("n"), F.avg("pixel_mean").alias("mean"),
                      F.avg(F.col("pixel_std") ** 2 + F.col("pixel_mean") ** 2).alias("mean_sq"))
                 .first())
        normalization = {"split": "train", "n_images": stats["n"], "scale": "uint8 0-255"}
        if stats["n"]:
            normalization.update(mean=stats["mean"], std=math.sqrt(max(stats["mean_sq"] - stats["mean"] ** 2, 0.0)))
        else:
            log.warning("no train rows in %s: normalisation statistics are not available", input_url)
        write_json(spark, f"{tmp}/{NORMALIZATION_FILE}", normalization)
        counts = {"raw_rows": n_rows, "images": sum(by_split.values()), "quarantined": sum(reasons.values()),
                  "quarantine_reasons": dict(sorted(reasons.items(), key=str)), "splits": dict(sorted(by_split.items())),
                  "files_per_split": files_per_split, "size": size}
        if counts["raw_rows"] != counts["images"] + counts["quarantined"] or None in reasons:
            raise RuntimeError(f"preprocess counts do not reconcile (raw_rows != images + quarantined, or a "
                               f"quarantined row decodes): {counts}")
        finish_manifest(spark, tmp, "preprocess", started, config=settings,
                        inputs={"raw": input_version(spark, input_url)},
                        counts=counts, extra={"normalization": normalization})
    return {**counts, "normalization": normalization}
