"""Run manifests: every job ends by writing ``_manifest.json`` into its output."""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

import cxr_spark
from cxr_spark.io.storage import read_json, to_url, write_json

log = logging.getLogger(__name__)


def code_version() -> str:
    """The package version plus the git commit when run from a checkout (``0.1.0+g1a2b3c4``)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{cxr_spark.__version__}+g{commit}" if commit else cxr_spark.__version__


def library_versions() -> dict[str, str]:
    """The versions of the libraries a result depends on, as installed in this process."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("tensorflow-cpu", "tensorflow", "keras", "horovod", "pyspark", "petastorm", "numpy", "pyarrow",
                 "mlflow"):
        try:
            found[name.replace("-cpu", "")] = version(name)
        except PackageNotFoundError:
            continue
    return found


def command_line() -> str:
    """The command this process runs, as a person would type it (``cxr-spark train --in ...``)."""
    import shlex
    import sys

    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if program in ("cli.py", "__main__.py", "-c", "-m"):
        program = "cxr-spark"
    return shlex.join([program, *sys.argv[1:]])


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def input_version(spark: SparkSession, url: str) -> dict:
    """Identify an input dataset by its own manifest (stage, code version, when it was written)."""
    url = to_url(url)
    try:
        manifest = read_json(spark, f"{url}/_manifest.json")
    except Exception:  # noqa: BLE001 - any unreadable manifest just leaves the version unknown
        return {"url": url, "manifest": None}
    return {"url": url, **{key: manifest.get(key) for key in ("stage", "code_version", "finished_at", "data")},
            **({"model_version": manifest["model_version"]} if "model_version" in manifest else {})}


def finish_manifest(spark: SparkSession, out_url: str, stage: str, started: float, *, config: Any,
                    inputs: dict, counts: dict, extra: dict | None = None) -> dict:
    """Write ``<out>/_manifest.json`` (code version, config, inputs, counts, duration) and return it."""
    if "data" not in (extra or {}):  # synthetic, real or unknown: what the inputs were made from
        kinds = {value.get("data") for value in inputs.values() if isinstance(value, dict) and value.get("data")}
        extra = {**(extra or {}), "data": "synthetic" if "synthetic" in kinds else kinds.pop() if len(kinds) == 1
                 else "unknown"}
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
    log.info("%s: config %s; inputs %s; counts %s (%.0f s)", stage, manifest["config"], inputs, counts,
             manifest["duration_s"])
    return manifest
