"""Preprocess: decode and resize the ``raw`` dataset into ``images_<size>``, with the train split's
normalisation statistics stored beside it (``_normalization.json``).

Stored images stay uint8; normalisation is applied by the training and scoring input pipelines.

Ingest checks only a PNG's header and end, so a raw row whose pixels cannot be decoded is quarantined
here, in ``<images>/_quarantine/`` with ingest's columns and reasons, and the counts reconcile: raw rows
= images + quarantined. ``ingest --images-out`` writes the same dataset in its own pass over the files
(through :func:`resize_encoded` and :func:`write_images`, its tasks writing most rows themselves), without
reading ``raw`` back.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from contextlib import nullcontext

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from petastorm.etl.dataset_metadata import materialize_dataset
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cxr_spark.commit import atomic_output, settle
from cxr_spark.config import PipelineConfig, PreprocessConfig, override
from cxr_spark.guards import UsageError, check_run
from cxr_spark.images import ImageError, decode_grayscale, decode_resized, encode_png
from cxr_spark.manifest import finish_manifest, input_version
from cxr_spark.schemas import QUARANTINE_DIR, QUARANTINE_SCHEMA, images_schema, metadata_columns
from cxr_spark.storage import (FileSystem, image_rows_writer, local_path, move_parquet_parts, parquet_parts, to_url,
                               write_json)

log = logging.getLogger(__name__)
NORMALIZATION_FILE = "_normalization.json"
PNG_BYTES_PER_PIXEL = 0.6  # a resized radiograph stored as PNG, measured on synthetic and real samples


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="input", required=True, help="raw dataset written by ingest")
    parser.add_argument("--out", required=True, help="images dataset to write (replaced atomically)")
    parser.add_argument("--size", type=int, help="output side in pixels (default from conf: 224)")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write the dataset even when no image is usable (by default such a run fails and "
                             "leaves --out as it was)")


def check_args(args: argparse.Namespace) -> None:
    """The run's paths, before Spark starts (:func:`cxr_spark.guards.check_run`)."""
    check_run({"--in": args.input}, {"--out": (args.out, "preprocess")}, folders=("--in",))


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    return preprocess(spark, args.input, args.out, override(config.preprocess, size=args.size),
                      allow_empty=args.allow_empty)


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


def _resize_partition(size: int):
    """The mapInPandas function: PNG bytes in, resized and re-encoded image plus its statistics out.

    A row that cannot be decoded is left out (and logged); :func:`_quarantine_rows` finds it afterwards.
    """
    keep = metadata_columns()

    def resize(batches):
        for frame in batches:
            rows, images, means, stds = [], [], [], []
            for row, (image_id, png) in enumerate(zip(frame["image_id"], frame["png"])):
                try:
                    image, mean, std = resize_encoded(png, size)
                except ImageError as error:
                    log.warning("preprocess: %s is quarantined: %s", image_id, error)
                    continue
                rows.append(row)
                images.append(image)
                means.append(mean)
                stds.append(std)
            out = frame[keep].iloc[rows].reset_index(drop=True)
            out["image"] = images
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


def preprocess(spark: SparkSession, input_url: str, out: str, settings: PreprocessConfig, *,
               allow_empty: bool = False) -> dict:
    """Write ``images_<size>`` from ``raw``; returns counts and the train split's mean/std."""
    started = time.time()
    settle(spark, to_url(input_url))
    raw = spark.read.parquet(to_url(input_url))
    n_rows = raw.count()
    images = raw.mapInPandas(_resize_partition(settings.size), images_schema(settings.size).as_spark_schema())
    return write_images(spark, images, out, settings, n_rows=n_rows, started=started,
                        quarantine=lambda written, n_images: _quarantine_rows(spark, raw, written, n_rows, n_images),
                        inputs={"raw": input_version(spark, input_url)}, allow_empty=allow_empty)


def _files_per_split(written: DataFrame) -> dict:
    """How many data files each split of a written images dataset has."""
    files = [url.rsplit("/", 2)[-2] for url in written.inputFiles()]
    return {name.split("=", 1)[1]: files.count(name) for name in sorted(set(files)) if name.startswith("split=")}


def write_images(spark: SparkSession, images: DataFrame, out: str, settings: PreprocessConfig, *, n_rows: int,
                 quarantine, inputs: dict, started: float, extra: dict | None = None, parts: str | None = None,
                 into: str | None = None, allow_empty: bool = False) -> dict:
    """Write ``images`` (rows of :func:`images_schema`) as the ``images_<size>`` dataset at ``out``, replaced
    atomically, with its quarantine, the train split's statistics and a manifest; returns the counts.

    ``parts``, a local folder, may hold rows of the dataset already written as Parquet files in its layout
    (``split=<split>/*.parquet``, as ``ingest --images-out``'s pass 1 writes them); they are moved in beside
    ``images``, which are then the other rows. ``quarantine(written, n_images)`` gives the quarantine rows
    once the images are written; the run fails unless ``n_rows`` (the raw rows the images come from) =
    images + quarantined. With ``into`` the dataset is written there as it is, for a caller that commits it
    together with another (:class:`cxr_spark.commit.OutputRun`). A run with no image fails
    (:class:`~cxr_spark.guards.UsageError`) unless ``allow_empty``, so ``out`` stays as it was.
    """
    size = settings.size
    in_parts = parquet_parts(parts)
    rest = n_rows - sum(pq.read_metadata(path).num_rows for path in in_parts)  # at most the rows of ``images``
    est_bytes = rest * size * size * PNG_BYTES_PER_PIXEL
    files_per_split = max(1 if in_parts else settings.min_files_per_split,
                          math.ceil(est_bytes / (settings.row_group_size_mb * 2**20)))
    # Resize first, then shuffle: the shuffle moves small resized rows, not the original PNGs.
    images = images.repartition(files_per_split, "image_id")
    with nullcontext(into) if into else atomic_output(spark, out, "preprocess") as tmp:
        with materialize_dataset(spark, tmp, images_schema(size), settings.row_group_size_mb):
            if rest > 0 or not in_parts:
                image_rows_writer(images.write, "image").partitionBy("split").parquet(tmp)
            if in_parts:
                move_parquet_parts(parts, local_path(tmp))
            if not any(name[:1] not in "._" for name in FileSystem(spark, tmp).names(tmp) or []):
                # no row, so no split folder: one empty file gives readers (and Petastorm) the schema
                spark.createDataFrame([], images_schema(size).as_spark_schema()).coalesce(1).write.mode(
                    "append").parquet(tmp)
        written = spark.read.parquet(tmp)
        # rows per split and the train split's pixel moments, in one job
        per_split = {r["split"]: r for r in written.groupBy("split").agg(
            F.count("*").alias("n"), F.avg("pixel_mean").alias("mean"),
            F.avg(F.col("pixel_std") ** 2 + F.col("pixel_mean") ** 2).alias("mean_sq")).collect()}
        by_split = {split: row["n"] for split, row in per_split.items()}
        if not by_split and not allow_empty:
            raise UsageError(f"{to_url(out)}: no usable image among the {n_rows} rows of the input; nothing is "
                             f"replaced (--allow-empty writes an empty dataset)")
        quarantine(written, sum(by_split.values())).coalesce(1).write.parquet(f"{tmp}/{QUARANTINE_DIR}")
        quarantined = spark.read.schema(QUARANTINE_SCHEMA).parquet(f"{tmp}/{QUARANTINE_DIR}")
        reasons = {r["reason"]: r["count"] for r in quarantined.groupBy("reason").count().collect()}
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
        if counts["raw_rows"] != counts["images"] + counts["quarantined"] or None in reasons:
            raise RuntimeError(f"preprocess counts do not reconcile (raw_rows != images + quarantined, or a "
                               f"quarantined row decodes): {counts}")
        finish_manifest(spark, tmp, "preprocess", started, config=settings, inputs=inputs, counts=counts,
                        extra={"normalization": normalization, **(extra or {})})
    return {**counts, "normalization": normalization}
