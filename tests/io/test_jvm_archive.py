"""The driver JVM's class-data archive: made for this JVM and Spark, given to a local session's JVM, and one that
JVM can map (with -Xshare:on a JVM that cannot use an archive refuses to start)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from cxr_spark.io import jvm_archive
from cxr_spark.make_jvm_archive import make_archive

_SESSION_JVM = """
import json
from cxr_spark.io.session import build_session
spark = build_session("jvm archive test")
jvm = spark._jvm
runtime = jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()
print(json.dumps({"arguments": list(runtime.getInputArguments()),
                  "class_path": jvm.java.lang.System.getProperty("java.class.path"),
                  "java_home": jvm.java.lang.System.getProperty("java.home")}))
spark.stop()
"""


def _session_jvm(**env) -> dict:
    done = subprocess.run([sys.executable, "-c", _SESSION_JVM], env={**os.environ, **env}, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_local_session_starts_its_jvm_with_the_archive_made_for_it_and_the_jvm_can_map_it():
    path = make_archive()  # `make install` made it already; otherwise made here (about a minute)
    assert path is not None and path == jvm_archive.archive_path() and path.is_file()
    jvm = _session_jvm()
    assert f"-XX:SharedArchiveFile={path}" in jvm["arguments"] and jvm_archive.QUIET in jvm["arguments"]
    # the same JVM, class path and archive, with sharing required: it starts only if it maps the archive
    java = os.path.join(jvm["java_home"], "bin", "java")
    mapped = subprocess.run([java, "-Xshare:on", f"-XX:SharedArchiveFile={path}", "-cp", jvm["class_path"],
                             "-version"], capture_output=True, text=True)
    assert mapped.returncode == 0, mapped.stdout + mapped.stderr
    refused = subprocess.run([java, "-Xshare:on", f"-XX:SharedArchiveFile={path}", "-cp", os.devnull, "-version"],
                             capture_output=True, text=True)
    assert refused.returncode != 0  # what the check above would say of an archive made for another class path


def test_switched_off_or_missing_the_session_jvm_gets_no_archive_option(tmp_path, monkeypatch):
    arguments = _session_jvm(**{jvm_archive.SWITCH_ENV: "0"})["arguments"]
    assert not any("SharedArchiveFile" in argument for argument in arguments)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))  # where no archive was made
    assert jvm_archive.archive_path().parent == tmp_path / "share" / "cxr-spark"
    assert jvm_archive.java_options() == ""
