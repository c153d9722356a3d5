"""Ingest: an image dump (plus NIH metadata, or a Kaggle folder layout) into the ``raw`` Petastorm
dataset and a quarantine; with ``--images-out``, into ``images_<size>`` too, in the same pass.

Pass 1 reads every listed file once (each Python worker reads its own files when they are on a local
or mounted path; on HDFS or S3 they come from Spark's ``binaryFile`` source), sniffs its container (PNG,
JPEG, DICOM), reads size and pixel format from its header and hashes it (OpenSSL), into a staging table
with no image bytes; that table is joined with the parsed metadata (and, with ``--mode append-new``,
the existing dataset's ids) to decide each file's fate. ``raw`` holds the accepted files: PNG and JPEG
as their original bytes, DICOM decoded and re-encoded as PNG so no DICOM header (patient name, UIDs,
dates) is ever stored. On local and mounted paths (``worker_file_io``, on by default) the Python
workers do the file I/O and pass 1 writes ``raw`` itself: the paths, the metadata and the existing ids
decide beforehand which files may go in (:func:`_plan`), each worker writes those whose own checks
pass from the bytes it has just read, so each file is read once, the decisions after pass 1 check that
choice, and pass 2 copies only what pass 1 could not write (DICOM, whose id comes from its content).
On HDFS or S3 pass 2 copies every accepted file through Spark's ``binaryFile`` source and Parquet
writer. Counts are taken from what was written.

Without ``--images-out`` ingest never decodes a PNG: it checks its header and its end (the IEND chunk a
truncated file lacks), and preprocess, the stage that decodes it, quarantines one whose pixels do not
decode. With ``--images-out`` pass 1 also decodes and resizes each file exactly as preprocess would
(:func:`cxr_spark.stages.preprocess.resize_encoded`), a file that does not decode is quarantined here, and
``images_<size>`` is written from those rows once ``raw`` is in place: each file is read and decoded
once instead of twice, the fastest way from a dump to training data (``make bench`` measures both).
When pass 1 writes ``raw`` itself and ``--images-out`` is local too, each task also writes the
``images_<size>`` rows of the files it keeps, one Parquet file per split, which are moved into the
images dataset as it is written: those images never cross to the JVM nor are shuffled.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import time
import uuid
from contextlib import nullcontext

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from petastorm.etl.dataset_metadata import materialize_dataset
from pyspark import TaskContext
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import to_arrow_type
from pyspark.sql.types import BinaryType

from cxr_spark.config import IngestConfig, PipelineConfig, PreprocessConfig, load_config, override
from cxr_spark.core.guards import UsageError, check_metadata_file, check_paths, check_run, metadata_header_problem
from cxr_spark.core.identity import DICOM_ID_HEX, DICOM_NAME, DICOM_SOURCE, IMAGE_GLOB
from cxr_spark.core.image_codec import decode_dicom, encode_png, resize_square
from cxr_spark.core.image_formats import (CONVERSIONS, PNG_SIGNATURE, PNG_TAIL_BYTES, ImageError, check_png_end,
                                          image_header, read_dicom)
from cxr_spark.core.labels import LABELS, NUM_LABELS, UnknownFindingError, parse_finding_labels
from cxr_spark.core.metadata import SPARK_DDL, age_problem, dicom_metadata, parse_age
from cxr_spark.core.splits import hash_split, official_split
from cxr_spark.datasets.bbox import BBOX_DIR, read_bbox
from cxr_spark.datasets.fields import encode_column
from cxr_spark.datasets.images import PNG_BYTES_PER_PIXEL, encode_resized, images_schema, resize_encoded, write_images
from cxr_spark.datasets.manifest import finish_manifest, input_version
from cxr_spark.datasets.quarantine import QUARANTINE_DIR, QUARANTINE_SCHEMA
from cxr_spark.datasets.raw import RawSchema, metadata_columns
from cxr_spark.io.commit import OutputRun
from cxr_spark.io.parquet_parts import (ParquetPartWriter, PartitionedPartWriter, image_rows_writer, move_parquet_parts,
                                        write_parquet_part)
from cxr_spark.io.storage import (FileSystem, listed_files, local_file_path, local_path, read_json, read_local_file,
                                  sha256_hex, to_url)

log = logging.getLogger(__name__)

MODES = ("overwrite", "append-new")
LAYOUTS = ("auto", "nih", "kaggle")
#: Kaggle "Chest X-Ray Images (Pneumonia)": <split>/<class>/<file>; the class sets one canonical label.
KAGGLE_CLASSES = {"NORMAL": None, "PNEUMONIA": "Pneumonia"}
KAGGLE_SPLITS = {"train": "train", "val": "val", "test": "test"}
_KAGGLE_PATH = r"(?:^|/)((train|val|test)/(NORMAL|PNEUMONIA)/[^/]+)$"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True,
                        help="folder of PNG, JPEG and DICOM files (*.png, *.jpg, *.jpeg, *.dcm, *.dicom), searched "
                             "recursively: NIH images_NNN/images/, Kaggle train|val|test/NORMAL|PNEUMONIA/, or flat")
    parser.add_argument("--metadata", help="Data_Entry_2017*.csv[.gz] (2017 or v2020 layout); without it and "
                                           "outside the Kaggle layout every image is 'unlabeled'")
    parser.add_argument("--split-lists", help="folder with NIH train_val_list.txt and test_list.txt (official split)")
    parser.add_argument("--bbox", help="BBox_List_2017.csv[.gz]: written into the dataset as <out>/_bbox/ (Parquet)")
    parser.add_argument("--out", required=True, help="raw dataset to write (replaced atomically)")
    parser.add_argument("--mode", choices=MODES, default="overwrite",
                        help="overwrite (default) or append-new: add only files whose image id and content are "
                             "not already in --out; the dataset is still replaced atomically")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto",
                        help="auto (default: Kaggle when --images has train|val|test/NORMAL|PNEUMONIA), nih, kaggle")
    parser.add_argument("--val-fraction", type=float, help="fraction of patients for validation")
    parser.add_argument("--test-fraction", type=float, help="fraction of patients for test (without split lists)")
    parser.add_argument("--split-seed", type=int, help="seed of the patient-wise split")
    parser.add_argument("--images-out", help="also write the images_<size> dataset (what preprocess would write from "
                                             "--out) in the same pass over the files: each file is read once and "
                                             "decoded once; a file that does not decode is quarantined here")
    parser.add_argument("--size", type=int, help="with --images-out: output side in pixels (default from conf: 224)")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write the dataset even when no image could be used or no metadata row matched an "
                             "image (by default such a run fails and leaves --out as it was)")


def _paths(images: str, metadata: str | None, split_lists: str | None, bbox: str | None, out: str,
           images_out: str | None) -> tuple[dict, dict]:
    """The run's inputs and outputs by flag, the outputs with the manifest stage an existing one must have."""
    return ({"--images": images, "--metadata": metadata, "--split-lists": split_lists, "--bbox": bbox},
            {"--out": (out, "ingest"), "--images-out": (images_out, "preprocess")})


def check_args(args: argparse.Namespace) -> None:
    """The run's paths and metadata file, before Spark starts (:mod:`cxr_spark.core.guards`)."""
    if args.size is not None and not args.images_out:
        raise UsageError("--size needs --images-out")
    inputs, outputs = _paths(args.images, args.metadata, args.split_lists, args.bbox, args.out, args.images_out)
    check_run(inputs, outputs, folders=("--images", "--split-lists"))
    check_metadata_file(args.metadata)


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    settings = override(config.ingest, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                        split_seed=args.split_seed)
    resize = override(config.preprocess, size=args.size) if args.images_out else None
    return ingest(spark, args.images, args.out, args.metadata, args.split_lists, settings,
                  bbox=args.bbox, mode=args.mode, layout=args.layout, images_out=args.images_out, resize=resize,
                  allow_empty=args.allow_empty)


# ---------------------------------------------------------------------------------------------
# per-row logic (pure pandas over pure functions; run inside executors)

INSPECT_OUT = ("format string, width int, height int, conversion string, view string, sex string, age int, "
               "reason string, detail string")


def inspect_file(data: bytes) -> dict:
    """Header facts of one whole file, or its quarantine reason; DICOM is decoded too, so pass 2 cannot
    fail. A PNG is checked from its header and its last :data:`PNG_TAIL_BYTES` (its IEND chunk), never
    decoded."""
    return _inspect(data)[0]


def _inspect(data: bytes) -> tuple[dict, np.ndarray | None]:
    """:func:`inspect_file`, and a DICOM's decoded pixels (None for other files): decoding is most of a
    DICOM's cost, and pass 1 resizes those same pixels."""
    row = dict.fromkeys(("format", "width", "height", "conversion", "view", "sex", "age", "reason", "detail"))
    pixels = None
    try:
        header = image_header(data)
        row.update(format=header.format, width=header.width, height=header.height, conversion=header.conversion)
        if header.format == "png":
            check_png_end(data[-PNG_TAIL_BYTES:])
        elif header.format == "dicom":
            fields = dicom_metadata(read_dicom(data))
            problem = age_problem(fields["age_text"])
            if problem:
                raise ImageError("unparseable_age", f"DICOM {problem}")
            row.update(view=fields["view"], sex=fields["sex"], age=parse_age(fields["age_text"]))
            pixels = decode_dicom(data)
    except ImageError as error:
        row.update(reason=error.reason, detail=error.detail)
    return row, pixels


INSPECT_COLUMNS = [field.split()[0] for field in INSPECT_OUT.split(", ")]
#: With ``--images-out``, pass 1 also returns each file as images_<size> stores it.
IMAGE_OUT = "image binary, pixel_mean float, pixel_std float"


def index_file(data: bytes, size: int | None = None) -> dict:
    """Pass 1 for one file: :func:`inspect_file`, its SHA-256 and, with ``size``, the image decoded and resized
    as ``images_<size>`` stores it (then a file whose pixels do not decode is quarantined here)."""
    row, pixels = _inspect(data)
    row["content_sha256"] = sha256_hex(data) if len(data) else None  # as for the 0-byte files Spark never reads
    if size is not None:
        row.update(image=None, pixel_mean=None, pixel_std=None)
        if row["reason"] is None:
            try:  # a DICOM is resized from the pixels inspecting it decoded (the same as decode_resized's)
                row["image"], row["pixel_mean"], row["pixel_std"] = (
                    resize_encoded(data, size) if pixels is None else encode_resized(resize_square(pixels, size)))
            except ImageError as error:
                row.update(reason=error.reason, detail=error.detail)
    return row


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
#: (:func:`_plan`).
_FROM_FILE = ("height", "width", "content_sha256")
#: The metadata columns of an images_<size> row in a split's partition folder (which carries ``split``).
_IMAGE_ROW = tuple(name for name in metadata_columns() if name != "split")


def images_part_schema(size: int) -> pa.Schema:
    """images_<size>'s columns as Arrow types, but ``split`` (the partition folders carry it), every column
    nullable as in the files Spark's writer makes."""
    return pa.schema([pa.field(field.name, to_arrow_type(field.dataType))
                      for field in images_schema(size).as_spark_schema().fields if field.name != "split"])


def index_and_keep(writer: ParquetPartWriter, path: str, size: int | None, columns: dict | None,
                   resized: PartitionedPartWriter | None = None) -> tuple[dict, int, bool]:
    """Pass 1's work on one local file when it writes ``raw`` too: the file read straight into ``writer``'s
    buffer, :func:`index_file` of those bytes, and the bytes kept as a raw row (``columns``, the plan's, and
    the columns learnt from the file) when ``columns`` is given and the file's own checks pass; otherwise
    dropped. With ``resized`` (and ``size``) a kept file's resized image goes there as its
    ``images_<size>`` row, in its split's partition, instead of in the index row (whose ``image`` is then
    null). Returns the index row, the file's length, and whether it was kept."""
    data = writer.read_image(path)
    if data[:8] != PNG_SIGNATURE:  # PNG is checked and decoded from the buffer itself
        data = bytes(data)
    row = index_file(data, size)
    keep = columns is not None and row["reason"] is None and row["format"] != "dicom"
    if keep:
        kept = {**columns, **{name: row[name] for name in _FROM_FILE}}
        writer.keep_image(kept)
        if resized is not None:
            resized.add_image(kept["split"], row["image"],
                              {**{name: kept[name] for name in _IMAGE_ROW}, "pixel_mean": row["pixel_mean"],
                               "pixel_std": row["pixel_std"]})
            row["image"] = None
    else:
        writer.drop_image()
    return row, len(data), keep


def _index_and_write_partition(size: int | None, folder: str, run: str, row_group_bytes: int,
                               images: tuple[str, int] | None = None):
    """The mapInPandas function of pass 1 when the Python workers do the file I/O and ``raw`` is local:
    :func:`index_and_keep` of every planned file, keeping those the plan lets through (``writable``) whose
    own checks pass, as one Parquet file per task (:class:`ParquetPartWriter`). ``raw_written`` tells which.
    The decisions made after pass 1 then only check this choice (and copy what pass 1 could not write:
    DICOM, whose id is its content hash).

    With ``images`` (a local folder, and row-group bytes) the task also writes the images_<size> rows of the
    files it keeps, as one Parquet file per split under ``<folder>/split=<split>/``
    (:class:`PartitionedPartWriter`): those images never cross to the JVM, nor are they shuffled to be
    written.
    """
    columns = ["content_sha256"] + INSPECT_COLUMNS + (["image", "pixel_mean", "pixel_std"] if size else [])
    schema = raw_arrow_schema()
    from_plan = [name for name in schema.names[:-1] if name not in _FROM_FILE]  # the last is png
    resized_schema = images_part_schema(size) if images else None

    def index(batches):
        context = TaskContext.get()
        part, attempt = f"part-{context.partitionId():05d}-{run}.parquet", context.attemptNumber()
        os.makedirs(folder, exist_ok=True)
        with ParquetPartWriter(folder, part, schema, image_column="png", row_group_bytes=row_group_bytes,
                               attempt=attempt) as writer, \
                (PartitionedPartWriter(images[0], part, resized_schema, column="split", image_column="image",
                                       row_group_bytes=images[1], attempt=attempt)
                 if images else nullcontext()) as resized:
            for frame in batches:
                rows, lengths, written = [], [], []
                for plan in frame.itertuples(index=False):
                    row, length, keep = index_and_keep(
                        writer, local_file_path(plan.path), size,
                        {name: getattr(plan, name) for name in from_plan} if plan.writable else None, resized)
                    rows.append(row)
                    lengths.append(length)
                    written.append(keep)
                yield pd.concat([frame[["path"]].reset_index(drop=True),
                                 pd.DataFrame({"length": lengths}), pd.DataFrame(rows, columns=columns),
                                 pd.DataFrame({"raw_written": written})], axis=1)

    return index


def stored_bytes(data: bytes, file_format: str) -> bytes:
    """What ``raw`` stores of an accepted file: its original bytes, or for DICOM the pixels re-encoded as
    PNG (no DICOM header is ever stored)."""
    return encode_png(decode_dicom(data)) if file_format == "dicom" else data


def _dicom_as_png(content: pd.Series) -> pd.Series:
    """DICOM bytes re-encoded as PNG; null stays null."""
    return pd.Series([None if data is None else stored_bytes(data, "dicom") for data in content])


@F.pandas_udf(BinaryType())
def _encode_labels(labels: pd.Series) -> pd.Series:
    """Label vectors as RawSchema stores them (its NdarrayCodec); null stays null."""
    return pd.Series([None if vector is None else encode_column(RawSchema, "labels", [vector])[0]
                      for vector in labels])


def raw_arrow_schema() -> pa.Schema:
    """RawSchema as Arrow types, every column nullable as in the files Spark's writer makes."""
    return pa.schema([pa.field(field.name, to_arrow_type(field.dataType))
                      for field in RawSchema.as_spark_schema().fields])


def _raw_part_writer(folder: str, run: str, row_group_bytes: int):
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


# ---------------------------------------------------------------------------------------------
# the job


def list_files(spark: SparkSession, images: str) -> DataFrame:
    """Every image-like file under ``images`` (recursively), as Spark's ``binaryFile`` rows."""
    return (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
            .option("pathGlobFilter", IMAGE_GLOB).load(to_url(images)))


def detect_layout(spark: SparkSession, images: str) -> str:
    """``kaggle`` when ``images`` holds any of train|val|test/NORMAL|PNEUMONIA, else ``nih``."""
    root, fs = to_url(images), FileSystem(spark, to_url(images))
    found = any(fs.exists(f"{root}/{split}/{name}") for split in KAGGLE_SPLITS for name in KAGGLE_CLASSES)
    return "kaggle" if found else "nih"


def _opaque_id(digest: Column) -> Column:
    """A DICOM image's id, :func:`cxr_spark.core.identity.dicom_id` as a column: never a file name."""
    return F.concat(F.substring(digest, 1, DICOM_ID_HEX), F.lit(".dcm"))


def _index_files(spark: SparkSession, files: DataFrame, layout: str, stage: str, size: int | None,
                 read_files: bool, plan: DataFrame | None = None, raw_parts: str | None = None,
                 row_group_bytes: int = 0, images: tuple[str, int] | None = None) -> DataFrame:
    """One row per listed file: path, id, size, SHA-256, header facts and check (a quarantine reason or null).

    Pass 1 writes its rows to ``stage`` (Parquet; with ``size`` they carry the resized image too) and the
    decisions read back only the small columns. With a ``plan`` (:func:`_plan`) pass 1 runs over it and
    writes the raw rows it can into ``raw_parts`` (``raw_written``), and with ``images`` their images_<size>
    rows too (:func:`_index_and_write_partition`). Without one, it runs over the
    ``binaryFile`` rows, and as Spark's file sources make no split for a 0-byte file, such files yield no
    row there; the listing itself (the driver's file index) still names them, and they are added back
    as ``empty_file``.
    """
    out = "path string, length long, content_sha256 string, " + INSPECT_OUT + (", " + IMAGE_OUT if size else "")
    if plan is not None:
        index = plan.mapInPandas(_index_and_write_partition(size, local_path(raw_parts), uuid.uuid4().hex[:8],
                                                            row_group_bytes, images), out + ", raw_written boolean")
    else:
        source = files.select("path", "length") if read_files else files.select("path", "length", "content")
        index = source.mapInPandas(_index_partition(size, read_files), out)
    (image_rows_writer(index.write, "image") if size else index.write).parquet(stage)
    read = spark.read.parquet(stage).select("path", "length", "content_sha256", *INSPECT_COLUMNS,
                                            "raw_written" if plan is not None else F.lit(False).alias("raw_written"))
    if plan is None:
        empty = listed_files(spark, files).join(read.select("path"), "path", "left_anti").select(
            "path", F.lit(0).cast("long").alias("length"), F.lit(None).cast("string").alias("content_sha256"),
            *[F.lit(None).cast(dtype).alias(name) for name, dtype in
              (field.split() for field in INSPECT_OUT.split(", ")[:-2])],
            F.lit("empty_file").alias("reason"), F.lit("zero bytes").alias("detail"), F.lit(False).alias("raw_written"))
        read = read.unionByName(empty)
    return _identify(read, layout)


def _identify(indexed: DataFrame, layout: str) -> DataFrame:
    """``image_id``, ``source_path`` and ``duplicate_rank`` of indexed files. ``path`` is the real location
    (used only to join pass 2); ``source_path`` is what is written, withheld for DICOM."""
    is_dicom = (F.col("format") == "dicom") | F.col("path").rlike(DICOM_NAME)
    name = F.element_at(F.split("path", "/"), -1)
    if layout == "kaggle":  # NORMAL/ and PNEUMONIA/ reuse file names across splits: keep the folders in the id
        name = F.coalesce(F.when(F.regexp_extract("path", _KAGGLE_PATH, 1) != "",
                                   F.regexp_extract("path", _KAGGLE_PATH, 1)), name)
    opaque = _opaque_id(F.coalesce("content_sha256", F.sha2("path", 256)))
    return (indexed
            .withColumn("image_id", F.when(is_dicom, opaque).otherwise(name))
            .withColumn("source_path", F.when(is_dicom, F.concat(F.lit(DICOM_SOURCE), opaque)).otherwise(F.col("path")))
            .withColumn("duplicate_rank",
                        F.row_number().over(Window.partitionBy("image_id").orderBy("path"))))


def _plan(spark: SparkSession, files: DataFrame, layout: str, meta: DataFrame | None,
          existing: DataFrame | None, resize: PreprocessConfig | None = None) -> DataFrame:
    """Pass 1's input when it writes ``raw`` itself: every listed file (0-byte ones included) with the raw
    columns that do not depend on its content, and ``writable``: what :func:`_decide` will say from the
    path, the metadata and the existing ids alone lets the file into ``raw`` if its own checks pass.

    Decided by name, a file is never let in wrongly: its id there is its name, and only DICOM (left to
    pass 2) gets another id, from its content. Tasks hold about ``spark.sql.files.maxPartitionBytes`` of
    files each (the file index knows their total without reading them), or, when pass 1 writes the images
    dataset too (``resize``, its settings), about one row group of its images each (:func:`_image_tasks`).
    """
    listed = listed_files(spark, files).select(
        "path", *[F.lit(None).cast(dtype).alias(name) for name, dtype in
                  (field.split() for field in ("length long, content_sha256 string, " + INSPECT_OUT).split(", "))])
    planned = _decide(_identify(listed, layout), meta, layout, existing)
    writable = F.col("reason").isNull() & ~F.col("in_existing") & ~F.col("path").rlike(DICOM_NAME)
    columns = [name for name in RawSchema.fields if name not in _FROM_FILE and name != "png"]
    total_bytes = int(files._jdf.queryExecution().optimizedPlan().stats().sizeInBytes())
    return (_schema_columns(planned.withColumn("labels", _encode_labels("labels")), columns, "path",
                            writable.alias("writable"))
            .repartition(_image_tasks(spark, len(files.inputFiles()), resize) if resize
                         else _tasks_for(spark, total_bytes), "path"))


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


def ingest(spark: SparkSession, images: str, out: str, metadata: str | None = None,
           split_lists: str | None = None, settings: IngestConfig | None = None, *,
           bbox: str | None = None, mode: str = "overwrite", layout: str = "auto",
           images_out: str | None = None, resize: PreprocessConfig | None = None, allow_empty: bool = False) -> dict:
    """Ingest ``images`` (+ ``metadata``) into the raw dataset at ``out``; returns the run's counts.

    ``mode="append-new"`` keeps every row of the existing ``out`` and adds only files whose image id
    is not in it (a file whose id is there with the same SHA-256 is ``skipped_existing``; with other
    content it is quarantined as ``duplicate_image_id``).

    With ``images_out`` (and ``resize``, the preprocess settings) pass 1 also decodes and resizes every
    file, and ``images_<size>`` is written at ``images_out`` from those rows once ``raw`` is in place: the
    dataset preprocess would write from ``out``, without reading the images a second time. Its counts
    are under ``"images"``. In append-new mode the existing ``images_out`` must be the one made from the
    existing ``out``; its rows are kept.

    Nothing is lost: no output may overlap an input, only datasets of their kinds are replaced, ``out`` and
    ``images_out`` are committed together (:class:`cxr_spark.io.commit.OutputRun`), and a run in which no
    image could be used, or no metadata row matched an image, fails unless ``allow_empty``.
    """
    if mode not in MODES or layout not in LAYOUTS:
        raise ValueError(f"mode must be one of {MODES} (got {mode!r}); layout one of {LAYOUTS} (got {layout!r})")
    inputs, outputs = _paths(images, metadata, split_lists, bbox, out, images_out)
    check_paths(inputs, {flag: path for flag, (path, _) in outputs.items()})
    _check_metadata(spark, metadata)
    settings = settings or load_config().ingest
    started = time.time()
    if layout == "auto":
        layout = detect_layout(spark, images)
    if layout == "kaggle" and metadata:
        raise ValueError("the Kaggle layout takes its labels from the folders; do not pass --metadata")
    if images_out and resize is None:
        raise ValueError("images_out needs resize (the preprocess settings: size, row groups, files per split)")
    with OutputRun(spark, {"raw": (out, "ingest"), "images": (images_out, "preprocess")}) as run:
        existing = _existing_dataset(spark, out) if mode == "append-new" else None
        previous_images = _previous_images(spark, out, images_out) if images_out and existing is not None else None
        stage = run.scratch("raw")
        counts = _ingest(spark, images, out, metadata, split_lists, settings, bbox, mode, layout, existing, stage,
                         images_out, resize, started, run.tmp("raw"), allow_empty)
        if images_out:
            counts["images"] = _write_images(spark, out, run.tmp("raw"), images_out, run.tmp("images"), stage, resize,
                                             previous_images, started, allow_empty)
        run.commit()
    return counts


def _check_metadata(spark: SparkSession, metadata: str | None) -> None:
    """Refuse a metadata file that is not a published NIH layout, on any filesystem
    (:func:`cxr_spark.core.guards.check_metadata_file`; Spark reads the first line of a remote one)."""
    if not metadata or local_path(to_url(metadata)) is not None:
        check_metadata_file(local_path(to_url(metadata)) if metadata else None)
        return
    first = spark.read.text(to_url(metadata)).first()
    problem = metadata_header_problem((first[0] if first else "").encode("utf-8"))
    if problem:
        raise UsageError(f"--metadata {metadata}: not an NIH Data_Entry_2017 file: {problem}")


def _ingest(spark: SparkSession, images: str, out: str, metadata: str | None, split_lists: str | None,
            settings: IngestConfig, bbox: str | None, mode: str, layout: str, existing: DataFrame | None,
            stage: str, images_out: str | None, resize: PreprocessConfig | None, started: float, tmp: str,
            allow_empty: bool) -> dict:
    files = list_files(spark, images)  # listed once: pass 1 (index) and pass 2 (copy) share the file index
    if not allow_empty and not files.inputFiles():
        raise UsageError(f"--images {images}: no image file in it (*.png, *.jpg, *.jpeg, *.dcm, *.dicom in any "
                         f"case, searched recursively); nothing is replaced (--allow-empty to write an empty dataset)")
    read_files = local_path(to_url(images)) is not None
    meta = None
    if metadata:
        meta = (read_metadata(spark, metadata, split_lists, settings)
                .withColumn("meta_rank", F.row_number().over(
                    Window.partitionBy("image_id").orderBy(F.monotonically_increasing_id())))
                .cache())
    boxes = read_bbox(spark, bbox).cache() if bbox else None
    first_meta = meta.where("meta_rank = 1").drop("meta_rank") if meta is not None else None
    # Python workers that read the files write raw's rows from the bytes in hand (no second read), when
    # raw is local too; the decisions after pass 1 check their choice and pass 2 copies the rest.
    in_workers = settings.worker_file_io and read_files and local_path(to_url(out)) is not None
    size = resize.size if images_out else None
    # With images_out local too, they write the images_<size> rows of the files they keep in raw as well
    # (each task one file per split).
    resized = ((local_path(f"{stage}/images"), resize.row_group_size_mb * 2**20)
               if in_workers and size and local_path(to_url(images_out)) is not None else None)
    plan = _plan(spark, files, layout, first_meta, existing, resize if resized else None) if in_workers else None
    index = _index_files(spark, files, layout, f"{stage}/index", size, read_files, plan, f"{stage}/raw",
                         settings.row_group_size_mb * 2**20, resized).cache()  # no image bytes
    decided = _decide(index, first_meta, layout, existing).cache()
    fates = _fates(decided)

    if size:  # which pass-1 index rows become images_<size> rows, for _write_images
        (decided.where("reason IS NULL AND NOT skipped" + (" AND NOT raw_written" if resized else ""))
         .select("path", "image_id").write.parquet(f"{stage}/accepted"))
    accepted = decided.where("reason IS NULL AND NOT skipped")
    accepted = accepted.withColumn("labels", _encode_labels("labels"))
    with materialize_dataset(spark, tmp, RawSchema, settings.row_group_size_mb):
        if in_workers:
            if existing is not None:
                image_rows_writer(_schema_columns(existing).write, "png").parquet(tmp)
            move_parquet_parts(local_path(f"{stage}/raw"), local_path(tmp))
            rest = [fate for fate in fates if fate["accepted"] and not fate["skipped"] and not fate["raw_written"]]
            _copy_in_workers(spark, accepted.where("NOT raw_written"), tmp, settings.row_group_size_mb,
                             sum(fate["bytes"] for fate in rest), sum(fate["count"] for fate in rest))
        else:
            raw = _schema_columns(_copy_in_spark(files, accepted))
            if existing is not None:
                raw = _schema_columns(existing).unionByName(raw)
            image_rows_writer(raw.write, "png").parquet(tmp)
    _quarantine_rows(decided, meta, boxes).coalesce(1).write.parquet(f"{tmp}/{QUARANTINE_DIR}")
    if boxes is not None:
        (boxes.where("reason IS NULL").select("image_id", "finding", "x", "y", "w", "h")
         .coalesce(1).write.parquet(f"{tmp}/{BBOX_DIR}"))
    counts = _count(spark, tmp, fates, decided, meta, boxes, existing)
    _refuse_if_empty(counts, metadata, allow_empty)
    extra = {"task": "multilabel", "labels": list(LABELS), "layout": layout, "mode": mode}
    if layout == "kaggle":
        extra.update(task="binary", binary_label=KAGGLE_CLASSES["PNEUMONIA"])
    finish_manifest(spark, tmp, "ingest", started,
                    config=settings, inputs={"images": to_url(images), "metadata": metadata,
                                             "split_lists": split_lists, "bbox": bbox},
                    counts=counts, extra=extra)
    for frame in (index, decided, meta, boxes):
        if frame is not None:
            frame.unpersist()
    return counts


def _refuse_if_empty(counts: dict, metadata: str | None, allow_empty: bool) -> None:
    """A run whose dataset would have no row, or in which no metadata row matched an image, cannot be
    what was meant (an empty folder, a metadata file of another dump): it fails before anything is replaced,
    unless ``allow_empty``."""
    if allow_empty:
        return
    reasons = ", ".join(f"{n} {reason}" for reason, n in counts["quarantine_reasons"].items()) or "none"
    if metadata and counts["files_listed"] and not counts["metadata_matched"]:
        raise UsageError(f"no row of --metadata {metadata} ({counts['metadata_rows']} rows) matched any of the "
                         f"{counts['files_listed']} image files (quarantined: {reasons}); nothing is replaced "
                         f"(--allow-empty to write the result anyway)")
    if not sum(counts["splits"].values()):
        raise UsageError(f"no usable image: {counts['files_listed']} image files listed, "
                         f"{counts['quarantined']} quarantined (reasons: {reasons}); nothing is replaced "
                         f"(--allow-empty to write an empty dataset)")


def _previous_images(spark: SparkSession, out: str, images_out: str) -> tuple[DataFrame, DataFrame] | None:
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


def _write_images(spark: SparkSession, out: str, raw_tmp: str, images_out: str, images_tmp: str, stage: str,
                  resize: PreprocessConfig, previous: tuple[DataFrame, DataFrame] | None, started: float, allow_empty: bool) -> dict:
    """``images_<size>`` (into ``images_tmp``, committed with raw) from pass 1's resized images: the rows its
    tasks wrote themselves, and the others (DICOM) from its index rows joined to the metadata of the raw
    rows just written to ``raw_tmp``, which becomes ``out``."""
    raw = spark.read.parquet(raw_tmp)
    columns = [field.name for field in images_schema(resize.size).fields.values()]
    resized = (spark.read.parquet(f"{stage}/index").select("path", "image", "pixel_mean", "pixel_std")
               .join(spark.read.parquet(f"{stage}/accepted"), "path").drop("path"))
    rows = raw.select(*metadata_columns()).join(resized, "image_id").select(*columns)
    if previous is not None:
        rows = previous[0].select(*columns).unionByName(rows)

    def quarantine(written, n_images):
        return previous[1] if previous is not None else spark.createDataFrame([], QUARANTINE_SCHEMA)

    made_from = {**input_version(spark, raw_tmp), "url": to_url(out)}  # the raw run committed with it
    return write_images(spark, rows, images_out, resize, n_rows=raw.count(), quarantine=quarantine, started=started,
                        inputs={"raw": made_from}, extra={"written_by": "ingest --images-out"},
                        parts=local_path(f"{stage}/images"), into=images_tmp, allow_empty=allow_empty)


def _schema_columns(frame: DataFrame, names=tuple(RawSchema.fields), *others: str) -> DataFrame:
    """The RawSchema columns ``names``, in order and with their Spark types, then the columns ``others``."""
    return frame.select(*[F.col(name).cast(RawSchema.fields[name].codec.spark_dtype()).alias(name)
                          for name in names], *others)


def _copy_in_spark(files: DataFrame, accepted: DataFrame) -> DataFrame:
    """Pass 2 through the JVM (HDFS, S3, or ``worker_file_io = false``): the accepted files' bytes from
    ``binaryFile`` joined to their metadata, DICOM re-encoded as PNG, as ``png``."""
    # No shuffle of image bytes: binaryFile's input splits (spark.sql.files.maxPartitionBytes and
    # openCostInBytes) already give output files of tens of MB, and the broadcast join keeps them.
    raw = files.select("path", "content").join(F.broadcast(accepted), "path")
    if accepted.where("format = 'dicom'").limit(1).count():
        # Only DICOM bytes cross to Python (a Python UDF sees every row: the others pass as nulls).
        to_png = F.pandas_udf(_dicom_as_png, "binary")
        return raw.withColumn("png", F.coalesce(to_png(F.when(F.col("format") == "dicom", F.col("content"))),
                                                F.col("content")))
    return raw.withColumn("png", F.col("content"))


def _image_tasks(spark: SparkSession, n_files: int, resize: PreprocessConfig) -> int:
    """Pass 1's tasks when each writes the images_<size> rows of its files, one Parquet file per split: as
    many as make about one row group of images each, so the images dataset gets files of row-group size
    (Petastorm indexes a dataset's row groups with a Spark task per file, 45-50 ms of task time each
    here), at least ``min_files_per_split`` (each split then gets that many files, for Horovod's shards)
    and one per core."""
    image_bytes = n_files * resize.size**2 * PNG_BYTES_PER_PIXEL
    return max(resize.min_files_per_split, spark.sparkContext.defaultParallelism,
               math.ceil(image_bytes / (resize.row_group_size_mb * 2**20)))


def _tasks_for(spark: SparkSession, total_bytes: int) -> int:
    """Tasks of about ``spark.sql.files.maxPartitionBytes`` of files each, at least one per core."""
    per_task = spark._jsparkSession.sessionState().conf().filesMaxPartitionBytes()
    return max(spark.sparkContext.defaultParallelism, math.ceil(total_bytes / per_task))


def _copy_in_workers(spark: SparkSession, accepted: DataFrame, tmp: str, row_group_size_mb: int,
                     total_bytes: int, n_rows: int) -> None:
    """Pass 2 on local and mounted paths, for the accepted rows pass 1 did not write (``n_rows`` rows,
    metadata only, ``total_bytes`` of files): each task's Python worker reads its files and writes one
    raw Parquet file into ``tmp`` (:func:`_raw_part_writer`): the image bytes never pass through the JVM,
    where copying them cost 2.9-4.1 ms of CPU per 1024 px PNG (README, Ingest)."""
    folder = local_path(tmp)
    os.makedirs(folder, exist_ok=True)
    if n_rows:
        (_schema_columns(accepted, [name for name in RawSchema.fields if name != "png"], "path", "format")
         .repartition(_tasks_for(spark, total_bytes), "image_id")
         .mapInPandas(_raw_part_writer(folder, uuid.uuid4().hex[:8], row_group_size_mb * 2**20), "rows long")
         .agg(F.sum("rows")).first())
    if not any(name.endswith(".parquet") and not name.startswith(".") for name in os.listdir(folder)):
        # Nothing to write: one empty file still gives readers the schema (as Spark's writer does).
        pq.write_table(raw_arrow_schema().empty_table(), os.path.join(folder, "part-00000-empty.parquet"))


def _existing_dataset(spark: SparkSession, out: str) -> DataFrame | None:
    """The raw dataset already at ``out`` (for append-new), or None when there is none yet."""
    url = to_url(out)
    if not FileSystem(spark, url).exists(f"{url}/_common_metadata"):
        log.info("append-new: no dataset at %s yet; ingesting everything", url)
        return None
    return spark.read.parquet(url)


def _kaggle_labels(index: DataFrame) -> DataFrame:
    """Labels and split from ``<split>/<NORMAL|PNEUMONIA>/`` folders (PNEUMONIA sets the Pneumonia bit)."""
    folders = F.regexp_extract("path", _KAGGLE_PATH, 2)
    label = F.regexp_extract("path", _KAGGLE_PATH, 3)
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


def _decide(index: DataFrame, meta: DataFrame | None, layout: str, existing: DataFrame | None) -> DataFrame:
    """Each listed file with its metadata and, if it cannot be used, a quarantine reason.

    Precedence: the file's own problem, a repeated image id, a clash with the existing dataset,
    then metadata problems. ``skipped`` marks files already in the existing dataset (append-new), with the
    same content; ``in_existing`` files whose id is there at all.
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
            .drop("meta_reason", "meta_detail", "_has_meta", "_existing_sha"))


def _quarantine_rows(decided: DataFrame, meta: DataFrame | None, boxes: DataFrame | None) -> DataFrame:
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


def _fates(decided: DataFrame) -> list[dict]:
    """Files by fate (accepted, skipped, written by pass 1, format, conversion): how many and their bytes, in
    one Spark job over the cached decisions (pass 2 sizes its tasks by the bytes; the run's counts use
    both). A file pass 1 wrote into ``raw`` that the decisions do not accept is a bug: RuntimeError."""
    fates = [row.asDict() for row in
              decided.groupBy(F.col("reason").isNull().alias("accepted"), "skipped", "raw_written", "format",
                             "conversion")
             .agg(F.count("*").alias("count"), F.coalesce(F.sum("length"), F.lit(0)).alias("bytes")).collect()]
    wrong = sum(fate["count"] for fate in fates if fate["raw_written"] and not (fate["accepted"] and not fate["skipped"]))
    if wrong:
        raise RuntimeError(f"pass 1 wrote {wrong} files into raw that the decisions after it do not accept: {fates}")
    return fates


def _count(spark: SparkSession, tmp: str, fates: list[dict], decided: DataFrame, meta: DataFrame | None,
           boxes: DataFrame | None, existing: DataFrame | None) -> dict:
    """Counts from what was written, so they reconcile with the outputs themselves (the files listed and
    their fates, from :func:`_fates`, are what pass 1 and the decisions made of them)."""
    raw = spark.read.parquet(tmp)
    quarantine = spark.read.schema(QUARANTINE_SCHEMA).parquet(f"{tmp}/{QUARANTINE_DIR}")
    by_kind, by_reason = {}, {}
    for row in quarantine.groupBy("kind", "reason").count().collect():
        by_kind[row["kind"]] = by_kind.get(row["kind"], 0) + row["count"]
        by_reason[row["reason"]] = by_reason.get(row["reason"], 0) + row["count"]
    by_split = {row["split"]: row["count"] for row in raw.groupBy("split").count().collect()}
    used = [fate for fate in fates if fate["accepted"]]
    previous = existing.count() if existing is not None else 0
    total = sum(by_split.values())
    metadata_rows = metadata_matched = 0
    if meta is not None:  # a metadata row is matched when it is the first for an image id that was listed
        listed = decided.select("image_id").distinct().withColumn("_listed", F.lit(True))
        tally = (meta.join(listed, "image_id", "left")
                 .agg(F.count("*").alias("rows"),
                      F.count(F.when((F.col("meta_rank") == 1) & F.col("_listed"), True)).alias("matched"))
                 .first())
        metadata_rows, metadata_matched = tally["rows"], tally["matched"]
    counts = {
        "files_listed": sum(fate["count"] for fate in fates),
        "ingested": total - previous,
        "quarantined": by_kind.get("file", 0),
        "metadata_rows": metadata_rows,
        "metadata_matched": metadata_matched,
        "metadata_quarantined": by_kind.get("metadata", 0),
        "formats": {fmt: sum(f["count"] for f in used if f["format"] == fmt and not f["skipped"])
                    for fmt in ("png", "jpeg", "dicom")},
        # images whose pixels decode_grayscale converts to 8-bit gray (raw keeps the original bytes)
        "converted": {name: sum(f["count"] for f in used if f["conversion"] == name and not f["skipped"])
                      for name in CONVERSIONS},
        "splits": dict(sorted(by_split.items())),
        "quarantine_reasons": dict(sorted(by_reason.items())),
    }
    if existing is not None:
        counts.update(skipped_existing=sum(f["count"] for f in used if f["skipped"]),
                      previous_rows=previous, rows=total)
    if boxes is not None:
        counts.update(bbox_rows=boxes.count(), bbox_written=spark.read.parquet(f"{tmp}/{BBOX_DIR}").count(),
                      bbox_quarantined=by_kind.get("bbox", 0))
    problems = []
    if counts["files_listed"] != counts["ingested"] + counts.get("skipped_existing", 0) + counts["quarantined"]:
        problems.append("files_listed != ingested + skipped_existing + quarantined")
    if counts["metadata_rows"] != counts["metadata_matched"] + counts["metadata_quarantined"]:
        problems.append("metadata_rows != metadata_matched + metadata_quarantined")
    if boxes is not None and counts["bbox_rows"] != counts["bbox_written"] + counts["bbox_quarantined"]:
        problems.append("bbox_rows != bbox_written + bbox_quarantined")
    if problems:
        raise RuntimeError(f"ingest counts do not reconcile ({'; '.join(problems)}): {counts}")
    return counts
