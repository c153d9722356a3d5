"""Pass 1 over the listed files: every file read once and indexed (:mod:`.files`), and, when the workers do
the file I/O, the files the plan accepts written into ``raw`` (and ``images_<size>``) by the task that read them.
"""
from __future__ import annotations

import os
import uuid
from contextlib import nullcontext

import pandas as pd
import pyarrow as pa
from pyspark import TaskContext
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_type
from pyspark.sql.types import BinaryType

from cxr_spark.core.identity import DICOM_ID_HEX, DICOM_NAME, DICOM_SOURCE, IMAGE_GLOB
from cxr_spark.core.image_formats import PNG_SIGNATURE
from cxr_spark.datasets.fields import encode_column
from cxr_spark.datasets.images import images_schema
from cxr_spark.datasets.raw import RawSchema, metadata_columns
from cxr_spark.io.parquet_parts import ParquetPartWriter, PartitionedPartWriter, image_rows_writer, write_parquet_part
from cxr_spark.io.storage import FileSystem, listed_files, local_file_path, local_path, read_local_file, to_url
from cxr_spark.stages.ingest.files import IMAGE_OUT, INSPECT_COLUMNS, INSPECT_OUT, index_file, stored_bytes

#: Kaggle "Chest X-Ray Images (Pneumonia)": <split>/<class>/<file>; the class sets one canonical label.
KAGGLE_CLASSES = {"NORMAL": None, "PNEUMONIA": "Pneumonia"}
KAGGLE_SPLITS = {"train": "train", "val": "val", "test": "test"}
KAGGLE_PATH = r"(?:^|/)((train|val|test)/(NORMAL|PNEUMONIA)/[^/]+)$"


def _index_partition(size: int | None, read_files: bool):
    """The mapInPandas function of pass 1 over ``binaryFile`` rows: :func:`index_file` of every file.

    With ``read_files`` each Python worker reads its files itself (local and mounted paths): the bytes
    then never pass through the JVM and Arrow on their way to Python (ingest of 2,000 PNGs: JVM CPU
    23 -> 14 s, wall 17.4 -> 11.7 s).
    Otherwise (HDFS, S3, ...) they come in the ``content`` column.
    """
    columns = ["content_sha256"] + INSPECT_COLUMNS + (["image", "pixel_mean", "pixel_std"] if size else [])

    def index(batches):
        for frame in batches:
            rows = [index_file(read_local_file(path) if read_files else content, size) for path, content in
                    zip(frame["path"], frame["path"] if read_files else frame["content"])]
            yield pd.concat([frame[["path", "length"]].reset_index(drop=True), pd.DataFrame(rows, columns=columns)],
                            axis=1)

    return index


#: RawSchema columns pass 1 learns from the file itself (besides ``png``); the others come from the plan
#: (:func:`plan_writes`).
FROM_FILE = ("height", "width", "content_sha256")
#: The metadata columns of an images_<size> row in a split's partition folder (which carries ``split``).
_IMAGE_ROW = tuple(name for name in metadata_columns() if name != "split")


def images_part_schema(size: int) -> pa.Schema:
    """images_<size>'s columns as Arrow types, but ``split`` (the partition folders carry it), every column
    nullable as in the files Spark's writer makes."""
    return pa.schema([pa.field(field.name, to_arrow_type(field.dataType))
                      for field in images_schema(size).as_spark_schema().fields if field.name != "split"])


def index_and_keep(writer: ParquetPartWriter, path: str, size: int | None, columns: dict | None,
                   image_writer: PartitionedPartWriter | None = None) -> tuple[dict, int, bool]:
    """Pass 1's work on one local file when it writes ``raw`` too: the file read straight into ``writer``'s
    buffer, :func:`index_file` of those bytes, and the bytes kept as a raw row (``columns``, the plan's, and
    the columns learnt from the file) when ``columns`` is given and the file's own checks pass; otherwise
    dropped. With ``image_writer`` (and ``size``) a kept file's resized image goes there as its
    ``images_<size>`` row, in its split's partition, instead of in the index row (whose ``image`` is then
    null). Returns the index row, the file's length, and whether it was kept."""
    data = writer.read_image(path)
    if data[:8] != PNG_SIGNATURE:  # PNG is checked and decoded from the buffer itself
        data = bytes(data)
    row = index_file(data, size)
    keep = columns is not None and row["reason"] is None and row["format"] != "dicom"
    if keep:
        kept = {**columns, **{name: row[name] for name in FROM_FILE}}
        writer.keep_image(kept)
        if image_writer is not None:
            image_writer.add_image(kept["split"], row["image"],
                              {**{name: kept[name] for name in _IMAGE_ROW}, "pixel_mean": row["pixel_mean"],
                               "pixel_std": row["pixel_std"]})
            row["image"] = None
    else:
        writer.drop_image()
    return row, len(data), keep


def _index_and_write_partition(size: int | None, folder: str, run: str, row_group_bytes: int,
                               image_parts: tuple[str, int] | None = None):
    """The mapInPandas function of pass 1 when the Python workers do the file I/O and ``raw`` is local:
    :func:`index_and_keep` of every planned file, keeping those the plan lets through (``writable``) whose
    own checks pass, as one Parquet file per task (:class:`ParquetPartWriter`). ``raw_written`` tells which.
    The decisions made after pass 1 then only check this choice (and copy what pass 1 could not write:
    DICOM, whose id is its content hash).

    With ``image_parts`` (a local folder, and row-group bytes) the task also writes the images_<size> rows of
    the files it keeps, as one Parquet file per split under ``<folder>/split=<split>/``
    (:class:`PartitionedPartWriter`): those images never cross to the JVM, nor are they shuffled to be
    written.
    """
    columns = ["content_sha256"] + INSPECT_COLUMNS + (["image", "pixel_mean", "pixel_std"] if size else [])
    schema = raw_arrow_schema()
    from_plan = [name for name in schema.names[:-1] if name not in FROM_FILE]  # the last is png
    image_schema = images_part_schema(size) if image_parts else None

    def index(batches):
        context = TaskContext.get()
        part, attempt = f"part-{context.partitionId():05d}-{run}.parquet", context.attemptNumber()
        os.makedirs(folder, exist_ok=True)
        with ParquetPartWriter(folder, part, schema, image_column="png", row_group_bytes=row_group_bytes,
                               attempt=attempt) as writer, \
                (PartitionedPartWriter(image_parts[0], part, image_schema, column="split", image_column="image",
                                       row_group_bytes=image_parts[1], attempt=attempt)
                 if image_parts else nullcontext()) as image_writer:
            for frame in batches:
                rows, lengths, written = [], [], []
                for plan in frame.itertuples(index=False):
                    row, length, keep = index_and_keep(
                        writer, local_file_path(plan.path), size,
                        {name: getattr(plan, name) for name in from_plan} if plan.writable else None, image_writer)
                    rows.append(row)
                    lengths.append(length)
                    written.append(keep)
                yield pd.concat([frame[["path"]].reset_index(drop=True),
                                 pd.DataFrame({"length": lengths}), pd.DataFrame(rows, columns=columns),
                                 pd.DataFrame({"raw_written": written})], axis=1)

    return index


@F.pandas_udf(BinaryType())
def encode_labels(labels: pd.Series) -> pd.Series:
    """Label vectors as RawSchema stores them (its NdarrayCodec); null stays null."""
    return pd.Series([None if vector is None else encode_column(RawSchema, "labels", [vector])[0]
                      for vector in labels])


def raw_arrow_schema() -> pa.Schema:
    """RawSchema as Arrow types, every column nullable as in the files Spark's writer makes."""
    return pa.schema([pa.field(field.name, to_arrow_type(field.dataType))
                      for field in RawSchema.as_spark_schema().fields])


def raw_part_writer(folder: str, run: str, row_group_bytes: int):
    """The mapInPandas function of pass 2 in the Python workers: each task reads its accepted files and
    writes them, with their metadata, as one raw Parquet file (:func:`write_parquet_part`); it returns the
    number of rows written."""
    schema = raw_arrow_schema()

    def write(batches):
        context = TaskContext.get()

        def rows():  # the files' own bytes are read straight into the writer's buffer
            for frame in batches:
                paths = [local_file_path(path) for path in frame.pop("path")]
                yield frame, [stored_bytes(read_local_file(path), "dicom") if file_format == "dicom" else path
                              for path, file_format in zip(paths, frame.pop("format"))]

        written = write_parquet_part(rows(), folder, f"part-{context.partitionId():05d}-{run}.parquet", schema,
                                     image_column="png", row_group_bytes=row_group_bytes,
                                     attempt=context.attemptNumber())
        yield pd.DataFrame({"rows": [written]})

    return write


def list_files(spark: SparkSession, images: str) -> DataFrame:
    """Every image-like file under ``images`` (recursively), as Spark's ``binaryFile`` rows."""
    return (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
            .option("pathGlobFilter", IMAGE_GLOB).load(to_url(images)))


def detect_layout(spark: SparkSession, images: str) -> str:
    """``kaggle`` when ``images`` holds any of train|val|test/NORMAL|PNEUMONIA, else ``nih``."""
    root, fs = to_url(images), FileSystem(spark, to_url(images))
    found = any(fs.exists(f"{root}/{split}/{name}") for split in KAGGLE_SPLITS for name in KAGGLE_CLASSES)
    return "kaggle" if found else "nih"


def _sql_string(text: str) -> str:
    """``text`` as a Spark SQL string literal (backslashes and quotes escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def index_files(spark: SparkSession, files: DataFrame, paths: list[str], layout: str, stage: str, size: int | None,
                read_files: bool, plan: DataFrame | None = None, raw_parts: str | None = None,
                row_group_bytes: int = 0, image_parts: tuple[str, int] | None = None) -> DataFrame:
    """One row per listed file: path, id, size, SHA-256, header facts and check (a quarantine reason or null).

    Pass 1 writes its rows to ``stage`` (Parquet; with ``size`` they carry the resized image too) and the
    decisions read back only the small columns. With a ``plan`` (:func:`plan_writes`) pass 1 runs over it and
    writes the raw rows it can into ``raw_parts`` (``raw_written``), and with ``image_parts`` their
    images_<size> rows too (:func:`_index_and_write_partition`). Without one, it runs over the
    ``binaryFile`` rows, and as Spark's file sources make no split for a 0-byte file, such files yield no
    row there; the listing itself (``paths``, :func:`~cxr_spark.io.storage.listed_paths` of ``files``) still
    names them, and they are added back as ``empty_file``.
    """
    out = "path string, length long, content_sha256 string, " + INSPECT_OUT + (", " + IMAGE_OUT if size else "")
    if plan is not None:
        partition = _index_and_write_partition(size, local_path(raw_parts), uuid.uuid4().hex[:8], row_group_bytes,
                                               image_parts)
        index = plan.mapInPandas(partition, out + ", raw_written boolean")
    else:
        source = files.select("path", "length") if read_files else files.select("path", "length", "content")
        index = source.mapInPandas(_index_partition(size, read_files), out)
    (image_rows_writer(index.write, "image") if size else index.write).parquet(stage)
    # read back with the schema it was written with: no Spark job to infer it from a footer
    written_columns = "path string, length long, content_sha256 string, " + INSPECT_OUT + (
        ", raw_written boolean" if plan is not None else "")
    read = spark.read.schema(written_columns).parquet(stage).selectExpr(  # SQL names: a call each, not three
        "path", "length", "content_sha256", *INSPECT_COLUMNS,
        "raw_written" if plan is not None else "false AS raw_written")
    if plan is None:
        empty = listed_files(spark, paths).join(read.select("path"), "path", "left_anti").select(
            "path", F.lit(0).cast("long").alias("length"), F.lit(None).cast("string").alias("content_sha256"),
            *[F.lit(None).cast(dtype).alias(name) for name, dtype in
              (field.split() for field in INSPECT_OUT.split(", ")[:-2])],
            F.lit("empty_file").alias("reason"), F.lit("zero bytes").alias("detail"), F.lit(False).alias("raw_written"))
        read = read.unionByName(empty)
    return identify(read, layout)


def identify(indexed: DataFrame, layout: str) -> DataFrame:
    """``image_id``, ``source_path`` and ``duplicate_rank`` of indexed files. ``path`` is the real location
    (used only to join pass 2); ``source_path`` is what is written, withheld for DICOM, whose id is
    :func:`cxr_spark.core.identity.dicom_id` as SQL: never a file name. SQL text: ingest plans this twice per run,
    and each Column built in Python is several calls into the driver's JVM."""
    is_dicom = f"(format = 'dicom' OR path RLIKE {_sql_string(DICOM_NAME)})"
    name = "element_at(split(path, '/'), -1)"
    if layout == "kaggle":  # NORMAL/ and PNEUMONIA/ reuse file names across splits: keep the folders in the id
        folders = f"regexp_extract(path, {_sql_string(KAGGLE_PATH)}, 1)"
        name = f"coalesce(CASE WHEN {folders} != '' THEN {folders} END, {name})"
    opaque = f"concat(substring(coalesce(content_sha256, sha2(path, 256)), 1, {DICOM_ID_HEX}), '.dcm')"
    image_id = f"CASE WHEN {is_dicom} THEN {opaque} ELSE {name} END"
    # the rank over the image_id column (not its expression): what the decisions cache is then partitioned by
    # image_id, and the joins and distinct ids after it need no shuffle of their own
    return (indexed.selectExpr(
        "*", f"{image_id} AS image_id",
        f"CASE WHEN {is_dicom} THEN concat({_sql_string(DICOM_SOURCE)}, {opaque}) ELSE path END AS source_path")
        .selectExpr("*", "row_number() OVER (PARTITION BY image_id ORDER BY path) AS duplicate_rank"))
