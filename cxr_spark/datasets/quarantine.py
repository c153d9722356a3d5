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
