"""Make the driver JVM's class-data archive (:mod:`cxr_spark.io.jvm_archive`): ``python -m
cxr_spark.make_jvm_archive``, run by ``make install``. The archive holds the classes a small ingest
(``--images-out``) and preprocess load in a local session, as Spark's stages load most of theirs.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cxr_spark.core.guards import process_alive
from cxr_spark.io import jvm_archive

log = logging.getLogger(__name__)

_ARCHIVE_TO = "_CXR_SPARK_ARCHIVE_TO"  # the child's JVM writes the archive here


def make_archive() -> Path | None:
    """Write the archive for this JVM and Spark unless it is there: a child process runs a small ingest (with
    ``--images-out``) and preprocess in a local session whose JVM dumps the classes it loaded when it exits.
    Returns its path, or None when no archive could be made (no ``java``, or a JVM without dynamic archives:
    sessions then start as before)."""
    path = jvm_archive.archive_path()
    if path is None:
        log.warning("no java found: no class-data archive made")
        return None
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    for left in path.parent.glob(".spark-driver-*.jsa.*"):  # of a maker killed before it finished
        if left.suffix[1:].isdigit() and not process_alive(int(left.suffix[1:])):
            left.unlink(missing_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    done = subprocess.run([sys.executable, "-m", "cxr_spark.make_jvm_archive", "--workload"],
                          env={**os.environ, _ARCHIVE_TO: str(partial)}, capture_output=True, text=True)
    if done.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        output = "\n".join(f"{done.stdout}\n{done.stderr}".strip().splitlines()[-12:])
        log.warning("no class-data archive made; sessions start without one. The JVM and the run said:\n%s", output)
        return None
    os.replace(partial, path)
    for stale in path.parent.glob("spark-driver-*.jsa"):  # of a JVM or Spark install no longer in use here
        if stale != path:
            stale.unlink(missing_ok=True)
    return path


def _workload() -> None:
    """What the archive is made from: a local session (dumping its classes at exit) that runs ingest with
    ``--images-out`` and preprocess on a few synthetic films with their metadata and split lists."""
    from cxr_spark.config import load_config, override  # here: checking for the archive starts no Spark
    from cxr_spark.io.session import build_session
    from cxr_spark.stages.ingest.job import ingest
    from cxr_spark.stages.preprocess import preprocess
    from cxr_spark.synth import SynthSpec, generate

    target = os.environ[_ARCHIVE_TO]
    with tempfile.TemporaryDirectory(prefix="cxr-jvm-archive-") as folder:
        dump = os.path.join(folder, "dump")
        generate(SynthSpec(out=dump, n_images=12, size=128, seed=0))
        config = load_config()
        # the JVM's CDS messages left on: the maker shows them when no archive comes of it
        spark = build_session("cxr-spark class-data archive", java_options=f"-XX:ArchiveClassesAtExit={target}")
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
