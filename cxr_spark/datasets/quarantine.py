"""The quarantine: every file or row a stage could not use, with a reason from :data:`REASONS` and a detail,
kept inside the dataset it belongs to (``<raw>/_quarantine``, ``<images>/_quarantine``, the batch store's).
"""
from __future__ import annotations

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


def write_counted(rows, path: str, dataset: str) -> dict[tuple[str, str], int]:
    """Write quarantine ``rows`` (:data:`QUARANTINE_SCHEMA`) as one Parquet file at ``path`` and return how many
    there are of each (kind, reason), counted by the job that writes them (a Spark ``Observation``), not by
    another job over what was written. Rows of a kind outside :data:`KINDS` or a reason outside :data:`REASONS`
    fail the run (:func:`check_reasons`) before anything is committed."""
    from pyspark.sql import Observation
    from pyspark.sql import functions as F

    kind, reason = F.col("kind"), F.col("reason")
    pairs = [(k, r) for k in KINDS for r in REASONS]
    unknown = ~kind.isin(*KINDS) | kind.isNull() | ~reason.isin(*REASONS) | reason.isNull()
    named = F.concat_ws(", ", F.coalesce(reason, F.lit("None")), F.coalesce(kind, F.lit("None")))
    observation = Observation()
    (rows.observe(observation, *[F.count(F.when((kind == k) & (reason == r), True)).alias(f"{k}/{r}")
                                 for k, r in pairs],
                  F.concat_ws("; ", F.array_sort(F.collect_set(F.when(unknown, named)))).alias("unknown"))
     .coalesce(1).write.parquet(path))
    counts = observation.get
    if counts["unknown"]:
        check_reasons({pair.split(", ")[0]: None for pair in counts["unknown"].split("; ")}, dataset)
        raise RuntimeError(f"{dataset} quarantine has rows of a kind outside {KINDS}: {counts['unknown']}")
    return {(k, r): counts[f"{k}/{r}"] for k, r in pairs if counts[f"{k}/{r}"]}
