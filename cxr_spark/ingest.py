"""Ingest: an image dump plus NIH metadata into the ``raw`` Petastorm dataset and a quarantine.

Pass 1 reads every listed file once, inspects its header and hashes it into a small table with no
image bytes; that table is joined with the parsed metadata to decide each file's fate. Pass 2 copies
the original PNG bytes of the accepted files into ``raw``. Counts are taken from what was written.
"""
from __future__ import annotations

import argparse
import logging
import time

import pandas as pd
from petastorm.etl.dataset_metadata import materialize_dataset
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from cxr_spark.config import IngestConfig, PipelineConfig, load_config, override
from cxr_spark.images import ImageError, png_header
from cxr_spark.labels import NUM_LABELS, UnknownFindingError, parse_finding_labels
from cxr_spark.manifest import finish_manifest
from cxr_spark.metadata import SPARK_DDL, parse_age
from cxr_spark.schemas import RawSchema, encode_column
from cxr_spark.splits import hash_split, official_split
from cxr_spark.storage import atomic_output, to_url

log = logging.getLogger(__name__)

IMAGE_GLOB = "*.{png,PNG}"
QUARANTINE_DIR = "_quarantine"  # inside the dataset: replaced atomically with it; Spark skips `_` names
QUARANTINE_SCHEMA = "source_path string, image_id string, reason string, detail string, kind string"
#: The quarantine ``reason`` vocabulary (README documents each).
REASONS = ("empty_file", "not_an_image", "corrupt_image", "unsupported_format", "no_metadata",
           "no_image", "duplicate_image_id", "unknown_finding", "missing_patient_id")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of PNGs, searched recursively (images_NNN/images/ or flat)")
    parser.add_argument("--metadata", help="Data_Entry_2017*.csv[.gz]; without it every image is 'unlabeled'")
    parser.add_argument("--split-lists", help="folder with NIH train_val_list.txt and test_list.txt (official split)")
    parser.add_argument("--out", required=True, help="raw dataset to write (replaced atomically)")
    parser.add_argument("--val-fraction", type=float, help="fraction of patients for validation")
    parser.add_argument("--test-fraction", type=float, help="fraction of patients for test (without split lists)")
    parser.add_argument("--split-seed", type=int, help="seed of the patient-wise split")


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    settings = override(config.ingest, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                        split_seed=args.split_seed)
    return ingest(spark, args.images, args.out, args.metadata, args.split_lists, settings)


# ---------------------------------------------------------------------------------------------
# per-row logic (pure pandas over pure functions; run inside executors)


def _inspect_files(content: pd.Series) -> pd.DataFrame:
    widths, heights, reasons, details = [], [], [], []
    for data in content:
        try:
            width, height, _, _ = png_header(data)
            if width == 0 or height == 0:
                raise ImageError("corrupt_image", f"PNG header says {width}x{height}")
            reason = detail = None
        except ImageError as error:
            width = height = None
            reason, detail = error.reason, error.detail
        widths.append(width)
        heights.append(height)
        reasons.append(reason)
        details.append(detail)
    return pd.DataFrame({"width": widths, "height": heights, "reason": reasons, "detail": details})


def _metadata_rows(settings: dict, has_test_list: bool):
    """The mapInPandas function that parses ages and labels and assigns splits for metadata rows."""
    seed, val_fraction, test_fraction = settings["split_seed"], settings["val_fraction"], settings["test_fraction"]

    def parse(batches):
        for frame in batches:
            labels, splits, reasons, details = [], [], [], []
            for row in frame.itertuples(index=False):
                reason = detail = split = None
                vector = [0] * NUM_LABELS
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


# ---------------------------------------------------------------------------------------------
# the job


def list_files(spark: SparkSession, images: str) -> DataFrame:
    """Every image-like file under ``images`` (recursively), as Spark's ``binaryFile`` rows."""
    return (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
            .option("pathGlobFilter", IMAGE_GLOB).load(to_url(images)))


def _index_files(spark: SparkSession, files: DataFrame) -> DataFrame:
    """One row per listed file: path, id, size, SHA-256 and header check (a quarantine reason or null).

    Spark's file sources make no split for a 0-byte file, so such files yield no row; the listing
    itself (the driver's file index) still names them, and they are added back as ``empty_file``.
    """
    inspect = F.pandas_udf(_inspect_files, "width int, height int, reason string, detail string")
    read = (files.select(
        F.col("path").alias("source_path"), F.col("length"), F.sha2("content", 256).alias("content_sha256"),
        inspect("content").alias("header"))
        .select("source_path", "length", "content_sha256", "header.*"))
    listing = spark.createDataFrame([(path,) for path in files.inputFiles()], "source_path string").select(
        # the file index spells local URLs file:///x where rows say file:/x
        F.regexp_replace("source_path", r"^([A-Za-z][A-Za-z0-9+.-]*):///", "$1:/").alias("source_path"))
    empty = listing.join(read.select("source_path"), "source_path", "left_anti").select(
        "source_path", F.lit(0).cast("long").alias("length"), F.lit(None).cast("string").alias("content_sha256"),
        F.lit(None).cast("int").alias("width"), F.lit(None).cast("int").alias("height"),
        F.lit("empty_file").alias("reason"), F.lit("zero bytes").alias("detail"))
    return (read.unionByName(empty)
            .withColumn("image_id", F.element_at(F.split("source_path", "/"), -1))
            .withColumn("duplicate_rank",
                        F.row_number().over(Window.partitionBy("image_id").orderBy("source_path"))))


def read_metadata(spark: SparkSession, metadata: str, split_lists: str | None, settings: IngestConfig) -> DataFrame:
    """Parse a Data_Entry CSV positionally with an explicit schema; add labels, age and split."""
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


def ingest(spark: SparkSession, images: str, out: str, metadata: str | None = None,
           split_lists: str | None = None, settings: IngestConfig | None = None) -> dict:
    """Ingest ``images`` (+ ``metadata``) into the raw dataset at ``out``; returns the run's counts."""
    settings = settings or load_config().ingest
    started = time.time()
    files = list_files(spark, images)  # listed once: pass 1 (index) and pass 2 (copy) share the file index
    index = _index_files(spark, files).cache()  # one small row per file, no image bytes

    meta = None
    if metadata:
        meta = (read_metadata(spark, metadata, split_lists, settings)
                .withColumn("meta_rank", F.row_number().over(
                    Window.partitionBy("image_id").orderBy(F.monotonically_increasing_id())))
                .cache())
    decided = _decide(index, meta.where("meta_rank = 1").drop("meta_rank") if meta is not None else None)
    decided.cache()

    with atomic_output(spark, out) as tmp:
        accepted = decided.where("reason IS NULL").drop("reason", "detail", "kind", "duplicate_rank", "length")
        encode_labels = F.pandas_udf(lambda labels: pd.Series(encode_column(RawSchema, "labels", labels)),
                                     "binary")
        raw = (files.select(F.col("path").alias("source_path"), F.col("content").alias("png"))
               # No shuffle of image bytes: binaryFile's input splits (spark.sql.files.maxPartitionBytes)
               # already give output files of tens of MB, and the broadcast join keeps them.
               .join(F.broadcast(accepted.withColumn("labels", encode_labels("labels"))), "source_path")
               .select(*[F.col(name).cast(RawSchema.fields[name].codec.spark_dtype()).alias(name)
                         for name in RawSchema.fields]))
        with materialize_dataset(spark, tmp, RawSchema, settings.row_group_size_mb):
            raw.write.parquet(tmp)
        _quarantine_rows(decided, meta).coalesce(1).write.parquet(f"{tmp}/{QUARANTINE_DIR}")
        counts = _count(spark, tmp, index, meta)
        finish_manifest(spark, tmp, "ingest", started,
                        config=settings, inputs={"images": to_url(images), "metadata": metadata,
                                                 "split_lists": split_lists},
                        counts=counts)
    index.unpersist()
    decided.unpersist()
    if meta is not None:
        meta.unpersist()
    return counts


def _decide(index: DataFrame, meta: DataFrame | None) -> DataFrame:
    """Each listed file with its metadata and, if it cannot be used, a quarantine reason."""
    if meta is None:
        labelled = (index.withColumn("patient_id", F.lit(None).cast("int"))
                    .withColumn("follow_up", F.lit(None).cast("int")).withColumn("age", F.lit(None).cast("int"))
                    .withColumn("sex", F.lit(None).cast("string")).withColumn("view", F.lit(None).cast("string"))
                    .withColumn("finding_labels", F.lit(None).cast("string"))
                    .withColumn("labels", F.array_repeat(F.lit(0).cast("smallint"), NUM_LABELS))
                    .withColumn("split", F.lit("unlabeled"))
                    .withColumn("meta_reason", F.lit(None).cast("string"))
                    .withColumn("meta_detail", F.lit(None).cast("string")))
        has_meta = F.lit(True)
    else:
        labelled = index.join(meta.withColumn("_has_meta", F.lit(True)), "image_id", "left")
        has_meta = F.col("_has_meta").isNotNull()
    reason = (F.when(F.col("reason").isNotNull(), F.col("reason"))
              .when(F.col("duplicate_rank") > 1, F.lit("duplicate_image_id"))
              .when(~has_meta, F.lit("no_metadata"))
              .when(F.col("meta_reason").isNotNull(), F.col("meta_reason")))
    detail = (F.when(F.col("reason").isNotNull(), F.col("detail"))
              .when(F.col("duplicate_rank") > 1, F.concat(F.lit("image id also at an earlier path; kept the first of "),
                                                         F.col("image_id")))
              .when(~has_meta, F.lit("no row in the metadata CSV for this image id"))
              .otherwise(F.col("meta_detail")))
    return (labelled.withColumn("reason", reason).withColumn("detail", detail)
            .withColumn("kind", F.lit("file"))
            .drop("meta_reason", "meta_detail", "_has_meta"))


def _quarantine_rows(decided: DataFrame, meta: DataFrame | None) -> DataFrame:
    """Rejected files, plus metadata rows that name no listed file (or that could not be parsed)."""
    rows = decided.where("reason IS NOT NULL").select("source_path", "image_id", "reason", "detail", "kind")
    if meta is None:
        return rows
    listed = decided.select("image_id").distinct()
    first, repeated = meta.where("meta_rank = 1"), meta.where("meta_rank > 1")
    orphans = first.join(listed, "image_id", "left_anti").select(
        "image_id", F.coalesce("meta_reason", F.lit("no_image")).alias("reason"),
        F.coalesce("meta_detail", F.lit("metadata row names an image that is not in the dump")).alias("detail"))
    duplicates = repeated.select(
        "image_id", F.lit("duplicate_image_id").alias("reason"),
        F.lit("a later metadata row for an image id already described; the first row was used").alias("detail"))
    return rows.unionByName(orphans.unionByName(duplicates).select(
        F.lit(None).cast("string").alias("source_path"), "image_id", "reason", "detail",
        F.lit("metadata").alias("kind")))


def _count(spark: SparkSession, tmp: str, index: DataFrame, meta: DataFrame | None) -> dict:
    """Counts from what was written, so they reconcile with the outputs themselves."""
    raw = spark.read.parquet(tmp)
    quarantine = spark.read.schema(QUARANTINE_SCHEMA).parquet(f"{tmp}/{QUARANTINE_DIR}")
    by_kind = {row["kind"]: row["count"] for row in quarantine.groupBy("kind").count().collect()}
    by_reason = {row["reason"]: row["count"] for row in quarantine.groupBy("reason").count().collect()}
    by_split = {row["split"]: row["count"] for row in raw.groupBy("split").count().collect()}
    counts = {
        "files_listed": index.count(),
        "ingested": sum(by_split.values()),
        "quarantined": by_kind.get("file", 0),
        "metadata_rows": meta.count() if meta is not None else 0,
        "metadata_matched": (meta.where("meta_rank = 1").join(index.select("image_id").distinct(), "image_id")
                             .count() if meta is not None else 0),
        "metadata_quarantined": by_kind.get("metadata", 0),
        "splits": dict(sorted(by_split.items())),
        "quarantine_reasons": dict(sorted(by_reason.items())),
    }
    if (counts["files_listed"] != counts["ingested"] + counts["quarantined"]
            or counts["metadata_rows"] != counts["metadata_matched"] + counts["metadata_quarantined"]):
        raise RuntimeError(f"ingest counts do not reconcile: {counts}")
    return counts
