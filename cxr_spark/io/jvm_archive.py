"""The driver JVM's class-data archive (AppCDS): the classes a local Spark session loads, stored once so that
every later session maps them in instead of loading and verifying them again from Spark's jars.

A fresh ``cxr-spark`` process spends seconds of its start and of its first queries loading Spark's classes.
``make`` writes the archive (:mod:`cxr_spark.make_jvm_archive`, ``make jvm-archive``: a small ingest and
preprocess run with ``-XX:ArchiveClassesAtExit``), once, and again after Java or Spark changed, keeping only the
one in use; :func:`java_options` gives every later local session the option to use it. It is named after the
JVM and Spark's jars it was made with, so another JVM or Spark install finds no archive and starts as before; a
JVM that cannot use an archive ignores it (its messages are switched off).
Sessions under ``spark-submit`` (clusters) are not changed. ``CXR_SPARK_JVM_ARCHIVE=0`` switches it off. What
it saves is measured in docs/benchmarks.md.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

log = logging.getLogger(__name__)

#: Off switch: ``CXR_SPARK_JVM_ARCHIVE=0``.
SWITCH_ENV = "CXR_SPARK_JVM_ARCHIVE"
#: The JVM's CDS messages (an archive of another build, a changed class path) would go to the console.
QUIET = "-Xlog:cds=off,cds+dynamic=off"


def _spark_home() -> Path:
    import pyspark

    return Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent)


def _java() -> str | None:
    """The ``java`` that ``spark-submit`` starts: ``$JAVA_HOME/bin/java``, else the one on the PATH."""
    java_home = os.environ.get("JAVA_HOME")
    found = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
    return os.path.realpath(found) if found and os.path.exists(found) else None


def archive_path() -> Path | None:
    """Where the archive of this JVM and this Spark install is (whether or not it exists yet); None when there is
    no ``java`` to name it after."""
    java = _java()
    if java is None:
        return None
    jars = _spark_home() / "jars"
    digest = hashlib.sha256()
    for path in [Path(java), *sorted(jars.glob("*.jar"))]:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return Path(sys.prefix) / "share" / "cxr-spark" / f"spark-driver-{digest.hexdigest()[:16]}.jsa"


def java_options() -> str:
    """The driver JVM options that use the archive: empty when there is none for this JVM and Spark, or when it
    is switched off (a missing archive file would switch off the JVM's own class sharing too)."""
    if os.environ.get(SWITCH_ENV, "1") == "0":
        return ""
    path = archive_path()
    return f"-XX:SharedArchiveFile={path} {QUIET}" if path is not None and path.is_file() else ""
