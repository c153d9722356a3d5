"""The predictions store's own files, beside its Parquet rows: the lock, the staged runs and their commit, and
the run summaries in ``_runs/``, including those of runs refused before they started
(:func:`write_refused_run`). The layout is in docs/batch-score.md.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import uuid

from pyspark.sql import SparkSession

from cxr_spark.core.guards import UsageError
from cxr_spark.io.commit import step
from cxr_spark.io.storage import FileSystem, local_path, read_json, to_url

log = logging.getLogger("cxr_spark.stages.batch_score.job")  # the stage's messages, wherever they are made

LOCK_FILE = "_lock"
RUNS_DIR = "_runs"
STAGING_DIR = "_staging"
#: ``_staging/<run_id>.commit.json``: written before a run's renames; a run with one has committed.
COMMIT_SUFFIX = ".commit.json"


def new_run_id(now: dt.datetime) -> str:
    """A run's id: its UTC start time to the second and 8 random hex digits (``20240101T021500Z-1a2b3c4d``)."""
    return f"{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def check_store(store: str, entries: list[str] | None) -> None:
    """Refuse an ``--out`` that holds something other than a predictions store (a store has ``_runs/``
    once its first run ended; a new one is a missing or empty folder)."""
    if entries and RUNS_DIR not in entries:
        raise UsageError(f"--out {store} exists and is not a batch-score store (it has no {RUNS_DIR}/); "
                         f"writing runs into it would mix them with what is there")


def recover_staged_runs(spark: SparkSession, fs: FileSystem, store: str) -> None:
    """What dead runs left in ``_staging/`` (the caller holds the lock, so no live run owns any of it): a run
    whose commit record exists had committed, and its remaining moves are done; any other staged run never
    committed and is deleted. Afterwards every row in the store belongs to a run with a summary."""
    staging = f"{store}/{STAGING_DIR}"
    names = fs.names(staging) or []
    for name in sorted(name for name in names if name.endswith(COMMIT_SUFFIX)):
        record = read_json(spark, f"{staging}/{name}")
        log.warning("finishing the commit of batch-score run %s, killed during it", record["run_id"])
        for source, target in record["moves"]:
            if fs.exists(source):
                fs.mkdirs(target.rsplit("/", 1)[0])
                fs.rename(source, target)
        fs.delete(f"{staging}/{name}")
    for name in names:
        if not name.endswith(COMMIT_SUFFIX):
            log.warning("removing %s/%s: a batch-score run killed before its commit", staging, name)
            fs.delete(f"{staging}/{name}")


def missing_ancestors(fs: FileSystem, store: str, folder: str) -> list[str]:
    """Folders from ``folder`` up to (not including) ``store`` that do not exist, outermost first."""
    missing = []
    while folder != store and not fs.exists(folder):
        missing.append(folder)
        folder = folder.rsplit("/", 1)[0]
    return missing[::-1]


def commit_moves(fs: FileSystem, store: str, moves: list[tuple[str, str]]) -> None:
    """Rename each staged path that exists into place; on any failure undo what was done, then re-raise."""
    renamed, created = [], []
    try:
        for source, target in moves:
            if not fs.exists(source):
                continue
            parent = target.rsplit("/", 1)[0]
            created += missing_ancestors(fs, store, parent)
            fs.mkdirs(parent)
            fs.rename(source, target)
            renamed.append((source, target))
            step(f"store moved {len(renamed)}")
    except BaseException:
        log.error("commit failed; undoing %d renames so the store is as it was", len(renamed))
        for source, target in reversed(renamed):
            fs.rename(target, source)
        for folder in reversed(created):
            fs.delete(folder)
        raise
    log.info("committed %s", ", ".join(target for _, target in renamed))


def delete_if_empty(fs: FileSystem, folder: str) -> None:
    path = local_path(folder)
    if path is not None:
        if os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
    elif fs.exists(folder) and fs.count_files(folder, "") == 0:
        fs.delete(folder)


def write_refused_run(store: str, record: dict) -> str | None:
    """Write ``record``, the summary of a run refused before it started (e.g. its inbox is missing), as
    ``<store>/_runs/<run_id>.json``, creating the store when it does not exist yet; return the file written.

    Only a local store is written (without Spark there is no other filesystem), and only one that is a
    store or may become one (:func:`check_store`); the caller has checked that it overlaps no input. The
    file appears whole (written beside, then renamed) and holds no row, so readers are unaffected.
    """
    path = local_path(to_url(store))
    if path is None:
        return None
    if os.path.isdir(path):
        check_store(store, os.listdir(path))
    elif os.path.exists(path):
        return None  # a file: not a store, and not ours to replace
    runs = os.path.join(path, RUNS_DIR)
    os.makedirs(runs, exist_ok=True)
    target = os.path.join(runs, f"{record['run_id']}.json")
    partial = os.path.join(runs, f".{record['run_id']}.json.tmp")
    with open(partial, "w") as handle:
        handle.write(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(partial, target)
    return target
