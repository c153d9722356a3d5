"""Paths on any filesystem Spark knows (local, ``file://``, ``hdfs://``, ``s3a://``) through Hadoop's
FileSystem API, small files on them, and Parquet files written by the Python workers.

How a whole output is replaced (atomically, under a lock) is :mod:`cxr_spark.io.commit`'s.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from typing import Iterator
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, DataFrameWriter, SparkSession
from pyspark.sql import functions as F

log = logging.getLogger(__name__)


def to_url(path: str) -> str:
    """Absolute URL for a path: ``runs/x`` becomes ``file:///abs/runs/x``; URLs pass through."""
    if urlparse(path).scheme:
        return path.rstrip("/")
    return "file://" + os.path.abspath(path)


def local_path(url: str) -> str | None:
    """The local filesystem path of a ``file://`` URL or plain path, else None."""
    parsed = urlparse(url)
    return parsed.path if parsed.scheme in ("", "file") else None


class FileSystem:
    """The Hadoop FileSystem behind one URL, reached through the driver's JVM."""

    def __init__(self, spark: SparkSession, url: str):
        jvm = spark._jvm
        self._Path = jvm.org.apache.hadoop.fs.Path
        self._fs = self._Path(url).getFileSystem(spark._jsc.hadoopConfiguration())

    def exists(self, url: str) -> bool:
        return self._fs.exists(self._Path(url))

    def delete(self, url: str) -> None:
        self._fs.delete(self._Path(url), True)

    def rename(self, src: str, dst: str) -> None:
        if not self._fs.rename(self._Path(src), self._Path(dst)):
            raise OSError(f"could not rename {src} to {dst}")

    def names(self, url: str) -> list[str] | None:
        """The names in folder ``url`` (None when nothing is there)."""
        if not self.exists(url):
            return None
        return [status.getPath().getName() for status in self._fs.listStatus(self._Path(url))]

    def modified(self, url: str) -> float | None:
        """When ``url`` was last modified (seconds since the epoch), None when it does not exist."""
        try:
            return self._fs.getFileStatus(self._Path(url)).getModificationTime() / 1000
        except Exception:  # noqa: BLE001 - py4j's wrapped FileNotFoundException
            return None

    def create_new(self, url: str, text: str) -> None:
        """Create the file ``url`` holding ``text``; FileExistsError if it exists (atomic on HDFS)."""
        try:
            stream = self._fs.create(self._Path(url), False)
        except Exception as error:  # noqa: BLE001 - py4j wraps FileAlreadyExistsException
            if "FileAlreadyExists" in str(error):
                raise FileExistsError(url) from error
            raise
        try:
            stream.write(bytearray(text.encode("utf-8")))
        finally:
            stream.close()

    def mkdirs(self, url: str) -> None:
        self._fs.mkdirs(self._Path(url))

    def count_files(self, url: str, suffix: str) -> int:
        """Files directly under folder ``url`` whose names end with ``suffix`` (0 if it does not exist)."""
        if not self.exists(url):
            return 0
        return sum(1 for status in self._fs.listStatus(self._Path(url))
                   if status.isFile() and status.getPath().getName().endswith(suffix))

    def write_text(self, url: str, text: str) -> None:
        stream = self._fs.create(self._Path(url), True)
        try:
            stream.write(bytearray(text.encode("utf-8")))
        finally:
            stream.close()


def listed_files(spark: SparkSession, files: DataFrame, column: str = "path") -> DataFrame:
    """Every file in the file index of ``files`` (a ``binaryFile`` DataFrame), 0-byte files included (Spark
    makes no row for them), spelled as its rows spell ``path``: the index gives URIs (``file:///a%20b.png``),
    the rows Hadoop paths (``file:/a b.png``)."""
    paths = [re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*):///", r"\1:/", unquote(uri)) for uri in files.inputFiles()]
    return spark.createDataFrame([(path,) for path in paths], f"{column} string")


def local_file_path(path: str) -> str:
    """The local path of a file named as ``binaryFile`` rows name local files (``file:/a b#1.png``: not a
    URL, so no fragment or percent-decoding)."""
    if path.startswith("file:"):
        path = path[len("file:"):]
        if path.startswith("//"):
            path = "/" + path.lstrip("/")
    return path


def read_local_file(path: str) -> bytes:
    """The bytes of a file named as :func:`local_file_path` takes it."""
    with open(local_file_path(path), "rb") as handle:
        return handle.read()


def sha256_hex(data: bytes | None) -> str | None:
    """SHA-256 (hex) of a file's bytes, by OpenSSL; None for a null."""
    return None if data is None else hashlib.sha256(data).hexdigest()


def _sha256_hex(content: pd.Series) -> pd.Series:
    return content.map(sha256_hex)


def content_sha256(content: Column) -> Column:
    """SHA-256 (hex) of a binary column, taken in the Python workers (OpenSSL, about 1.4 GB/s here).

    Spark's ``sha2`` runs Java's ``MessageDigest``, as fast only once the JVM's optimising compiler has
    compiled it: with the quick compiler alone, which ``conf/spark/local.conf`` selects, it ran at
    115 MB/s, 1.9 ms per 220 KB image.
    """
    return F.pandas_udf(_sha256_hex, "string")(content)


def image_rows_writer(writer: DataFrameWriter, image_column: str) -> DataFrameWriter:
    """Parquet options for rows whose ``image_column`` holds PNG or JPEG bytes, compressed already:
    Parquet's compression and its dictionary (which hashes every image) would only cost CPU."""
    return writer.option("compression", "none").option(f"parquet.enable.dictionary#{image_column}", "false")


class ImageColumn:
    """The image bytes of one row group, read from files (or given) into one buffer that is reused for
    the next row group.

    Memory the process has not touched before is slow here: copying into fresh memory ran at 0.77 GB/s
    against 5.7-7.6 GB/s into reused memory (2 cores, 24 GiB VM). Reading 588 KB PNGs into a reused
    buffer took 0.15 ms each, against 0.54 ms as new ``bytes`` objects, plus 1.2 ms more to copy those
    into Arrow.
    """

    def __init__(self):
        self._buffer = np.empty(0, np.uint8)
        self._offsets = [0]

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @property
    def nbytes(self) -> int:
        return self._offsets[-1]

    def _reserve(self, size: int) -> memoryview:
        start, end = self._offsets[-1], self._offsets[-1] + size
        if end >= 2**31:  # Arrow's binary arrays have 32-bit offsets
            raise ValueError(f"a row group of {end} bytes of images: keep row groups under 2 GB")
        if end > len(self._buffer):
            grown = np.empty(max(end, 2 * len(self._buffer)), np.uint8)
            grown[:start] = self._buffer[:start]
            self._buffer = grown
        self._offsets.append(end)
        return memoryview(self._buffer)[start:end]

    def add_file(self, path: str) -> memoryview:
        """Read a file in as the next image; returns its bytes (a view, valid until the next ``add``)."""
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            view = self._reserve(size)
            done = 0
            while done < size:
                n = handle.readinto(view[done:])
                if not n:
                    raise OSError(f"{path}: file shrank while being read ({done} of {size} bytes)")
                done += n
        return view

    def drop_last(self) -> None:
        """Forget the image added last."""
        self._offsets.pop()

    def add_bytes(self, data: bytes) -> None:
        self._reserve(len(data))[:] = data

    def take(self) -> pa.Array:
        """The bytes added since the last ``take``, as an Arrow binary array over the buffer (valid until
        the next ``add``)."""
        offsets = pa.py_buffer(np.asarray(self._offsets, np.int32))
        array = pa.BinaryArray.from_buffers(pa.binary(), len(self), [None, offsets,
                                                                     pa.py_buffer(self._buffer[:self.nbytes])])
        self.clear()
        return array

    def clear(self) -> None:
        """Forget the bytes added (the buffer is kept for the next ones)."""
        self._offsets = [0]


#: One per process: a Python worker reuses the buffer task after task.
_IMAGES = ImageColumn()


class _Part:
    """A file written by a task: closed (and given its name) when its ``with`` block ends normally,
    deleted when the block ends by an exception."""

    def close(self) -> int:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


class ParquetPartWriter(_Part):
    """Rows from a Python worker written as one Parquet file ``folder/name``, a batch at a time.

    Each batch is a pandas frame of ``schema``'s columns but ``image_column``, and for each row the local
    path of a file whose bytes are its image, or the bytes themselves. Row groups hold about
    ``row_group_bytes`` of images, stored without compression or dictionary (they are compressed
    already), as :func:`image_rows_writer` tells Spark's own writer. The images are gathered in
    ``buffer``: by default the one buffer the process reuses task after task, so a writer open beside
    another needs a buffer of its own.

    The file is written under a hidden name (``.name.<attempt>``, which Spark and Petastorm skip) and
    renamed by :meth:`close`, so a retried task replaces it whole and no half-written file is ever read;
    :meth:`abort` (or leaving a ``with`` block by an exception) deletes it. No file is written when there
    are no rows.
    """

    def __init__(self, folder: str, name: str, schema: pa.Schema, *, image_column: str, row_group_bytes: int,
                 attempt: int = 0, buffer: ImageColumn | None = None):
        self._partial, self._final = os.path.join(folder, f".{name}.{attempt}"), os.path.join(folder, name)
        self._schema, self._image_column, self._row_group_bytes = schema, image_column, row_group_bytes
        self._image_index = schema.get_field_index(image_column)
        if self._image_index < 0:
            raise ValueError(f"{image_column} is not one of the columns {schema.names}")
        self._others = schema.remove(self._image_index)
        self._images, self._frames, self._rows, self._writer = _IMAGES if buffer is None else buffer, [], [], None
        self._images.clear()
        self.rows = 0

    def read_image(self, path: str) -> memoryview:
        """Read the local file ``path`` in as the next row's image, and return its bytes (valid until the next
        call): then :meth:`keep_image` with the row's other columns, or :meth:`drop_image`. The bytes go
        once from the file into the buffer the row group is written from, never into a fresh object."""
        return self._images.add_file(path)

    def keep_image(self, row: dict) -> None:
        """Keep the image just read, as the image of ``row`` (the other columns)."""
        self._rows.append(row)
        self.rows += 1
        if self._images.nbytes >= self._row_group_bytes:
            self._flush()

    def drop_image(self) -> None:
        """Forget the image just read."""
        self._images.drop_last()

    def add_image(self, data: bytes, row: dict) -> None:
        """Add a row: ``data``, its image, and ``row``, the other columns."""
        self._images.add_bytes(data)
        self.keep_image(row)

    def add(self, frame: pd.DataFrame, sources: list) -> None:
        """Add the rows of ``frame`` with their images (local paths or bytes, one per row). A writer takes
        its rows either this way or by :meth:`read_image`, not both."""
        start = 0
        for row, source in enumerate(sources):
            if isinstance(source, str):
                self._images.add_file(source)
            else:
                self._images.add_bytes(source)
            if self._images.nbytes >= self._row_group_bytes:
                self._frames.append(frame.iloc[start:row + 1])
                start = row + 1
                self._flush()
        if start < len(frame):
            self._frames.append(frame.iloc[start:])
        self.rows += len(frame)

    def _flush(self) -> None:
        frame = pd.concat(self._frames, ignore_index=True) if self._frames else pd.DataFrame(self._rows)
        table = pa.Table.from_pandas(frame, schema=self._others, preserve_index=False)
        table = table.add_column(self._image_index, self._schema.field(self._image_column),
                                 self._images.take()).replace_schema_metadata(None)
        if self._writer is None:
            # write_batch_size: the writer closes a data page (about 1 MB) only between batches of values,
            # and by default a batch is 1,024 values: a whole row group of images became one page, built
            # in fresh memory. 4 images per batch: 0.73-0.93 ms per 588 KB PNG read and written, against
            # 1.4-1.9 ms (400 files in one process, two interleaved series).
            names = self._others.names
            self._writer = pq.ParquetWriter(self._partial, self._schema, use_dictionary=names,
                                            write_statistics=names, write_batch_size=4,
                                            compression={column: "none" if column == self._image_column
                                                         else "snappy" for column in self._schema.names})
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._frames, self._rows = [], []

    def close(self) -> int:
        """Write what is left and give the file its name; returns the rows written."""
        if self._frames or self._rows:
            self._flush()
        if self._writer is not None:
            self._writer.close()
            os.replace(self._partial, self._final)
        return self.rows

    def abort(self) -> None:
        """Delete the partial file."""
        self._images.clear()
        if self._writer is not None:
            self._writer.close()
            os.remove(self._partial)
            self._writer = None


class PartitionedPartWriter(_Part):
    """Rows from a Python worker written in Hive-style partitions, as Spark's ``partitionBy(column)`` lays
    them out: ``folder/<column>=<value>/name``, one :class:`ParquetPartWriter` (with its own image buffer)
    for each value met. ``schema`` has no ``column``: the folder names carry it."""

    def __init__(self, folder: str, name: str, schema: pa.Schema, *, column: str, image_column: str,
                 row_group_bytes: int, attempt: int = 0):
        self._folder, self._name, self._schema, self._column = folder, name, schema, column
        self._options = {"image_column": image_column, "row_group_bytes": row_group_bytes, "attempt": attempt}
        self._writers: dict[str, ParquetPartWriter] = {}

    def add_image(self, value: str, data: bytes, row: dict) -> None:
        """Add a row to the partition ``value``: ``data``, its image, and ``row``, its other columns."""
        writer = self._writers.get(value)
        if writer is None:
            if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", value) or value.startswith("."):
                raise ValueError(f"{self._column}={value!r}: not a partition value this writer names folders by")
            folder = os.path.join(self._folder, f"{self._column}={value}")
            os.makedirs(folder, exist_ok=True)
            writer = self._writers[value] = ParquetPartWriter(folder, self._name, self._schema, buffer=ImageColumn(),
                                                              **self._options)
        writer.add_image(data, row)

    @property
    def rows(self) -> int:
        return sum(writer.rows for writer in self._writers.values())

    def close(self) -> int:
        """Close every partition's file; returns the rows written."""
        for writer in self._writers.values():
            writer.close()
        return self.rows

    def abort(self) -> None:
        """Delete every partition's partial file."""
        for writer in self._writers.values():
            writer.abort()


def parquet_parts(folder: str | None) -> list[str]:
    """The Parquet files under the local ``folder`` (partition folders included) that readers would see:
    none hidden (``.`` or ``_``), in sorted order; empty when there is no such folder."""
    found = []
    for parent, folders, files in os.walk(folder) if folder else ():
        folders[:] = sorted(name for name in folders if not name.startswith((".", "_")))
        found += [os.path.join(parent, name) for name in sorted(files)
                  if name.endswith(".parquet") and not name.startswith((".", "_"))]
    return found


def move_parquet_parts(parts: str, folder: str) -> int:
    """Move the Parquet files under the local ``parts`` (:func:`parquet_parts`) to the same places under
    ``folder``; returns how many. A hidden file (a failed task attempt's) stays behind."""
    moved = parquet_parts(parts)
    for path in moved:
        target = os.path.join(folder, os.path.relpath(path, parts))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(path, target)  # a rename on the same filesystem
    return len(moved)


def write_parquet_part(batches: Iterator[tuple[pd.DataFrame, list]], folder: str, name: str, schema: pa.Schema, *,
                       image_column: str, row_group_bytes: int, attempt: int = 0) -> int:
    """All ``(frame, sources)`` batches as one Parquet file (:class:`ParquetPartWriter`); returns the rows."""
    with ParquetPartWriter(folder, name, schema, image_column=image_column, row_group_bytes=row_group_bytes,
                           attempt=attempt) as writer:
        for frame, sources in batches:
            writer.add(frame, sources)
    return writer.rows


def read_json(spark: SparkSession, url: str) -> dict:
    """Read a small JSON file (manifest, statistics, model card) from any filesystem."""
    path = local_path(url)
    if path is not None:
        with open(path) as handle:
            return json.load(handle)
    return json.loads(spark.read.text(url, wholetext=True).first()[0])


def write_text(spark: SparkSession, url: str, text: str) -> None:
    """Write a small text file (JSON, Markdown) to any filesystem."""
    path = local_path(url)
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)
    else:
        FileSystem(spark, url).write_text(url, text)


def _require_local(url: str, action: str) -> str:
    path = local_path(url)
    if path is None:
        raise NotImplementedError(f"{action} {url} needs a local or mounted path for now (datasets may be on "
                                  f"any Hadoop filesystem; model files may not yet)")
    return path


def write_bytes(url: str, data: bytes) -> None:
    """Write a binary file (a model) to a local or mounted path."""
    path = _require_local(url, "writing")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def read_bytes(url: str) -> bytes:
    """Read a binary file (a model) from a local or mounted path."""
    with open(_require_local(url, "reading"), "rb") as handle:
        return handle.read()


def write_json(spark: SparkSession, url: str, value: dict) -> None:
    """Write a small JSON file to any filesystem."""
    write_text(spark, url, json.dumps(value, indent=2, default=str) + "\n")
