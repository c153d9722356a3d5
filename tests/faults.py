"""Fault injection for the tests: run a ``cxr-spark`` command in a process group of its own and SIGKILL it
with every process below it (driver, Spark's JVM, its Python workers) when the run reaches a named commit step
(:func:`cxr_spark.io.commit.step`, which waits there when ``CXR_SPARK_PAUSE_AT`` names it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def spark_conf(folder: Path) -> Path:
    """A properties file for command-line runs in tests: local.conf without the UI and the console bar."""
    conf = folder / "spark-test.conf"
    conf.write_text((ROOT / "conf/spark/local.conf").read_text()
                    + "\nspark.ui.enabled false\nspark.ui.showConsoleProgress false\n")
    return conf


def cli(args: list[str], folder: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``cxr-spark <args>`` run to its end (with the test Spark properties)."""
    return subprocess.run([sys.executable, "-m", "cxr_spark.cli", *args, "--spark-conf", str(spark_conf(folder))],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYSPARK_PYTHON": sys.executable, **(env or {})})


def kill_at_step(args: list[str], step: str, folder: Path, timeout: float = 600) -> str:
    """Run ``cxr-spark <args>`` until it logs that it paused at commit step ``step``, then SIGKILL its process
    group; returns what it logged. AssertionError if it ends, or takes longer than ``timeout``, first."""
    log_path = folder / f"killed-at-{step.replace(' ', '_')}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cxr_spark.cli", *args, "--spark-conf", str(spark_conf(folder))],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYSPARK_PYTHON": sys.executable, "CXR_SPARK_PAUSE_AT": step})
    marker = f"commit step: {step}: paused"
    deadline = time.monotonic() + timeout
    try:
        while marker not in log_path.read_text():
            if process.poll() is not None:
                raise AssertionError(f"the run ended (exit {process.returncode}) before step {step!r}:\n"
                                     f"{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no step {step!r} within {timeout} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
    finally:
        kill_tree(process.pid)
        process.wait(timeout=60)
    return log_path.read_text()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (PySpark's worker daemon runs in a process group of its own)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """The process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_tree(pid: int, timeout: float = 30) -> None:
    """SIGKILL ``pid``'s process group and every process below it, as killing the whole job would, and wait
    until none of them runs."""
    below = _descendants(pid)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in below:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while [child for child in below if _alive(child)]:
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {[c for c in below if _alive(c)]} still run {timeout} s after SIGKILL")
        time.sleep(0.1)
