"""Parquet written part by part: image columns stored as Petastorm reads them, part files written by a
task itself (one or one per split) and moved into a dataset at commit.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrameWriter


def image_rows_writer(writer: DataFrameWriter, image_column: str) -> DataFrameWriter:
    """Parquet options for rows whose ``image_column`` holds PNG or JPEG bytes, compressed already:
    Parquet's compression and its dictionary (which hashes every image) would only cost CPU."""
    return writer.option("compression", "none").option(f"parquet.enable.dictionary#{image_column}", "false")


class ImageColumn:
    """The image bytes of one row group, read from files (or given) into one buffer that is reused for
    the next row group.

    Memory the process has not touched before is slow to copy into, several times slower than reused
    memory, so reading files into one reused buffer beats making a new ``bytes`` object per file and
    copying it into Arrow.
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
            # in fresh memory. 4 images per batch keeps pages small (docs/benchmarks.md).
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


def written_rows(spark, url: str) -> int:
    """Rows of the Parquet dataset just written at ``url``: summed from its files' footers when it is local
    (no Spark job), else counted by Spark."""
    from cxr_spark.io.storage import local_path

    folder = local_path(url)
    if folder is None:
        return spark.read.parquet(url).count()
    return sum(pq.read_metadata(path).num_rows for path in parquet_parts(folder))


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
