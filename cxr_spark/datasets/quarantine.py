"""The quarantine: every file or row a stage could not use, with a reason from :data:`REASONS` and a detail,
kept inside the dataset it belongs to (``<raw>/_quarantine``, ``<images>/_quarantine``, the batch store's).
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cxr_spark.io.counting import observe_counts
from cxr_spark.io.storage import FileSystem

#: The quarantine dataset, inside the dataset it belongs to (``raw`` or ``images_<size>``): replaced
#: atomically with it, and skipped by Spark and Petastorm (names starting with ``_``).
QUARANTINE_DIR = "_quarantine"
QUARANTINE_SCHEMA = "source_path string, image_id string, reason string, detail string, kind string"

#: The quarantine ``reason`` vocabulary (README documents each).
REASONS = ("empty_file", "not_an_image", "corrupt_image", "unsupported_format", "image_too_large",
           "no_metadata", "no_image", "duplicate_image_id", "unknown_finding", "missing_patient_id",
           "unparseable_age", "invalid_bbox")


def check_reasons(counts_by_reason: dict, dataset: str) -> None:
    """Refuse a quarantine whose rows carry a reason outside :data:`REASONS` (or none): every row must say
    why in the documented words. Called with the reason counts of what was written, before the commit."""
    unknown = sorted(str(reason) for reason in counts_by_reason if reason not in REASONS)
    if unknown:
        raise RuntimeError(f"{dataset} quarantine has rows with reasons outside the documented vocabulary: "
                           f"{', '.join(unknown)} (cxr_spark.datasets.quarantine.REASONS)")


#: What a quarantine row is about: a listed file, a metadata row, a bounding-box row.
KINDS = ("file", "metadata", "bbox")


def write_counted(rows: DataFrame, path: str, dataset: str) -> tuple[dict[str, int], dict[str, int]]:
    """Write quarantine ``rows`` (:data:`QUARANTINE_SCHEMA`) as one Parquet file at ``path`` and return how many
    there are of each kind and of each reason, counted by the job that writes them (:func:`observe_counts`),
    not by another job over what was written. Rows of a kind outside :data:`KINDS` or a reason outside
    :data:`REASONS` fail the run (:func:`check_reasons`) before anything is committed."""
    conditions = {**{f"kind/{kind}": f"kind = '{kind}'" for kind in KINDS},
                  **{f"reason/{reason}": f"reason = '{reason}'" for reason in REASONS}}
    counted, counts = observe_counts(rows, {**conditions, "all": "true"})
    counted.coalesce(1).write.parquet(path)
    found = counts()
    by_kind = {kind: found[f"kind/{kind}"] for kind in KINDS if found[f"kind/{kind}"]}
    by_reason = {reason: found[f"reason/{reason}"] for reason in REASONS if found[f"reason/{reason}"]}
    if not found["all"] == sum(by_kind.values()) == sum(by_reason.values()):
        # a bug upstream: name the words, reading back what was written
        written = rows.sparkSession.read.schema(QUARANTINE_SCHEMA).parquet(path)
        outside = (written.where(~F.col("kind").isin(*KINDS) | F.col("kind").isNull()
                                 | ~F.col("reason").isin(*REASONS) | F.col("reason").isNull())
                   .groupBy("reason", "kind").agg(F.first("detail").alias("detail")).collect())
        example = "; ".join(sorted(f"{row.reason}, {row.kind}: {row.detail}" for row in outside)[:5])
        try:
            check_reasons(dict.fromkeys(row["reason"] for row in outside), dataset)
        except RuntimeError as error:
            raise RuntimeError(f"{error}; rows like {example}") from None
        raise RuntimeError(f"{dataset} quarantine has rows of a kind outside {KINDS}: "
                           f"{'; '.join(sorted(f'{row.reason}, {row.kind}' for row in outside))} ({found['all']} rows, "
                           f"{sum(by_kind.values())} of known kinds; rows like {example})")
    return by_kind, by_reason


def write_empty(spark: SparkSession, path: str) -> None:
    """A quarantine with no row at ``path`` (a folder of one Parquet file of :data:`QUARANTINE_SCHEMA`), written
    from the driver: no Spark job for what a stage knows to be empty."""
    schema = pa.schema([pa.field(field.split()[0], pa.string()) for field in QUARANTINE_SCHEMA.split(", ")])
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    FileSystem(spark, path).write_bytes(f"{path}/part-00000-empty.parquet", sink.getvalue().to_pybytes())
