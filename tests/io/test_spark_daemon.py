"""The worker daemon's fix for Python 3.11's per-task re-read of the zips on a PySpark worker's path."""
from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

CHECK = """
import importlib, sys, zipimport
from cxr_spark.io.spark_daemon import skip_static_zip_rereads
sys.path.insert(0, sys.argv[1])
import static_module  # a zipimporter for the archive is now cached
reads = []
original = zipimport._read_directory
zipimport._read_directory = lambda archive: reads.append(archive) or original(archive)
skip_static_zip_rereads()
sys.path.insert(0, sys.argv[2])  # on the path only after the daemon started: refreshed as before
import later_module
reads.clear()
importlib.invalidate_caches()
print(sorted(reads) == [sys.argv[2]], static_module.VALUE + later_module.VALUE)
"""


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="Python 3.12 re-reads lazily; the daemon changes nothing")
def test_invalidate_caches_skips_only_the_archives_on_the_path_at_start(tmp_path):
    archives = []
    for name in ("static", "later"):
        archive = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(archive, "w") as handle:
            handle.writestr(f"{name}_module.py", "VALUE = 1\n")
        archives.append(str(archive))
    result = subprocess.run([sys.executable, "-c", CHECK, *archives], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "2"]
