"""PySpark's Python worker daemon, without Python 3.10/3.11's re-read of Spark's zips at every task.

PySpark's worker calls ``importlib.invalidate_caches()`` at the start of every task. On Python 3.10
and 3.11 that makes each ``zipimporter`` on the path re-read its archive's whole directory at once
(CPython issue 103200, made lazy in 3.12), and Spark puts ``pyspark.zip``, py4j's zip and the
spark-core jar (a zip of thousands of classes) on every worker's path: about 0.17 s of CPU per task in
each worker, the cost of decoding ten radiographs. This daemon skips that re-read for
the archives that were on the path when it started (Spark's own, which do not change while a worker
lives); archives added later (``--py-files``, ``addPyFile``) are refreshed as before.

It also imports what every task of ours needs (:data:`PRELOADED`) before forking its workers, so each
starts with them (``CXR_DAEMON_PRELOAD=0`` in the environment switches that off).

Selected by ``spark.python.daemon.module cxr_spark.io.spark_daemon`` in ``conf/spark/*.conf``.
"""
from __future__ import annotations

import os
import sys
import zipimport


def skip_static_zip_rereads() -> None:
    """Make ``invalidate_caches`` a no-op for the archives (zip, jar) now on ``sys.path`` (Python < 3.12)."""
    if sys.version_info >= (3, 12) or getattr(zipimport.zipimporter.invalidate_caches, "_cxr_static", None):
        return
    static = frozenset(entry for entry in sys.path if os.path.isfile(entry))
    reread = zipimport.zipimporter.invalidate_caches

    def invalidate_caches(self):
        if self.archive not in static:
            reread(self)

    invalidate_caches._cxr_static = static
    zipimport.zipimporter.invalidate_caches = invalidate_caches


#: What every Python task of ours imports, imported once in the daemon: each worker it forks starts with them.
#: Not TensorFlow, whose runtime is not safe to fork.
PRELOADED = ("numpy", "pandas", "pyarrow", "pyarrow.parquet", "cv2", "pyspark.worker", "pyspark.sql.pandas.serializers")


def preload() -> None:
    import importlib

    for name in PRELOADED:
        try:
            importlib.import_module(name)
        except ImportError:  # a worker without it imports nothing more than before
            pass


if __name__ == "__main__":
    skip_static_zip_rereads()
    if os.environ.get("CXR_DAEMON_PRELOAD", "1") != "0":
        preload()
    from pyspark.daemon import manager

    manager()
