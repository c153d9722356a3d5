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
