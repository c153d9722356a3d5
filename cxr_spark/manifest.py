"""Run manifests: every job ends by writing ``_manifest.json`` into its output."""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

import cxr_spark
from cxr_spark.storage import write_json

log = logging.getLogger(__name__)


def code_version() -> str:
    """The package version plus the git commit when run from a checkout (``0.1.0+g1a2b3c4``)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{cxr_spark.__version__}+g{commit}" if commit else cxr_spark.__version__


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def finish_manifest(spark: SparkSession, out_url: str, stage: str, started: float, *, config: Any,
                    inputs: dict, counts: dict, extra: dict | None = None) -> dict:
    """Write ``<out>/_manifest.json`` (code version, config, inputs, counts, duration) and return it."""
    manifest = {
        "stage": stage,
        "code_version": code_version(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "config": _plain(config),
        "inputs": inputs,
        "counts": counts,
        **(extra or {}),
    }
    write_json(spark, f"{out_url}/_manifest.json", manifest)
    return manifest
