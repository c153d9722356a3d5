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
from urllib.parse import unquote, urlparse

import pandas as pd
from pyspark.sql import DataFrame, SparkSession

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


_PATH_CLASS: list = [None, None]  # the gateway client it was looked up through, and Hadoop's Path class


def _hadoop_path_class(jvm):
    """Hadoop's ``Path`` class in the JVM behind ``jvm``, looked up once per gateway (a new session after a stopped
    one has a new gateway): each package in its name is a call into the JVM."""
    if _PATH_CLASS[0] is not jvm._gateway_client:
        _PATH_CLASS[:] = [jvm._gateway_client, jvm.org.apache.hadoop.fs.Path]
    return _PATH_CLASS[1]


class FileSystem:
    """The Hadoop FileSystem behind one URL, reached through the driver's JVM."""

    def __init__(self, spark: SparkSession, url: str):
        self._Path = _hadoop_path_class(spark._jvm)
        self._fs = self._Path(url).getFileSystem(spark._jsc.hadoopConfiguration())

    def exists(self, url: str) -> bool:
        return self._fs.exists(self._Path(url))

    def delete(self, url: str) -> None:
        self._fs.delete(self._Path(url), True)

    def rename(self, src: str, dst: str) -> None:
        if not self._fs.rename(self._Path(src), self._Path(dst)):
            raise OSError(f"could not rename {src} to {dst}")

    def names(self, url: str) -> list[str] | None:
        """The names in folder ``url`` (None when nothing is there). A ``file:`` URL is listed by the OS, as
        Hadoop's local filesystem lists it (without the ``.<name>.crc`` checksum files it hides): through the JVM
        each entry costs two calls (docs/benchmarks.md). A path without a scheme is left to Hadoop, which reads
        it on its default filesystem (HDFS on a YARN cluster)."""
        parsed = urlparse(url)
        if parsed.scheme == "file":
            folder = parsed.path
            if os.path.isfile(folder):
                return [os.path.basename(folder)]
            try:
                return [name for name in os.listdir(folder) if not (name.startswith(".") and name.endswith(".crc"))]
            except FileNotFoundError:
                return None
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
        self.write_bytes(url, text.encode("utf-8"))

    def write_bytes(self, url: str, data: bytes) -> None:
        """Write the (small) file ``url``, replacing it."""
        stream = self._fs.create(self._Path(url), True)
        try:
            stream.write(bytearray(data))
        finally:
            stream.close()


def local_frame(spark: SparkSession, rows: list[tuple], ddl: str) -> DataFrame:
    """Rows held by the driver as a DataFrame of the columns ``ddl`` names (``"name type, ..."``), sent through
    Arrow into a local relation. PySpark's ``createDataFrame`` of a list instead makes a Python RDD: every query
    on it starts Python workers to pass the rows on (docs/benchmarks.md)."""
    names = [column.split()[0] for column in ddl.split(",")]
    return spark.createDataFrame(pd.DataFrame(rows, columns=names), ddl)


def listed_files(spark: SparkSession, paths: list[str], column: str = "path") -> DataFrame:
    """``paths`` (:func:`listed_paths`) as a one-column DataFrame."""
    return local_frame(spark, [(path,) for path in paths], f"{column} string")


def input_files(frame: DataFrame) -> list[str]:
    """``frame.inputFiles()`` (URIs) in one call into the JVM: PySpark's fetches the array an element at a time,
    a call per file (docs/benchmarks.md)."""
    jvm = frame.sparkSession._jvm
    joined = jvm.org.apache.hadoop.util.StringUtils.join("\n", frame._jdf.inputFiles())  # no URI holds a newline
    return joined.split("\n") if joined else []


def listed_paths(files: DataFrame) -> list[str]:
    """Every file in the file index of ``files`` (a ``binaryFile`` DataFrame), 0-byte files included (Spark
    makes no row for them), spelled as its rows spell ``path``: the index gives URIs (``file:///a%20b.png``),
    the rows Hadoop paths (``file:/a b.png``)."""
    return [re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*):///", r"\1:/", unquote(uri)) for uri in input_files(files)]


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
