"""Each file's fate: joined with the metadata (or the Kaggle folder layout) and the existing dataset's ids,
kept, skipped or quarantined with a reason; :func:`plan` decides beforehand what pass 1 may write itself.
"""
from __future__ import annotations

import logging

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cxr_spark.config import PreprocessConfig
from cxr_spark.core.identity import DICOM_NAME
from cxr_spark.core.labels import LABELS, NUM_LABELS
from cxr_spark.datasets.raw import RawSchema
from cxr_spark.io.session import planned_size_bytes
from cxr_spark.io.storage import FileSystem, listed_files, to_url
from cxr_spark.stages.ingest.copy_pass import image_tasks, schema_columns, tasks_for
from cxr_spark.stages.ingest.files import INSPECT_OUT
from cxr_spark.stages.ingest.pass1 import FROM_FILE, KAGGLE_CLASSES, KAGGLE_PATH, encode_labels, identify

log = logging.getLogger(__name__)


def plan_writes(spark: SparkSession, files: DataFrame, paths: list[str], layout: str, meta: DataFrame | None,
                existing: DataFrame | None, images_settings: PreprocessConfig | None = None) -> DataFrame:
    """Pass 1's input when it writes ``raw`` itself: every listed file (``paths``, the file index of ``files``:
    0-byte ones included) with the raw columns that do not depend on its content, and ``writable``: what
    :func:`decide_fates` will say from the path, the metadata and the existing ids alone lets the file into
    ``raw`` if its own checks pass.

    Decided by name, a file is never let in wrongly: its id there is its name, and only DICOM (left to
    pass 2) gets another id, from its content. Tasks hold about ``spark.sql.files.maxPartitionBytes`` of
    files each (the file index knows their total without reading them), or, when pass 1 writes the images
    dataset too (``resize``, its settings), about one row group of its images each (:func:`image_tasks`).
    """
    listed = listed_files(spark, paths).select(
        "path", *[F.lit(None).cast(dtype).alias(name) for name, dtype in
                  (field.split() for field in ("length long, content_sha256 string, " + INSPECT_OUT).split(", "))])
    planned = decide_fates(identify(listed, layout), meta, layout, existing)
    writable = F.col("reason").isNull() & ~F.col("in_existing") & ~F.col("path").rlike(DICOM_NAME)
    columns = [name for name in RawSchema.fields if name not in FROM_FILE and name != "png"]
    total_bytes = planned_size_bytes(files)
    # Tasks by the file's name and rows in name order: the same dump gives the same part files, row groups
    # and Petastorm shards wherever it is mounted and in whatever order Spark's tasks finish (the shards
    # decide what each Horovod rank trains on, so training is reproducible from the dump, not only from a
    # dataset).
    name = F.regexp_extract("path", r"([^/]*)$", 1)
    return (schema_columns(planned.withColumn("labels", encode_labels("labels")), columns, "path",
                            writable.alias("writable"))
            .repartition(image_tasks(spark, len(paths), images_settings) if images_settings
                         else tasks_for(spark, total_bytes), name)
            .sortWithinPartitions(name, "path"))


def existing_dataset(spark: SparkSession, out: str) -> DataFrame | None:
    """The raw dataset already at ``out`` (for append-new), or None when there is none yet."""
    url = to_url(out)
    if not FileSystem(spark, url).exists(f"{url}/_common_metadata"):
        log.info("append-new: no dataset at %s yet; ingesting everything", url)
        return None
    return spark.read.parquet(url)


def _kaggle_labels(index: DataFrame) -> DataFrame:
    """Labels and split from ``<split>/<NORMAL|PNEUMONIA>/`` folders (PNEUMONIA sets the Pneumonia bit)."""
    folders = F.regexp_extract("path", KAGGLE_PATH, 2)
    label = F.regexp_extract("path", KAGGLE_PATH, 3)
    pneumonia = LABELS.index(KAGGLE_CLASSES["PNEUMONIA"])
    vector = F.array(*[(F.lit(1) if i == pneumonia else F.lit(0)).cast("smallint") for i in range(NUM_LABELS)])
    in_layout = folders != ""
    return (index.withColumn("patient_id", F.lit(None).cast("int"))
            .withColumn("follow_up", F.lit(None).cast("int"))
            .withColumn("finding_labels", F.when(label == "PNEUMONIA", F.lit(KAGGLE_CLASSES["PNEUMONIA"]))
                        .when(in_layout, F.lit("No Finding")))
            .withColumn("labels", F.when(label == "PNEUMONIA", vector)
                        .otherwise(F.array_repeat(F.lit(0).cast("smallint"), NUM_LABELS)))
            .withColumn("split", F.when(in_layout, folders))
            .withColumn("meta_reason", F.when(~in_layout, F.lit("no_metadata")))
            .withColumn("meta_detail", F.when(~in_layout, F.lit(
                "outside the Kaggle layout <train|val|test>/<NORMAL|PNEUMONIA>/: no label"))))


def decide_fates(index: DataFrame, meta: DataFrame | None, layout: str, existing: DataFrame | None) -> DataFrame:
    """Each listed file with its metadata and, if it cannot be used, a quarantine reason.

    Precedence: the file's own problem, a repeated image id, a clash with the existing dataset,
    then metadata problems. ``skipped`` marks files already in the existing dataset (append-new), with the
    same content; ``in_existing`` files whose id is there at all; ``has_metadata`` files whose id has a row in
    ``meta`` (always true without metadata: the folders or nothing label them).
    """
    if layout == "kaggle":
        labelled, has_meta = _kaggle_labels(index), F.lit(True)
    elif meta is None:  # unlabeled; DICOM headers still give view, sex and age
        labelled = (index.withColumn("patient_id", F.lit(None).cast("int"))
                    .withColumn("follow_up", F.lit(None).cast("int"))
                    .withColumn("finding_labels", F.lit(None).cast("string"))
                    .withColumn("labels", F.array_repeat(F.lit(0).cast("smallint"), NUM_LABELS))
                    .withColumn("split", F.lit("unlabeled"))
                    .withColumn("meta_reason", F.lit(None).cast("string"))
                    .withColumn("meta_detail", F.lit(None).cast("string")))
        has_meta = F.lit(True)
    else:
        labelled = (index.drop("view", "sex", "age")
                    .join(meta.withColumn("_has_meta", F.lit(True)), "image_id", "left"))
        has_meta = F.col("_has_meta").isNotNull()
    if existing is not None:
        labelled = labelled.join(existing.select("image_id", F.col("content_sha256").alias("_existing_sha"))
                                 .dropDuplicates(["image_id"]), "image_id", "left")
    else:
        labelled = labelled.withColumn("_existing_sha", F.lit(None).cast("string"))
    in_existing = F.col("_existing_sha").isNotNull()
    same_content = in_existing & (F.col("_existing_sha") == F.col("content_sha256"))
    reason = (F.when(F.col("reason").isNotNull(), F.col("reason"))
              .when(F.col("duplicate_rank") > 1, F.lit("duplicate_image_id"))
              .when(in_existing & ~same_content, F.lit("duplicate_image_id"))
              .when(same_content, F.lit(None))
              .when(~has_meta, F.lit("no_metadata"))
              .when(F.col("meta_reason").isNotNull(), F.col("meta_reason")))
    detail = (F.when(F.col("reason").isNotNull(), F.col("detail"))
              .when(F.col("duplicate_rank") > 1, F.concat(F.lit("image id also at an earlier path; kept the first of "),
                                                         F.col("image_id")))
              .when(in_existing & ~same_content,
                    F.lit("image id already in the existing dataset with different content (SHA-256)"))
              .when(~has_meta, F.lit("no row in the metadata CSV for this image id"))
              .otherwise(F.col("meta_detail")))
    skipped = F.col("reason").isNull() & (F.col("duplicate_rank") == 1) & same_content
    # reason and detail in one step: both read the file's own reason, not the other's result
    return (labelled.withColumn("skipped", F.coalesce(skipped, F.lit(False)))
            .withColumn("in_existing", in_existing)
            .withColumns({"reason": reason, "detail": detail})
            .withColumn("kind", F.lit("file"))
            .withColumn("has_metadata", has_meta)
            .drop("meta_reason", "meta_detail", "_has_meta", "_existing_sha"))


def ingest_quarantine(decided: DataFrame, meta: DataFrame | None, boxes: DataFrame | None) -> DataFrame:
    """Rejected files, plus metadata rows that name no listed file (or that could not be parsed), plus
    unusable bounding-box rows."""
    rows = decided.where("reason IS NOT NULL").select("source_path", "image_id", "reason", "detail", "kind")
    others = []
    if meta is not None:
        listed = decided.select("image_id").distinct()
        first, repeated = meta.where("meta_rank = 1"), meta.where("meta_rank > 1")
        orphans = first.join(listed, "image_id", "left_anti").select(
            "image_id", F.coalesce("meta_reason", F.lit("no_image")).alias("reason"),
            F.coalesce("meta_detail", F.lit("metadata row names an image that is not in the dump")).alias("detail"),
            F.lit("metadata").alias("kind"))
        duplicates = repeated.select(
            "image_id", F.lit("duplicate_image_id").alias("reason"),
            F.lit("a later metadata row for an image id already described; the first row was used").alias("detail"),
            F.lit("metadata").alias("kind"))
        others += [orphans, duplicates]
    if boxes is not None:
        others.append(boxes.where("reason IS NOT NULL").select("image_id", "reason", "detail",
                                                               F.lit("bbox").alias("kind")))
    for other in others:
        rows = rows.unionByName(other.select(F.lit(None).cast("string").alias("source_path"), "image_id",
                                             "reason", "detail", "kind"))
    return rows


def list_fates(decided: DataFrame) -> list[dict]:
    """Files by fate (accepted, skipped, written by pass 1, format, conversion, split, and whether theirs is
    the first path of an image id with metadata): how many and their bytes, in one Spark job over the cached
    decisions (pass 2 sizes its tasks by the bytes; the run's counts use both). A file pass 1 wrote into
    ``raw`` that the decisions do not accept is a bug: RuntimeError."""
    first_with_metadata = (F.col("duplicate_rank") == 1) & F.col("has_metadata")
    fates = [row.asDict() for row in
             decided.groupBy(F.col("reason").isNull().alias("accepted"), "skipped", "raw_written", "format",
                             "conversion", "split", first_with_metadata.alias("first_with_metadata"))
             .agg(F.count("*").alias("count"), F.coalesce(F.sum("length"), F.lit(0)).alias("bytes")).collect()]
    wrong = sum(fate["count"] for fate in fates
                if fate["raw_written"] and not (fate["accepted"] and not fate["skipped"]))
    if wrong:
        raise RuntimeError(f"pass 1 wrote {wrong} files into raw that the decisions after it do not accept: {fates}")
    return fates
