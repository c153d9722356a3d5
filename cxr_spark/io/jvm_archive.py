"""The driver JVM's class-data archive (AppCDS): the classes a local Spark session loads, stored once so that
every later session maps them in instead of loading and verifying them again from Spark's jars.

A fresh ``cxr-spark`` process spends seconds of its start and of its first queries loading Spark's classes.
``make install`` writes the archive once (:func:`make_archive`, by running a small ingest and preprocess with
``-XX:ArchiveClassesAtExit``); :func:`java_options` gives every later local session the option to use it. It
is named after the JVM and Spark's jars it was made with, so another JVM or Spark install finds no archive
and starts as before; a JVM that cannot use an archive ignores it (its messages are switched off). Sessions
under ``spark-submit`` (clusters) are not changed. ``CXR_SPARK_JVM_ARCHIVE=0`` switches it off. What it saves
is measured in docs/benchmarks.md.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
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


def make_archive() -> Path | None:
    """Write the archive for this JVM and Spark unless it is there: a child process runs a small ingest (with
    ``--images-out``) and preprocess in a local session whose JVM dumps the classes it loaded when it exits.
    Returns its path, or None when no archive could be made (no ``java``, or a JVM without dynamic archives:
    sessions then start as before)."""
    path = archive_path()
    if path is None:
        log.warning("no java found: no class-data archive made")
        return None
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    env = {**os.environ, SWITCH_ENV: "0", "_CXR_SPARK_ARCHIVE_TO": str(partial)}
    done = subprocess.run([sys.executable, "-m", "cxr_spark.io.jvm_archive", "--workload"], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        log.warning("no class-data archive made (the JVM could not write one): %s",
                    (done.stderr or done.stdout).strip().splitlines()[-1:])
        return None
    os.replace(partial, path)
    for stale in path.parent.glob("spark-driver-*.jsa"):  # of a JVM or Spark no longer installed
        if stale != path:
            stale.unlink(missing_ok=True)
    return path


def _workload() -> None:
    """What the archive is made from: a local session (dumping its classes at exit) that runs ingest with
    ``--images-out`` and preprocess on a few synthetic films with their metadata and split lists."""
    from cxr_spark.config import load_config, override
    from cxr_spark.io.session import build_session
    from cxr_spark.stages.ingest.job import ingest
    from cxr_spark.stages.preprocess import preprocess
    from cxr_spark.synth import SynthSpec, generate

    target = os.environ["_CXR_SPARK_ARCHIVE_TO"]
    with tempfile.TemporaryDirectory(prefix="cxr-jvm-archive-") as folder:
        dump = os.path.join(folder, "dump")
        generate(SynthSpec(out=dump, n_images=12, size=128, seed=0))
        config = load_config()
        spark = build_session("cxr-spark class-data archive", java_options=f"-XX:ArchiveClassesAtExit={target} {QUIET}")
        try:
            ingest(spark, dump, os.path.join(folder, "raw"), os.path.join(dump, "Data_Entry_2017.csv"), dump,
                   config.ingest, images_out=os.path.join(folder, "images_64"),
                   images_settings=override(config.preprocess, size=64))
            preprocess(spark, os.path.join(folder, "raw"), os.path.join(folder, "images_32"),
                       override(config.preprocess, size=32))
        finally:
            spark.stop()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if sys.argv[1:] == ["--workload"]:
        _workload()
    else:
        made = make_archive()
        print(f"class-data archive: {made}" if made else "class-data archive: none made")
