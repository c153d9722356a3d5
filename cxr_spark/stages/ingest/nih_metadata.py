"""NIH's ``Data_Entry_2017.csv`` (and the official split lists) as ingest reads it: one row per image with its
labels, split and demographics, and the reason a row cannot be used.
"""
from __future__ import annotations

import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cxr_spark.config import IngestConfig
from cxr_spark.core.guards import UsageError, check_metadata_file, metadata_header_problem
from cxr_spark.core.labels import NUM_LABELS, UnknownFindingError, parse_finding_labels
from cxr_spark.core.metadata import SPARK_DDL, age_problem, parse_age
from cxr_spark.core.splits import hash_split, official_split
from cxr_spark.io.storage import local_path, to_url


def _metadata_rows(settings: dict, has_test_list: bool):
    """The mapInPandas function that parses ages and labels and assigns splits for metadata rows."""
    seed, val_fraction, test_fraction = settings["split_seed"], settings["val_fraction"], settings["test_fraction"]

    def parse(batches):
        for frame in batches:
            labels, splits, reasons, details = [], [], [], []
            for row in frame.itertuples(index=False):
                reason = detail = split = None
                vector = [0] * NUM_LABELS
                problem = age_problem(row.age_text)
                if problem:
                    reason, detail = "unparseable_age", problem
                try:
                    vector = parse_finding_labels(row.finding_labels).tolist()
                except UnknownFindingError as error:
                    reason, detail = "unknown_finding", f"Finding Labels {row.finding_labels!r}: {error}"
                if pd.isna(row.patient_id):
                    reason, detail = "missing_patient_id", "Patient ID is empty or not a number"
                elif has_test_list:
                    split = official_split(bool(row.in_test_list), int(row.patient_id), seed, val_fraction)
                else:
                    split = hash_split(int(row.patient_id), seed, val_fraction, test_fraction)
                labels.append(vector)
                splits.append(split)
                reasons.append(reason)
                details.append(detail)
            yield pd.DataFrame({
                "image_id": frame["image_id"], "patient_id": frame["patient_id"],
                "follow_up": frame["follow_up"], "age": frame["age_text"].map(parse_age).astype("Int32"),
                "sex": frame["sex"], "view": frame["view"], "finding_labels": frame["finding_labels"],
                "labels": labels, "split": splits, "meta_reason": reasons, "meta_detail": details,
            })

    return parse


METADATA_OUT = ("image_id string, patient_id int, follow_up int, age int, sex string, view string, "
                "finding_labels string, labels array<smallint>, split string, meta_reason string, meta_detail string")


def read_metadata(spark: SparkSession, metadata: str, split_lists: str | None, settings: IngestConfig) -> DataFrame:
    """Parse a Data_Entry CSV positionally with an explicit schema; add labels, age and split.

    Positional parsing reads both published layouts: v2020's bracketed header names with commas
    inside, and 2017 copies whose lines end with an extra empty column (extra fields are dropped).
    """
    table = (spark.read.schema(SPARK_DDL).option("header", "true").option("mode", "PERMISSIVE")
             .csv(to_url(metadata)))
    has_test_list = split_lists is not None
    if has_test_list:
        test_ids = (spark.read.text(to_url(split_lists) + "/test_list.txt")
                    .select(F.trim("value").alias("image_id")).where("image_id != ''").distinct()
                    .withColumn("in_test_list", F.lit(True)))
        table = table.join(F.broadcast(test_ids), "image_id", "left").fillna(False, ["in_test_list"])
    else:
        table = table.withColumn("in_test_list", F.lit(False))
    settings_plain = {"split_seed": settings.split_seed, "val_fraction": settings.val_fraction,
                      "test_fraction": settings.test_fraction}
    return table.mapInPandas(_metadata_rows(settings_plain, has_test_list), METADATA_OUT)


def check_metadata(spark: SparkSession, metadata: str | None) -> None:
    """Refuse a metadata file that is not a published NIH layout, on any filesystem
    (:func:`cxr_spark.core.guards.check_metadata_file`; Spark reads the first line of a remote one)."""
    if not metadata or local_path(to_url(metadata)) is not None:
        check_metadata_file(local_path(to_url(metadata)) if metadata else None)
        return
    first = spark.read.text(to_url(metadata)).first()
    problem = metadata_header_problem((first[0] if first else "").encode("utf-8"))
    if problem:
        raise UsageError(f"--metadata {metadata}: not an NIH Data_Entry_2017 file: {problem}")
