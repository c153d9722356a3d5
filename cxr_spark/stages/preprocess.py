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
import time

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession

from cxr_spark.cli_flags import conf_default
from cxr_spark.config import PipelineConfig, PreprocessConfig, override
from cxr_spark.core.guards import check_input, check_run
from cxr_spark.core.image_codec import decode_grayscale
from cxr_spark.core.image_formats import ImageError
from cxr_spark.datasets.images import images_schema, resize_encoded, write_images
from cxr_spark.datasets.manifest import input_version
from cxr_spark.datasets.quarantine import QUARANTINE_SCHEMA
from cxr_spark.datasets.raw import metadata_columns
from cxr_spark.io.commit import settle
from cxr_spark.io.storage import to_url

log = logging.getLogger(__name__)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="input", required=True, help="raw dataset written by ingest")
    parser.add_argument("--out", required=True, help="images dataset to write (replaced atomically)")
    parser.add_argument("--size", type=int, help=f"output side in pixels {conf_default('preprocess', 'size')}")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write the dataset even when no image is usable (by default such a run fails and "
                             "leaves --out as it was)")


def check_args(args: argparse.Namespace) -> None:
    """Before Spark starts: the input is a raw dataset and the paths safe (:mod:`cxr_spark.core.guards`)."""
    check_input("preprocess", "--in", args.input, ("ingest",))
    check_run({"--in": args.input}, {"--out": (args.out, "preprocess")})


def settings(args: argparse.Namespace, config: PipelineConfig) -> PreprocessConfig:
    """The run's settings: conf's [preprocess] with the flags given (what ``--print-config`` shows)."""
    return override(config.preprocess, size=args.size)


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    return preprocess(spark, args.input, args.out, settings(args, config), allow_empty=args.allow_empty)


def _resize_partition(size: int):
    """The mapInPandas function: PNG bytes in, resized and re-encoded image plus its statistics out.

    A row that cannot be decoded is left out (and logged); :func:`_undecodable_rows` finds it afterwards.
    """
    keep = metadata_columns()

    def resize_batches(batches):
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

    return resize_batches


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


def _undecodable_rows(spark: SparkSession, raw, written, n_rows: int, n_images: int):
    """Raw rows missing from the written images, each with the reason it could not be decoded (None when none
    is missing)."""
    if n_images == n_rows:
        return None
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
                        quarantine=lambda written, n_images: _undecodable_rows(spark, raw, written, n_rows, n_images),
                        inputs={"raw": input_version(spark, input_url)}, allow_empty=allow_empty)


