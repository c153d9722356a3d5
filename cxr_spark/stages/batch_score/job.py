"""Batch scoring: score a new, unlabelled image dump (PNG, JPEG or DICOM) into a predictions store.

Made to run from cron. Each run:

1. takes the store's lock (``<store>/_lock``, created atomically; a stale one is broken with a log line);
2. lists the dump and hashes every file in the Python workers (:func:`cxr_spark.io.storage.sha256_hex`;
   meanwhile each worker starts loading the model), then drops, with a Spark ``left_anti`` join, every
   content hash this model version already scored or quarantined; identical files within the dump are
   scored once;
3. decodes, resizes and normalises the new files with the model's own ``model.json`` settings and
   scores them in ``mapInPandas`` (one model load per Python worker, as in ``score``); files that
   cannot be used become quarantine rows;
4. writes everything into ``<store>/_staging/<run_id>/`` and commits with directory renames:
   ``scored_date=D/run_id=R/`` (predictions), ``_quarantine/scored_date=D/run_id=R/`` and
   ``_runs/<run_id>.json`` (the run summary). Readers (``spark.read.parquet(store)``) never see a
   partial run: a run folder appears whole in one rename, and Spark skips ``_``-prefixed folders.
   If anything fails the staged files are deleted and completed renames are undone, so the store is
   left as it was.

A run refused before it starts because of its inputs (the dump is missing, the model is not a model folder)
writes only its summary, ``_runs/<run_id>.json`` with status ``refused`` and the error, so a scheduler's
failed night shows in the store too (:mod:`cxr_spark.stages.batch_score.store`).

Each run also measures drift (:mod:`cxr_spark.stages.batch_score.drift`): the PSI of what it scored against the
validation split recorded in ``model.json``, per finding and of the input's mean intensity, kept as ``drift`` in
its ``_runs/<run_id>.json``; a drifted run logs a warning naming what drifted. Each committed run rewrites
``<store>/_monitor.html``, the store's runs over time (:mod:`cxr_spark.stages.batch_score.monitor`).

Exit codes (``cxr-spark batch-score``): 0 new images were processed (scored and/or quarantined),
3 nothing new, 4 the store is locked by another run, 2 refused before it started, 1 failed; with
``--fail-on-drift``, 5 for a run that drifted (after committing its results: its rows are in the store).
Without the flag a drifted run exits 0 as any other.
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import logging
import os
import shutil
import time

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cxr_spark.cli_flags import conf_default
from cxr_spark.config import PipelineConfig, load_config, override
from cxr_spark.core.drift import DRIFT_THRESHOLD
from cxr_spark.core.guards import EXIT_USAGE, MODEL_URI_PREFIX, UsageError, check_folder, check_input, check_run
from cxr_spark.core.identity import IMAGE_GLOB
from cxr_spark.datasets.manifest import code_version, finish_manifest, input_version
from cxr_spark.datasets.model_card import MODEL_CARD, MODEL_FILE, load_model_card
from cxr_spark.datasets.quarantine import QUARANTINE_DIR
from cxr_spark.io.commit import DEFAULT_LOCK_STALE_AFTER_S, EXIT_LOCKED, RunLock, step
from cxr_spark.io.parquet_parts import written_rows
from cxr_spark.io.storage import (FileSystem, listed_paths, local_frame, local_path, read_bytes, to_url,
                                  write_text)
from cxr_spark.io.tracking import check_registered_model, download_registered_model, is_registry_uri
from cxr_spark.stages.batch_score.drift import drift_record
from cxr_spark.stages.batch_score.monitor import MONITOR_FILE, start_importing_plots, write_monitor
from cxr_spark.stages.batch_score.scoring import (HASHED_DDL, SCORED_DDL, card_settings, hash_files, hash_input,
                                                  score_files, scoring_input)
from cxr_spark.stages.batch_score.store import COMMIT_SUFFIX, LOCK_FILE, RUNS_DIR, STAGING_DIR, check_store
from cxr_spark.stages.batch_score.store import commit_moves as _commit
from cxr_spark.stages.batch_score.store import delete_if_empty, new_run_id, recover_staged_runs, write_refused_run

log = logging.getLogger(__name__)

EXIT_SCORED = 0
EXIT_FAILED = 1
EXIT_NOTHING_NEW = 3
EXIT_DRIFTED = 5
EXIT_CODES_HELP = (f"exit codes: {EXIT_SCORED} new images processed (scored and/or quarantined), "
                   f"{EXIT_NOTHING_NEW} nothing new, {EXIT_LOCKED} store locked by another run, "
                   f"{EXIT_USAGE} refused before it started (a missing dump or model is recorded in <out>/_runs/), "
                   f"{EXIT_DRIFTED} drifted, with --fail-on-drift (the results are committed), "
                   f"{EXIT_FAILED} failed (the store is left as it was)")

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # sha256(b"")
STORE_KEY_DDL = "content_sha256 string, model_version string"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True,
                        help="dump folder, searched recursively for *.png, *.jpg, *.jpeg, *.dcm (any case)")
    parser.add_argument("--model", required=True,
                        help="model folder written by train (model.keras + model.json), or a registered version: "
                             "models:/NAME/VERSION, models:/NAME@ALIAS")
    parser.add_argument("--tracking-uri", help="MLflow store holding a models:/ --model (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--out", required=True, help="predictions store to append to (created if missing)")
    parser.add_argument("--batch-size", type=int, help=f"images per model call {conf_default('score', 'batch_size')}")
    parser.add_argument("--lock-stale-after", type=float, default=DEFAULT_LOCK_STALE_AFTER_S, metavar="SECONDS",
                        help=f"break a lock older than this, or one whose process on this host is gone "
                             f"(default {DEFAULT_LOCK_STALE_AFTER_S})")
    parser.add_argument("--retry-quarantined", action="store_true",
                        help="try again files this model version quarantined before (e.g. after a decoder fix)")
    parser.add_argument("--fail-on-drift", action="store_true", default=False,
                        help=f"exit {EXIT_DRIFTED} when the run drifted from the model's validation split (a PSI "
                             f"over {DRIFT_THRESHOLD}, see docs/batch-score.md), after committing its results "
                             f"(default: off: a drifted run logs a warning and exits as it would)")
    parser.epilog = EXIT_CODES_HELP


def check_args(args: argparse.Namespace) -> None:
    """The run's paths, before Spark starts: the store may not overlap the dump or the model, and an existing
    store must be one (:func:`check_store`); then the dump must exist and the model be a model folder
    (an MLflow ``models:/`` URI is left to the run). A run refused for its inputs leaves its summary in the
    store's ``_runs/``, as every run does (:func:`refused_run_record`)."""
    check_run({"--images": args.images, "--model": args.model}, {"--out": (args.out, None)})
    path = local_path(to_url(args.out))
    if path is not None and os.path.isdir(path):
        check_store(args.out, os.listdir(path))
    try:
        check_folder("--images", args.images)
        check_input("batch-score", "--model", args.model, ("train",), needs=MODEL_CARD)
        if is_registry_uri(args.model):
            check_registered_model(args.model, args.tracking_uri)
    except UsageError as error:
        written = write_refused_run(args.out, refused_run_record(args, error))
        if written is None:
            raise
        raise UsageError(f"{error}; the refused run is recorded in {written}") from error


def refused_run_record(args: argparse.Namespace, error: UsageError) -> dict:
    """The ``_runs/<run_id>.json`` of a run refused before it started: the keys of every run's summary, its
    counts all zero, ``status`` ``refused``, the exit code and the error."""
    now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    run_id = new_run_id(now)
    try:
        config = load_config(args.config)
    except (OSError, ValueError):  # a broken --config: the record still says what the flags set
        config = None
    card = os.path.join(local_path(to_url(args.model)) or "", MODEL_CARD)
    try:
        with open(card) as handle:
            model_version = json.load(handle).get("model_version")
    except (OSError, ValueError, AttributeError):
        model_version = None
    counts = {"files_listed": 0, "scored": 0, "skipped": 0, "skipped_known": 0, "skipped_duplicate_content": 0,
              "quarantined": 0, "flagged": {}, "status": error.status, "exit_code": error.exit_code,
              "error": str(error), "run_id": run_id, "scored_date": f"{now:%Y-%m-%d}", "model_version": model_version}
    model = args.model if args.model.startswith(MODEL_URI_PREFIX) else to_url(args.model)
    return {"stage": "batch-score", "code_version": code_version(), "finished_at": now.isoformat(), "duration_s": 0.0,
            "config": settings(args, config),
            "inputs": {"images": to_url(args.images), "model": {"url": model}}, "counts": counts, "run_id": run_id,
            "model_version": model_version, "store": to_url(args.out), "error": str(error)}


def settings(args: argparse.Namespace, config: PipelineConfig | None) -> dict[str, dict]:
    """The run's settings: its flags, the batch size from conf's [score] unless given (what ``--print-config``
    shows); without ``config`` (a refused run) only what the flags set."""
    batch_size = override(config.score, batch_size=args.batch_size).batch_size if config else args.batch_size
    return {"batch-score": {"batch_size": batch_size, "lock_stale_after_s": args.lock_stale_after,
                            "retry_quarantined": args.retry_quarantined, "fail_on_drift": args.fail_on_drift}}


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    run = settings(args, config)["batch-score"]
    registered = is_registry_uri(args.model)
    model_dir = download_registered_model(args.model, args.tracking_uri) if registered else args.model
    try:
        return batch_score(spark, args.images, model_dir, args.out, batch_size=run["batch_size"],
                           lock_stale_after_s=run["lock_stale_after_s"], retry_quarantined=run["retry_quarantined"],
                           model_source=args.model if registered else None,
                           fail_on_drift=run["fail_on_drift"])
    finally:
        if registered:
            shutil.rmtree(model_dir, ignore_errors=True)


def exit_code(counts: dict, fail_on_drift: bool = False) -> int:
    """The process exit code of a finished run: its summary's own ``exit_code`` when it has one, else 0 when new
    images were processed, 3 when nothing was new, and 5 instead when it drifted and ``fail_on_drift``."""
    if "exit_code" in counts:
        return counts["exit_code"]
    if fail_on_drift and counts.get("drifted"):
        return EXIT_DRIFTED
    return EXIT_SCORED if counts["scored"] + counts["quarantined"] else EXIT_NOTHING_NEW


# ---------------------------------------------------------------------------------------------
# the job


def list_dump(spark: SparkSession, images: str, hash_function) -> tuple[DataFrame, list[tuple[str, str]]]:
    """The dump's files as ``binaryFile`` rows, and every listed file with its content hash, in path order.

    The hash is taken in the Python workers by ``hash_function`` (a mapInPandas function,
    :func:`~cxr_spark.stages.batch_score.scoring.hash_files`) and collected: one Spark job that reads each file
    once. Spark makes no row for a 0-byte file; its path still comes from the file index and gets the empty
    content's hash. Only the files the hashes show to be new are decoded and scored.
    """
    files = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
             .option("pathGlobFilter", IMAGE_GLOB).load(to_url(images)))
    paths = listed_paths(files)
    # each worker that hashes starts the model too: no more of them than the files are worth
    hashed = dict(hash_input(files, len(paths)).mapInPandas(hash_function, HASHED_DDL).collect())
    return files, [(path, hashed.get(path, EMPTY_SHA256)) for path in sorted(paths)]


def known_hashes(spark: SparkSession, store: str, model_version: str, include_quarantine: bool) -> DataFrame | None:
    """Content hashes this model version already scored (and, unless retrying, quarantined) in ``store``; None
    when the store holds no predictions or quarantine rows yet."""
    fs = FileSystem(spark, store)
    folders = [store] + ([f"{store}/{QUARANTINE_DIR}"] if include_quarantine else [])
    known = [spark.read.schema(STORE_KEY_DDL).parquet(folder).where(F.col("model_version") == model_version)
             .select("content_sha256") for folder in folders if _holds_rows(fs, folder)]
    return functools.reduce(DataFrame.unionByName, known).distinct() if known else None


def _holds_rows(fs: FileSystem, folder: str) -> bool:
    """Whether a store folder has any partition folder (``scored_date=...``): a new store has only ``_``
    folders (its lock, staging, runs of nothing new) and no rows to skip."""
    return any(not name.startswith(("_", ".")) for name in fs.names(folder) or [])


def batch_score(spark: SparkSession, images: str, model_dir: str, store: str, batch_size: int = 64,
                lock_stale_after_s: float = DEFAULT_LOCK_STALE_AFTER_S, retry_quarantined: bool = False,
                model_source: str | None = None, fail_on_drift: bool = False) -> dict:
    """Score the files of ``images`` that ``model_dir``'s version has not seen into ``store``; return the summary.
    ``model_source`` is where ``model_dir`` came from when it is a download (a ``models:/`` URI), for the record.
    The run's drift is in its summary (``drifted``) and record (``drift``); with ``fail_on_drift`` a drifted run's
    ``exit_code`` is 5. Each committed run rewrites ``<store>/_monitor.html``.

    Raises :class:`~cxr_spark.io.commit.OutputLockedError` when another run holds the store; any other failure leaves the
    store as it was.
    """
    started = time.time()
    store, model_url = to_url(store), to_url(model_dir)
    card = load_model_card(spark, model_url)
    plain = {**card_settings(card, model_url), "model_source": model_source or model_url}
    model_bytes = read_bytes(f"{model_url}/{MODEL_FILE}")
    scored_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    run_id = new_run_id(scored_at)
    scored_date = f"{scored_at:%Y-%m-%d}"

    fs = FileSystem(spark, store)
    check_store(store, [name for name in fs.names(store) or [] if name not in (LOCK_FILE, STAGING_DIR)])
    created_store = not fs.exists(store)
    fs.mkdirs(store)
    lock = RunLock(spark, f"{store}/{LOCK_FILE}", run_id, lock_stale_after_s)
    lock.acquire("store")  # on failure the folder stays: the run holding the lock may have just created it
    staging = f"{store}/{STAGING_DIR}/{run_id}"
    committed = False
    try:
        recover_staged_runs(spark, fs, store)
        log.info("batch-score run %s: %s with model %s into %s", run_id, images, plain["model_version"], store)
        start_importing_plots()  # for the monitor page, written after the commit
        model_broadcast = spark.sparkContext.broadcast(model_bytes)  # the workers load it while hashing
        try:
            summary = _score_run(spark, images, model_url, store, staging, plain, model_broadcast, batch_size,
                                 scored_at, run_id, retry_quarantined, started, card, fail_on_drift)
        finally:
            model_broadcast.unpersist()
        # The summary first: a reader never sees a row whose run has no summary, even after a kill.
        moves = [(f"{staging}/_manifest.json", f"{store}/{RUNS_DIR}/{run_id}.json"),
                 (f"{staging}/quarantine", f"{store}/{QUARANTINE_DIR}/scored_date={scored_date}/run_id={run_id}"),
                 (f"{staging}/predictions", f"{store}/scored_date={scored_date}/run_id={run_id}")]
        step("store staged")
        write_text(spark, f"{staging}{COMMIT_SUFFIX}", json.dumps({"run_id": run_id, "moves": moves}) + "\n")
        step("store committed")
        _commit(fs, store, moves)
        committed = True
        _rewrite_monitor(spark, store)
        return summary
    finally:
        if created_store and not committed:
            fs.delete(store)  # still under our lock (it goes with the folder): nobody else wrote here
            log.warning("run %s failed; removed the store folder %s it had created", run_id, store)
        else:
            fs.delete(staging)
            fs.delete(f"{staging}{COMMIT_SUFFIX}")
            delete_if_empty(fs, f"{store}/{STAGING_DIR}")
            lock.release()


def _score_run(spark: SparkSession, images: str, model_url: str, store: str, staging: str, plain: dict,
               model_broadcast, batch_size: int, scored_at: dt.datetime, run_id: str,
               retry_quarantined: bool, started: float, card: dict, fail_on_drift: bool) -> dict:
    """Everything of one run that writes only into ``staging``; returns the summary. ``model_broadcast`` holds
    the bytes of ``model.keras``."""
    files, index = list_dump(spark, images, hash_files(plain["model_version"], model_broadcast))
    n_listed = len(index)
    known = known_hashes(spark, store, plain["model_version"], not retry_quarantined)
    # the files not known, one row each, on the driver: the scoring's broadcast join below holds them all anyway
    fresh_rows = index if known is None else [
        (row["source_path"], row["content_sha256"]) for row in
        local_frame(spark, index, HASHED_DDL).join(known, "content_sha256", "left_anti").collect()]
    n_fresh = len(fresh_rows)
    new_rows = first_copies(fresh_rows)
    n_new = len(new_rows)
    new = local_frame(spark, new_rows, HASHED_DDL)
    labels = plain["labels"]
    flagged = dict.fromkeys(labels, 0)
    n_scored = n_quarantined = 0
    usable = None  # the rows scored, with their input intensity, for the drift histograms
    if n_new:
        # 0-byte files have no binaryFile row; they join the batches as empty content (-> empty_file)
        empty = new.where(F.col("content_sha256") == EMPTY_SHA256).select(
            "source_path", F.lit("").cast("binary").alias("content"))
        contents = files.select(F.col("path").alias("source_path"), "content").unionByName(empty)
        scored = (scoring_input(contents, new, n_new)
                  .mapInPandas(score_files(plain, model_broadcast, batch_size), SCORED_DDL))
        (scored.withColumn("model_version", F.lit(plain["model_version"]))
         .withColumn("scored_at", F.lit(scored_at).cast("timestamp"))
         .write.parquet(f"{staging}/all"))
        every = spark.read.schema(f"{SCORED_DDL}, model_version string, scored_at timestamp").parquet(
            f"{staging}/all")  # as written just now: no job to infer the schema
        predictions = every.where("reason IS NULL").select(
            "image_id", F.lit("unlabeled").alias("split"), F.lit(None).cast("array<smallint>").alias("labels"),
            "probabilities", "flagged", "model_version", "scored_at", "content_sha256", "source_path", "image_format")
        quarantine = every.where("reason IS NOT NULL").select(
            *[F.col(name) for name in ("source_path", "image_id", "reason", "detail")],
            F.lit("file").alias("kind"), "content_sha256", "model_version", "scored_at")
        n_scored, n_quarantined = _write_nonempty(predictions, f"{staging}/predictions"), \
            _write_nonempty(quarantine.coalesce(1), f"{staging}/quarantine")
        if n_scored:
            usable = every.where("reason IS NULL")
            written = spark.read.schema("flagged array<string>").parquet(f"{staging}/predictions")
            flagged.update({row["finding"]: row["count"] for row in
                            written.select(F.explode("flagged").alias("finding")).groupBy("finding").count().collect()})
    counts = {"files_listed": n_listed, "scored": n_scored, "skipped": n_listed - n_new,
              "skipped_known": n_listed - n_fresh, "skipped_duplicate_content": n_fresh - n_new,
              "quarantined": n_quarantined, "flagged": {label: flagged[label] for label in labels}}
    if n_scored + n_quarantined != n_new:
        raise RuntimeError(f"batch-score counts do not reconcile: {n_new} new files, {counts}")
    drift = drift_record(card, usable, labels, run_id, fail_on_drift)
    counts["status"] = "scored" if n_new else "nothing_new"
    counts["drifted"] = drift["drifted"]
    counts["exit_code"] = exit_code(counts, fail_on_drift)
    counts.update(run_id=run_id, scored_date=f"{scored_at:%Y-%m-%d}", model_version=plain["model_version"])
    finish_manifest(spark, staging, "batch-score", started,
                    config={"batch_size": batch_size, "retry_quarantined": retry_quarantined,
                            "fail_on_drift": fail_on_drift, "thresholds": dict(zip(labels, plain["thresholds"]))},
                    inputs={"images": to_url(images),
                            "model": {**input_version(spark, model_url), "source": plain["model_source"]}},
                    counts=counts,
                    extra={"run_id": run_id, "model_version": plain["model_version"], "store": store,
                           "drift": drift})
    return counts


def first_copies(files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Of ``(path, content hash)`` pairs, the first path (in sorted order) of each content: identical files are
    scored once, and the same one whichever order they were listed in.

    >>> first_copies([("b/2.png", "h1"), ("a/1.png", "h1"), ("c/3.png", "h2")])
    [('a/1.png', 'h1'), ('c/3.png', 'h2')]
    """
    first: dict[str, str] = {}
    for path, digest in sorted(files):
        first.setdefault(digest, path)
    return sorted((path, digest) for digest, path in first.items())


def _rewrite_monitor(spark: SparkSession, store: str) -> None:
    """Rewrite ``<store>/_monitor.html`` after a commit. It is derived from ``_runs/`` and the next run writes it
    again, so a failure here is logged and does not fail a run whose results are committed."""
    try:
        write_monitor(spark, store)
    except Exception:  # noqa: BLE001 - the run's results are in the store already
        log.exception("could not rewrite %s/%s; the run's results are committed", store, MONITOR_FILE)


def _write_nonempty(frame: DataFrame, url: str) -> int:
    """Write ``frame`` to ``url`` and return its row count, removing what was written when it has none (no
    empty run folders in the store)."""
    frame.write.parquet(url)
    n_rows = written_rows(frame.sparkSession, url)
    if not n_rows:
        FileSystem(frame.sparkSession, url).delete(url)
    return n_rows
