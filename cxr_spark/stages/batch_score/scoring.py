"""What batch-score's Python workers run on the dump's files: decode, resize and normalise each with the model's
own ``model.json`` settings, score, flag, and measure the input's mean intensity for drift; files that cannot
be used become quarantine rows. Plain values in (:func:`card_settings`), no session or config shipped.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from cxr_spark.core.drift import mean_intensity
from cxr_spark.core.identity import stored_identity
from cxr_spark.core.image_codec import decode_resized
from cxr_spark.core.image_formats import ImageError, sniff_format
from cxr_spark.core.normalization import model_inputs
from cxr_spark.datasets.model_card import loaded_model, predict_probabilities, start_loading
from cxr_spark.io.storage import sha256_hex

#: One row per file. ``input_intensity`` (the mean of the model input on the 0-255 scale) feeds the run's drift
#: histograms and stays in the run's staging folder: the predictions store's schema does not change.
SCORED_DDL = ("image_id string, source_path string, content_sha256 string, image_format string, "
              "probabilities array<float>, flagged array<string>, input_intensity double, reason string, "
              "detail string")


#: The dump's index: one row per file read.
HASHED_DDL = "source_path string, content_sha256 string"

#: Files a hashing or scoring task takes (the last one fewer). Each Python worker that hashes or scores starts the
#: model once (TensorFlow's import, the load and the first call), which costs about what scoring this many files
#: does, so a small dump is done by one worker, not by every one there is (docs/benchmarks.md, docs/batch-score.md).
MIN_FILES_PER_TASK = 256


def tasks_for(n_files: int) -> int:
    """Tasks to hash or score ``n_files`` in: one per :data:`MIN_FILES_PER_TASK` files, at least one.

    >>> tasks_for(50), tasks_for(256), tasks_for(300), tasks_for(100_000), tasks_for(0)
    (1, 1, 2, 391, 1)
    """
    return max(1, -(-n_files // MIN_FILES_PER_TASK))


def hash_input(files: DataFrame, n_files: int) -> DataFrame:
    """The ``path`` and ``content`` of a dump's ``binaryFile`` rows, in :func:`tasks_for` tasks: merged from the
    file scan's splits (no shuffle: every file is read to be hashed)."""
    return files.select("path", "content").coalesce(tasks_for(n_files))


def scoring_input(contents: DataFrame, new: DataFrame, n_new: int) -> DataFrame:
    """The rows of ``contents`` (``source_path``, ``content``: the whole dump) whose path is in ``new`` (the
    new files, joined by broadcast), dealt into :func:`tasks_for` tasks. Shuffled, not merged: the dump is still
    read by as many tasks as its scan has splits, and only the new files' bytes move to the scoring tasks."""
    return contents.join(F.broadcast(new), "source_path").repartition(tasks_for(n_new))


def hash_files(version: str, model_broadcast):
    """The mapInPandas function of the dump's listing: ``binaryFile`` rows in, each file's SHA-256 out.

    Each Python worker also starts loading the model in the background (:func:`start_loading`) at its first
    task, so that the TensorFlow import of every worker (about 2 s of CPU) overlaps the run's planning and
    small jobs, not its scoring; a run that finds nothing new pays it in the workers, not in its wall time.
    """
    def hash_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        start_loading(version, lambda: model_broadcast.value)
        for frame in batches:
            yield pd.DataFrame({"source_path": frame["path"], "content_sha256": frame["content"].map(sha256_hex)})

    return hash_batches


def flag_findings(probabilities: np.ndarray, thresholds: np.ndarray, labels: list[str]) -> list[list[str]]:
    """For each image (row), the labels whose probability reaches the model's threshold for that label."""
    hits = np.asarray(probabilities) >= np.asarray(thresholds)[np.newaxis, :]
    return [[labels[j] for j in np.flatnonzero(row)] for row in hits]


def card_settings(card: dict, model_url: str) -> dict:
    """The plain values workers need from ``model.json``; a missing key is an error that names it."""
    try:
        labels = list(card["labels"])
        thresholds = [float(card["thresholds"][label]) for label in labels]
        return {"model_version": str(card["model_version"]), "input_size": int(card["input_size"]),
                "normalization": {**card["normalization"], "mean": float(card["normalization"]["mean"]),
                                  "std": float(card["normalization"]["std"])},
                "labels": labels, "thresholds": thresholds}
    except (KeyError, TypeError) as error:
        raise ValueError(f"{model_url}/model.json lacks {error} (needs model_version, input_size, "
                         f"normalization.mean/std, labels and a threshold per label)") from error


def score_files(plain: dict, model_broadcast, batch_size: int):
    """The mapInPandas function: file bytes in, one row per file out (probabilities or a quarantine reason)."""
    size, labels = plain["input_size"], plain["labels"]
    thresholds = np.asarray(plain["thresholds"], np.float32)
    columns = [name.split()[0] for name in SCORED_DDL.split(", ")]

    def score_batches(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for frame in batches:
            rows, pixels = [], []
            for path, digest, content in zip(frame["source_path"], frame["content_sha256"], frame["content"]):
                row = {"source_path": path, "content_sha256": digest, "image_format": None,
                       "probabilities": None, "flagged": None, "input_intensity": None, "reason": None,
                       "detail": None}
                try:
                    row["image_format"] = sniff_format(content)
                    # the model's input exactly as preprocess made its training images
                    pixels.append(decode_resized(content, size))
                except ImageError as error:
                    row["reason"], row["detail"] = error.reason, error.detail
                row["image_id"], row["source_path"] = stored_identity(path, digest, row["image_format"])
                rows.append(row)
            if pixels:
                model = loaded_model(plain["model_version"], model_broadcast.value)
                inputs = model_inputs(np.stack(pixels), plain["normalization"])
                probabilities = predict_probabilities(model, inputs, batch_size, len(labels))
                flags = flag_findings(probabilities, thresholds, labels)
                # what the model saw, as train measured its val split (the same formula)
                intensities = mean_intensity(inputs, plain["normalization"])
                usable = (row for row in rows if row["reason"] is None)
                for row, vector, flagged, intensity in zip(usable, probabilities, flags, intensities):
                    row["probabilities"], row["flagged"], row["input_intensity"] = vector, flagged, float(intensity)
            yield pd.DataFrame(rows, columns=columns)

    return score_batches
