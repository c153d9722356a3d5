"""Building the SparkSession. The master is never set in code: ``spark-submit`` decides it, or, for the
``cxr-spark`` command run as plain Python, a properties file from ``conf/spark/``.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from pyspark.sql import SparkSession

from cxr_spark.io import jvm_archive
from cxr_spark.io.console import LOG_FILE_ENV, spark_started

log = logging.getLogger(__name__)

CONF_DIR = Path(os.environ.get("CXR_SPARK_CONF_DIR", Path(__file__).resolve().parents[2] / "conf"))


def read_properties(path: str | Path) -> dict[str, str]:
    """Parse a spark-defaults style file: ``key value`` per line, ``#`` comments."""
    properties = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'key value', got {line!r}")
        properties[parts[0]] = parts[1].strip()
    return properties


def under_spark_submit() -> bool:
    """True when this Python process was started by ``spark-submit`` (its JVM is already configured)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def build_session(app_name: str, properties_file: str | Path | None = None,
                  java_options: str | None = None) -> SparkSession:
    """Create the session; outside ``spark-submit`` apply ``properties_file`` (default: local.conf), and start the
    driver JVM with the class-data archive when there is one (:mod:`cxr_spark.io.jvm_archive`) or with
    ``java_options`` instead."""
    builder = SparkSession.builder.appName(app_name)
    if not under_spark_submit():
        properties_file = properties_file or CONF_DIR / "spark" / "local.conf"
        properties = read_properties(properties_file)
        log_file = os.environ.get(LOG_FILE_ENV)
        options = " ".join(filter(None, [
            properties.get("spark.driver.extraJavaOptions"),
            java_options if java_options is not None else jvm_archive.java_options(),
            # the run's log: the JVM's INFO there, only actionable warnings on the console
            *([f"-Dlog4j2.configurationFile=file:{CONF_DIR / 'spark' / 'log4j2.properties'}",
               f"-Dcxr.log.file={log_file}"] if log_file else [])]))
        if options:
            properties["spark.driver.extraJavaOptions"] = options
        for key, value in properties.items():
            builder = builder.config(key, value)
        # Python workers must run this interpreter (the one with cxr_spark installed), not `python3`.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        log.info("Spark properties from %s", properties_file)
    spark = builder.getOrCreate()
    level = os.environ.get("CXR_SPARK_LOG_LEVEL")
    if level or not os.environ.get(LOG_FILE_ENV) or under_spark_submit():
        spark.sparkContext.setLogLevel(level or "WARN")  # else log4j2.properties: INFO to the file, WARN shown
    log.info("Spark %s, master %s, %d default task slots", spark.version, spark.sparkContext.master,
             spark.sparkContext.defaultParallelism)
    spark_started(spark)
    return spark


# Two figures Spark knows and exposes only through its JVM objects; the rest of the package asks here.

def max_partition_bytes(spark: SparkSession) -> int:
    """``spark.sql.files.maxPartitionBytes`` in bytes, as Spark itself parses the setting."""
    return int(spark._jsparkSession.sessionState().conf().filesMaxPartitionBytes())


def planned_size_bytes(frame) -> int:
    """The size in bytes Spark's optimiser estimates for ``frame`` (for a file listing: the files' total,
    known from the file index without reading them)."""
    return int(frame._jdf.queryExecution().optimizedPlan().stats().sizeInBytes())

