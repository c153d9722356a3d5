"""Preprocess: decode and resize the ``raw`` dataset into ``images_<size>``, with the train split's
normalisation statistics stored beside it (``_normalization.json``).

Stored images stay uint8; normalisation is applied by the training and scoring input pipelines.
"""
from __future__ import annotations

import argparse
import logging
import math
import time

import numpy as np
from petastorm.etl.dataset_metadata import materialize_dataset
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from cxr_spark.config import PipelineConfig, PreprocessConfig, override
from cxr_spark.images import ImageError, decode_grayscale, resize_square
from cxr_spark.manifest import finish_manifest, input_version
from cxr_spark.schemas import encode_column, images_schema, metadata_columns
from cxr_spark.storage import atomic_output, to_url, write_json

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
    """The mapInPandas function: PNG bytes in, resized and re-encoded image plus its statistics out."""
    schema = images_schema(size)
    keep = metadata_columns()

    def resize(batches):
        for frame in batches:
            images, means, stds = [], [], []
            for image_id, source_path, png in zip(frame["image_id"], frame["source_path"], frame["png"]):
                try:
                    pixels = resize_square(decode_grayscale(png), size)
                except ImageError as error:
                    raise ImageError(error.reason, f"{image_id} ({source_path}): {error.detail}") from error
                images.append(pixels)
                means.append(float(pixels.mean()))
                stds.append(float(pixels.std()))
            out = frame[keep].copy()
            out["image"] = encode_column(schema, "image", images)
            out["pixel_mean"] = np.asarray(means, np.float32)
            out["pixel_std"] = np.asarray(stds, np.float32)
            yield out

    return resize


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
            images.write.partitionBy("split").parquet(tmp)
        written = spark.read.parquet(tmp)
        by_split = {r["split"]: r["count"] for r in written.groupBy("split").count().collect()}
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
        counts = {"images": sum(by_split.values()), "splits": dict(sorted(by_split.items())),
                  "files_per_split": files_per_split, "size": size}
        if counts["images"] != n_rows:
            raise RuntimeError(f"preprocess wrote {counts['images']} images from {n_rows} raw rows")
        finish_manifest(spark, tmp, "preprocess", started, config=settings,
                        inputs={"raw": input_version(spark, input_url)},
                        counts=counts, extra={"normalization": normalization})
    return {**counts, "normalization": normalization}
