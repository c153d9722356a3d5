"""Pass 2: the accepted files pass 1 could not write itself copied into ``raw`` (by Spark, or by the workers
reading their own files), and ``images_<size>`` written beside it.
"""
from __future__ import annotations

import math
import os
import uuid

import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cxr_spark.config import PreprocessConfig
from cxr_spark.datasets.images import PNG_BYTES_PER_PIXEL, images_schema, write_images
from cxr_spark.datasets.manifest import input_version
from cxr_spark.datasets.quarantine import QUARANTINE_DIR, QUARANTINE_SCHEMA
from cxr_spark.datasets.raw import RawSchema, metadata_columns
from cxr_spark.io.parquet_parts import written_rows
from cxr_spark.io.session import max_partition_bytes
from cxr_spark.io.storage import FileSystem, local_path, read_json, to_url
from cxr_spark.stages.ingest.files import IMAGE_OUT, dicom_as_png
from cxr_spark.stages.ingest.pass1 import raw_arrow_schema, raw_part_writer


def previous_images(spark: SparkSession, out: str, images_out: str) -> tuple[DataFrame, DataFrame] | None:
    """append-new with images_out: the rows and quarantine of the images dataset made from the existing raw
    dataset (None when there is none yet). An images dataset made from another raw is an error."""
    images_url = to_url(images_out)
    if not FileSystem(spark, images_url).exists(f"{images_url}/_manifest.json"):
        if spark.read.parquet(to_url(out)).limit(1).count():
            raise ValueError(f"append-new with --images-out: {images_url} does not exist yet but {to_url(out)} "
                             f"has rows; run preprocess once to make it, then append")
        return None
    made_from = read_json(spark, f"{images_url}/_manifest.json").get("inputs", {}).get("raw", {})
    current = input_version(spark, out)
    if (made_from.get("url"), made_from.get("finished_at")) != (current["url"], current.get("finished_at")):
        raise ValueError(f"append-new with --images-out: {images_url} was not made from the raw dataset now at "
                         f"{current['url']} (it was made from {made_from}); run preprocess to remake it first")
    return (spark.read.parquet(images_url),
            spark.read.schema(QUARANTINE_SCHEMA).parquet(f"{images_url}/{QUARANTINE_DIR}"))


def write_images_beside(spark: SparkSession, out: str, raw_tmp: str, images_out: str, images_tmp: str, stage: str,
                        images_settings: PreprocessConfig, previous: tuple[DataFrame, DataFrame] | None,
                        started: float, allow_empty: bool, data: str = "unknown") -> dict:
    """``images_<size>`` (into ``images_tmp``, committed with raw) from the images pass 1 resized: the rows its
    tasks wrote themselves, and the others (DICOM) from its index rows joined to the metadata of the raw
    rows just written to ``raw_tmp``, which becomes ``out``."""
    # every file read here was written by this run: read with the schemas it was written with (no Spark job
    # to infer one), and nothing of it is read unless write_images needs rows beyond pass 1's own files
    raw = spark.read.schema(RawSchema.as_spark_schema()).parquet(raw_tmp)
    columns = [field.name for field in images_schema(images_settings.size).fields.values()]
    index = spark.read.schema(f"path string, {IMAGE_OUT}").parquet(f"{stage}/index")
    if FileSystem(spark, stage).exists(f"{stage}/accepted"):
        accepted = spark.read.schema("path string, image_id string").parquet(f"{stage}/accepted")
    else:  # pass 1 wrote the images_<size> row of every file it accepted
        accepted = spark.createDataFrame([], "path string, image_id string")
    pass1_images = index.join(accepted, "path").drop("path")
    # columns by SQL name: a name given to select() is three calls into the JVM, one in selectExpr()
    names = [f"`{name}`" for name in columns]
    rows = (raw.selectExpr(*[f"`{name}`" for name in metadata_columns()]).join(pass1_images, "image_id")
            .selectExpr(*names))
    if previous is not None:
        rows = previous[0].selectExpr(*names).unionByName(rows)

    def quarantine(written, n_images):  # pass 1 quarantined what did not decode in raw's own quarantine
        return previous[1] if previous is not None else None

    made_from = {**input_version(spark, raw_tmp), "url": to_url(out)}  # the raw run committed with it
    return write_images(spark, rows, images_out, images_settings, n_rows=written_rows(spark, raw_tmp),
                        quarantine=quarantine, started=started, inputs={"raw": made_from},
                        extra={"written_by": "ingest --images-out", "data": data}, parts=local_path(f"{stage}/images"),
                        into=images_tmp, allow_empty=allow_empty)


def schema_columns(frame: DataFrame, names=tuple(RawSchema.fields), *others: str) -> DataFrame:
    """The RawSchema columns ``names``, in order and with their Spark types, then the columns ``others``."""
    return frame.selectExpr(*[f"CAST(`{name}` AS {RawSchema.fields[name].codec.spark_dtype().simpleString()}) AS {name}"
                              for name in names], *[f"`{name}`" for name in others])


def copy_in_spark(files: DataFrame, accepted: DataFrame) -> DataFrame:
    """Pass 2 through the JVM (HDFS, S3, or ``worker_file_io = false``): the accepted files' bytes from
    ``binaryFile`` joined to their metadata, DICOM re-encoded as PNG, as ``png``."""
    # No shuffle of image bytes: binaryFile's input splits (spark.sql.files.maxPartitionBytes and
    # openCostInBytes) already give output files of tens of MB, and the broadcast join keeps them.
    raw = files.select("path", "content").join(F.broadcast(accepted), "path")
    if accepted.where("format = 'dicom'").limit(1).count():
        # Only DICOM bytes cross to Python (a Python UDF sees every row: the others pass as nulls).
        to_png = F.pandas_udf(dicom_as_png, "binary")
        return raw.withColumn("png", F.coalesce(to_png(F.when(F.col("format") == "dicom", F.col("content"))),
                                                F.col("content")))
    return raw.withColumn("png", F.col("content"))


def image_tasks(spark: SparkSession, n_files: int, settings: PreprocessConfig) -> int:
    """Pass 1's tasks when each writes the images_<size> rows of its files, one Parquet file per split: as
    many as make about one row group of images each, so the images dataset gets files of row-group size
    (Petastorm indexes a dataset's row groups with a Spark task per file), at least ``min_files_per_split``
    (each split then gets that many files, for Horovod's shards) and one per core."""
    image_bytes = n_files * settings.size**2 * PNG_BYTES_PER_PIXEL
    return max(settings.min_files_per_split, spark.sparkContext.defaultParallelism,
               math.ceil(image_bytes / (settings.row_group_size_mb * 2**20)))


def tasks_for(spark: SparkSession, total_bytes: int) -> int:
    """Tasks of about ``spark.sql.files.maxPartitionBytes`` of files each, at least one per core."""
    per_task = max_partition_bytes(spark)
    return max(spark.sparkContext.defaultParallelism, math.ceil(total_bytes / per_task))


def copy_in_workers(spark: SparkSession, accepted: DataFrame, tmp: str, row_group_size_mb: int,
                     total_bytes: int, n_rows: int) -> None:
    """Pass 2 on local and mounted paths, for the accepted rows pass 1 did not write (``n_rows`` rows,
    metadata only, ``total_bytes`` of files): each task's Python worker reads its files and writes one
    raw Parquet file into ``tmp`` (:func:`raw_part_writer`): the image bytes never pass through the JVM,
    where copying them costs CPU (docs/ingest.md)."""
    folder = local_path(tmp)
    os.makedirs(folder, exist_ok=True)
    if n_rows:
        (schema_columns(accepted, [name for name in RawSchema.fields if name != "png"], "path", "format")
         .repartition(tasks_for(spark, total_bytes), "image_id")
         .mapInPandas(raw_part_writer(folder, uuid.uuid4().hex[:8], row_group_size_mb * 2**20), "rows long")
         .agg(F.sum("rows")).first())
    if not any(name.endswith(".parquet") and not name.startswith(".") for name in os.listdir(folder)):
        # Nothing to write: one empty file still gives readers the schema (as Spark's writer does).
        pq.write_table(raw_arrow_schema().empty_table(), os.path.join(folder, "part-00000-empty.parquet"))
