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
    listed = listed_files(spark, paths).selectExpr(
        "path", *[f"CAST(NULL AS {dtype}) AS {name}" for name, dtype in
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
    return (schema_columns(planned.withColumns({"labels": encode_labels("labels"), "writable": writable}), columns,
                           "path", "writable")
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
    return index.withColumns({  # one projection: each DataFrame step is analysed anew on the driver
        "patient_id": F.lit(None).cast("int"),
        "follow_up": F.lit(None).cast("int"),
        "finding_labels": F.when(label == "PNEUMONIA", F.lit(KAGGLE_CLASSES["PNEUMONIA"]))
                           .when(in_layout, F.lit("No Finding")),
        "labels": F.when(label == "PNEUMONIA", vector).otherwise(F.array_repeat(F.lit(0).cast("smallint"), NUM_LABELS)),
        "split": F.when(in_layout, folders),
        "meta_reason": F.when(~in_layout, F.lit("no_metadata")),
        "meta_detail": F.when(~in_layout, F.lit("outside the Kaggle layout <train|val|test>/<NORMAL|PNEUMONIA>/: "
                                               "no label"))})


def _unlabeled(index: DataFrame) -> DataFrame:
    """No metadata: every file ``unlabeled`` (DICOM headers still give view, sex and age)."""
    return index.selectExpr("*", "CAST(NULL AS int) AS patient_id", "CAST(NULL AS int) AS follow_up",
                            "CAST(NULL AS string) AS finding_labels",
                            f"array_repeat(CAST(0 AS smallint), {NUM_LABELS}) AS labels", "'unlabeled' AS split",
                            "CAST(NULL AS string) AS meta_reason", "CAST(NULL AS string) AS meta_detail")


def decide_fates(index: DataFrame, meta: DataFrame | None, layout: str, existing: DataFrame | None) -> DataFrame:
    """Each listed file with its metadata and, if it cannot be used, a quarantine reason.

    Precedence: the file's own problem, a repeated image id, a clash with the existing dataset,
    then metadata problems. ``skipped`` marks files already in the existing dataset (append-new), with the
    same content; ``in_existing`` files whose id is there at all; ``has_metadata`` files whose id has a row in
    ``meta`` (always true without metadata: the folders or nothing label them).

    The decisions are one projection written as SQL text: ingest plans them twice per run, and each DataFrame
    step, and each Column built in Python, is a call into the driver's JVM (docs/benchmarks.md).
    """
    has_meta = "true"
    if layout == "kaggle":
        labelled = _kaggle_labels(index)
    elif meta is None:
        labelled = _unlabeled(index)
    else:
        labelled = index.drop("view", "sex", "age").join(meta.selectExpr("*", "true AS _has_meta"), "image_id", "left")
        has_meta = "_has_meta IS NOT NULL"
    existing_sha = "CAST(NULL AS string)"
    if existing is not None:
        labelled = labelled.join(existing.select("image_id", F.col("content_sha256").alias("_existing_sha"))
                                 .dropDuplicates(["image_id"]), "image_id", "left")
        existing_sha = "_existing_sha"
    in_existing = f"({existing_sha} IS NOT NULL)"
    same_content = f"({in_existing} AND {existing_sha} = content_sha256)"
    clash = f"{in_existing} AND NOT {same_content}"
    # reason and detail both read the file's own reason (the input column), not each other's result
    decided = {
        "reason": f"""CASE WHEN reason IS NOT NULL THEN reason
                           WHEN duplicate_rank > 1 THEN 'duplicate_image_id'
                           WHEN {clash} THEN 'duplicate_image_id'
                           WHEN {same_content} THEN NULL
                           WHEN NOT ({has_meta}) THEN 'no_metadata'
                           WHEN meta_reason IS NOT NULL THEN meta_reason END""",
        "detail": f"""CASE WHEN reason IS NOT NULL THEN detail
                           WHEN duplicate_rank > 1 THEN concat('image id also at an earlier path; kept the first of ',
                                                               image_id)
                           WHEN {clash} THEN 'image id already in the existing dataset with different content (SHA-256)'
                           WHEN NOT ({has_meta}) THEN 'no row in the metadata CSV for this image id'
                           ELSE meta_detail END""",
    }
    added = {
        "skipped": f"coalesce(reason IS NULL AND duplicate_rank = 1 AND {same_content}, false)",
        "in_existing": in_existing,
        "kind": "'file'",
        "has_metadata": has_meta,
    }
    dropped = {"meta_reason", "meta_detail", "_has_meta", "_existing_sha"}
    kept = [f"{decided[name]} AS {name}" if name in decided else f"`{name}`"
            for name in labelled.columns if name not in dropped]
    return labelled.selectExpr(*kept, *[f"{sql} AS {name}" for name, sql in added.items()])


def ingest_quarantine(decided: DataFrame, meta: DataFrame | None, boxes: DataFrame | None) -> DataFrame:
    """Rejected files, plus metadata rows that name no listed file (or that could not be parsed), plus
    unusable bounding-box rows."""
    rows = decided.where("reason IS NOT NULL").selectExpr("source_path", "image_id", "reason", "detail", "kind")
    if meta is not None:  # first rows whose id no file has (or which could not be parsed); every later row
        listed = decided.select("image_id").distinct()
        orphans = meta.where("meta_rank = 1").join(listed, "image_id", "left_anti").selectExpr(
            "CAST(NULL AS string) AS source_path", "image_id", "coalesce(meta_reason, 'no_image') AS reason",
            "coalesce(meta_detail, 'metadata row names an image that is not in the dump') AS detail",
            "'metadata' AS kind")
        duplicates = meta.where("meta_rank > 1").selectExpr(
            "CAST(NULL AS string) AS source_path", "image_id", "'duplicate_image_id' AS reason",
            "'a later metadata row for an image id already described; the first row was used' AS detail",
            "'metadata' AS kind")
        rows = rows.unionByName(orphans).unionByName(duplicates)
    if boxes is not None:
        rows = rows.unionByName(boxes.where("reason IS NOT NULL").selectExpr(
            "CAST(NULL AS string) AS source_path", "image_id", "reason", "detail", "'bbox' AS kind"))
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
