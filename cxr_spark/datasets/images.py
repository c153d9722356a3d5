"""The ``images_<size>`` dataset: its Petastorm Unischema, the bytes of one stored image, the train split's
normalisation statistics beside it (``_normalization.json``) and the writer preprocess and
``ingest --images-out`` both use, so the two write the same dataset.
"""
from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from functools import lru_cache

import cv2
import numpy as np
import pyarrow.parquet as pq
from petastorm.codecs import CompressedImageCodec
from petastorm.unischema import Unischema, UnischemaField
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from cxr_spark.config import PreprocessConfig
from cxr_spark.core.guards import UsageError
from cxr_spark.core.image_codec import decode_resized, encode_png
from cxr_spark.datasets.fields import petastorm_dataset, scalar_field
from cxr_spark.datasets.manifest import finish_manifest
from cxr_spark.datasets.quarantine import QUARANTINE_DIR, write_counted, write_empty
from cxr_spark.datasets.raw import METADATA_FIELDS
from cxr_spark.io.commit import atomic_output
from cxr_spark.io.parquet_parts import image_rows_writer, move_parquet_parts, parquet_parts
from cxr_spark.io.storage import FileSystem, input_files, local_path, to_url, write_json

log = logging.getLogger(__name__)

@lru_cache(maxsize=None)
def images_schema(size: int) -> Unischema:
    """``images_<size>``: the raw metadata plus the decoded, resized image (stored as lossless PNG)."""
    return Unischema(f"Images{size}Schema", METADATA_FIELDS + [
        UnischemaField("image", np.uint8, (size, size), CompressedImageCodec("png"), False),
        # Per-image statistics of the stored pixels: QA, and the train split's mean/std without re-decoding.
        scalar_field("pixel_mean", np.float32, T.FloatType()),
        scalar_field("pixel_std", np.float32, T.FloatType()),
    ])


NORMALIZATION_FILE = "_normalization.json"
PNG_BYTES_PER_PIXEL = 0.6  # a resized radiograph stored as PNG, measured on synthetic and real samples


def resize_encoded(data: bytes, size: int) -> tuple[bytes, float, float]:
    """One image as ``images_<size>`` stores it: decoded, resized to ``size``x``size``, PNG-encoded, with the
    mean and standard deviation of its stored pixels. ImageError when the bytes do not decode.

    Preprocess maps it over ``raw``; ingest with ``--images-out`` over the files themselves, so both
    write the same bytes for the same image.
    """
    return encode_resized(decode_resized(data, size))


def encode_resized(pixels: np.ndarray) -> tuple[bytes, float, float]:
    """Resized pixels as ``images_<size>`` stores them (:func:`resize_encoded`), with their mean and std."""
    mean, std = cv2.meanStdDev(pixels)
    # encode_png, not the field's Petastorm codec (OpenCV's writer, 2.3x slower): the same pixels, any PNG
    # decoder reads them, Petastorm's included.
    return encode_png(pixels), float(mean[0, 0]), float(std[0, 0])


def _files_per_split(written: DataFrame) -> dict:
    """How many data files each split of a written images dataset has."""
    files = [url.rsplit("/", 2)[-2] for url in input_files(written)]
    return {name.split("=", 1)[1]: files.count(name) for name in sorted(set(files)) if name.startswith("split=")}


def write_images(spark: SparkSession, images: DataFrame, out: str, settings: PreprocessConfig, *, n_rows: int,
                 quarantine, inputs: dict, started: float, extra: dict | None = None, parts: str | None = None,
                 into: str | None = None, allow_empty: bool = False) -> dict:
    """Write ``images`` (rows of :func:`images_schema`) as the ``images_<size>`` dataset at ``out``, replaced
    atomically, with its quarantine, the train split's statistics and a manifest; returns the counts.

    ``parts``, a local folder, may hold rows of the dataset already written as Parquet files in its layout
    (``split=<split>/*.parquet``, as ``ingest --images-out``'s pass 1 writes them); they are moved in beside
    ``images``, which are then the other rows. ``quarantine(written, n_images)`` gives the quarantine rows once
    the images are written (None when there are none); the run fails unless ``n_rows`` (the raw rows the images come from) =
    images + quarantined. With ``into`` the dataset is written there as it is, for a caller that commits it
    together with another (:class:`cxr_spark.io.commit.OutputRun`). A run with no image fails
    (:class:`~cxr_spark.core.guards.UsageError`) unless ``allow_empty``, so ``out`` stays as it was.
    """
    size = settings.size
    in_parts = parquet_parts(parts)
    rest = n_rows - sum(pq.read_metadata(path).num_rows for path in in_parts)  # at most the rows of ``images``
    est_bytes = rest * size * size * PNG_BYTES_PER_PIXEL
    files_per_split = max(1 if in_parts else settings.min_files_per_split,
                          math.ceil(est_bytes / (settings.row_group_size_mb * 2**20)))
    # Resize first, then shuffle: the shuffle moves small resized rows, not the original PNGs.
    # rows in image_id order within each file: the same rows give the same files and row groups, whatever
    # order the shuffle delivers them in
    images = images.repartition(files_per_split, "image_id").sortWithinPartitions("image_id")
    with nullcontext(into) if into else atomic_output(spark, out, "preprocess") as tmp:
        with petastorm_dataset(spark, tmp, images_schema(size), settings.row_group_size_mb):
            if rest > 0 or not in_parts:
                image_rows_writer(images.write, "image").partitionBy("split").parquet(tmp)
            if in_parts:
                move_parquet_parts(parts, local_path(tmp))
            if not any(name[:1] not in "._" for name in FileSystem(spark, tmp).names(tmp) or []):
                # no row, so no split folder: one empty file gives readers (and Petastorm) the schema
                spark.createDataFrame([], images_schema(size).as_spark_schema()).coalesce(1).write.mode(
                    "append").parquet(tmp)
        written = spark.read.schema(images_schema(size).as_spark_schema()).parquet(tmp)  # no job to infer it
        # rows per split and the train split's pixel moments, in one job
        per_split = {r["split"]: r for r in written.groupBy("split").agg(
            F.count("*").alias("n"), F.avg("pixel_mean").alias("mean"),
            F.avg(F.col("pixel_std") ** 2 + F.col("pixel_mean") ** 2).alias("mean_sq")).collect()}
        by_split = {split: row["n"] for split, row in per_split.items()}
        if not by_split and not allow_empty:
            raise UsageError(f"{to_url(out)}: no usable image among the {n_rows} rows of the input; nothing is "
                             f"replaced (--allow-empty writes an empty dataset)")
        rows = quarantine(written, sum(by_split.values()))
        if rows is None:  # nothing to quarantine
            write_empty(spark, f"{tmp}/{QUARANTINE_DIR}")
            reasons = {}
        else:
            _, reasons = write_counted(rows, f"{tmp}/{QUARANTINE_DIR}", "images")
        stats = per_split.get("train", {"n": 0})
        normalization = {"split": "train", "n_images": stats["n"], "scale": "uint8 0-255"}
        if stats["n"]:
            normalization.update(mean=stats["mean"], std=math.sqrt(max(stats["mean_sq"] - stats["mean"] ** 2, 0.0)))
        else:
            log.warning("no train rows for %s: normalisation statistics are not available", out)
        write_json(spark, f"{tmp}/{NORMALIZATION_FILE}", normalization)
        counts = {"raw_rows": n_rows, "images": sum(by_split.values()), "quarantined": sum(reasons.values()),
                  "quarantine_reasons": dict(sorted(reasons.items(), key=str)), "splits": dict(sorted(by_split.items())),
                  "files_per_split": _files_per_split(written), "size": size}
        if counts["raw_rows"] != counts["images"] + counts["quarantined"]:  # (a row with no reason: write_counted)
            raise RuntimeError(f"preprocess counts do not reconcile (raw_rows != images + quarantined): {counts}")
        finish_manifest(spark, tmp, "preprocess", started, config=settings, inputs=inputs, counts=counts,
                        extra={"normalization": normalization, **(extra or {})})
    return {**counts, "normalization": normalization}
