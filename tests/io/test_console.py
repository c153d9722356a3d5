"""The command's console and its log file (cxr_spark/io/console.py), observed through real runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    conf = tmp_path / "spark-test.conf"
    conf.write_text((ROOT / "conf/spark/local.conf").read_text() + "\nspark.ui.enabled false\n")
    spark_args = ["--spark-conf", str(conf)] if args[0] != "synth" else []
    return subprocess.run([sys.executable, "-m", "cxr_spark.cli", *args, *spark_args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYSPARK_PYTHON": sys.executable})


def test_console_line_hides_noise_and_other_ranks_and_keeps_the_rest():
    from cxr_spark.io.console import NOISE, console_line

    assert all(reason for _, reason in NOISE)  # every filter says why
    warning = "[1]<stderr>:/v/petastorm/unischema.py:459: UserWarning: schema_fields behavior has changed. Now"
    assert console_line(warning, False) == (False, True)
    assert console_line("[1]<stderr>:  warnings.warn('schema_fields behavior'", True) == (False, True)
    assert console_line("[1]<stdout>:epoch 1/3: loss 0.3", False)[0] is False  # rank 0 says it
    assert console_line("[0]<stdout>:epoch 1/3: loss 0.3", False)[0] is True
    assert console_line("[0]<stdout>:Cache cleanup complete.", False)[0] is False
    assert console_line("[0]<stderr>:Traceback (most recent call last):", True)[0] is True
    assert console_line("ValueError: a real error", False)[0] is True


def test_progress_line_has_rate_and_eta():
    from cxr_spark.io.console import progress_line

    assert progress_line("synth", 100, 1000, 5.0, "images") == "synth: 100/1000 images (10%, 20.0/s, ETA 45 s)"
    assert "ETA 2 min" in progress_line("x", 1, 10, 10.0)
    assert "ETA ?" in progress_line("x", 0, 10, 10.0)


@pytest.mark.spark
def test_synth_and_ingest_show_progress_and_results_and_log_everything_to_the_log_dir(tmp_path):
    logs = tmp_path / "my-logs"
    synth = _cli(["synth", "--out", str(tmp_path / "dump"), "--n-images", "20", "--size", "64"], tmp_path)
    assert synth.returncode == 0, synth.stderr
    assert "synth: 10/20 images (50%" in synth.stderr and "ETA" in synth.stderr  # progress
    assert synth.stdout.startswith("synth: {")  # the result line
    assert list((tmp_path / "logs").glob("synth-*.log"))  # default: logs/ beside --out

    ingest = _cli(["ingest", "--images", str(tmp_path / "dump"), "--metadata",
                   str(tmp_path / "dump" / "Data_Entry_2017.csv"), "--out", str(tmp_path / "raw"),
                   "--log-dir", str(logs)], tmp_path)
    assert ingest.returncode == 0, ingest.stderr
    assert ingest.stdout.startswith("ingest: {") and '"ingested": 20' in ingest.stdout
    (log_file,) = logs.glob("ingest-*.log")
    assert f"log: {log_file}" in ingest.stderr  # named at the start
    for noise in (" WARN ", "FutureWarning", "UserWarning", "Setting default log level"):
        assert noise not in ingest.stderr
    text = log_file.read_text()
    assert "wrote file://" in text and "ingest: arguments" in text  # our INFO lines
    assert " INFO " in text and "SparkContext" in text  # the JVM's INFO (log4j2 file appender)
    assert "WARN CSVHeaderChecker" in text  # the hidden warnings, in full
    assert "FutureWarning" in text  # petastorm's, from this process and Spark's Python workers
    assert ingest.stdout.strip() in text  # and the console's lines too


def test_spark_progress_logs_a_running_stage_with_its_tasks_done(spark, caplog):
    """A real Spark job of 8 tasks of 0.4 s each on 2 slots, polled every 0.3 s: lines with its tasks done."""
    import logging
    import re
    import time as clock

    from cxr_spark.io.console import SparkProgress

    progress = SparkProgress(spark, every=0.3)
    with caplog.at_level(logging.INFO, logger="cxr_spark.io.console"):
        progress.thread.start()
        try:
            spark.sparkContext.parallelize(range(8), 8).map(lambda x: clock.sleep(0.4) or x).collect()
        finally:
            progress.stop.set()
            progress.thread.join(5)
    lines = [r.getMessage() for r in caplog.records if "Spark stage" in r.getMessage()]
    assert lines, "no progress line while the job ran"
    done = [int(re.search(r": (\d+)/8 tasks", line).group(1)) for line in lines]
    assert done == sorted(done) and all(0 < d <= 8 for d in done) and "ETA" in lines[0]
