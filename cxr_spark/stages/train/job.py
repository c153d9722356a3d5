"""Train: Horovod-on-Spark data-parallel training of a Keras model on ``images_<size>``.

The driver turns every setting into plain values and ships a closure (:func:`make_worker_fn`) to
``horovod.spark.run``; no SparkSession or config object is pickled. Each rank reads only its own
Petastorm shard of the train split, one pass per epoch (the contract is in
:mod:`cxr_spark.stages.train.input_pipeline`). Rank 0 alone writes checkpoints (``--resume`` continues from them)
and returns the trained model with the val split's histograms (``drift_reference`` in ``model.json``, what
batch-score measures drift against), and the driver writes ``model/`` atomically.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession

from cxr_spark.cli_flags import conf_default, deprecated_alias, nonnegative_int
from cxr_spark.config import PipelineConfig, TrackingConfig, TrainConfig, override
from cxr_spark.core.guards import check_input, check_run
from cxr_spark.core.histograms import BINS, INTENSITY_RANGE, PROBABILITY_RANGE
from cxr_spark.core.labels import LABELS
from cxr_spark.core.plots import plot_training_curves
from cxr_spark.datasets.images import NORMALIZATION_FILE
from cxr_spark.datasets.manifest import code_version, command_line, finish_manifest, input_version, library_versions
from cxr_spark.datasets.model_card import MODEL_CARD, MODEL_FILE
from cxr_spark.io.commit import atomic_output, settle
from cxr_spark.io.storage import local_path, read_json, to_url, write_bytes, write_json
from cxr_spark.io.tracking import finish_training_run, open_experiment, start_training_run, store_uri
from cxr_spark.stages.train.worker import (CHECKPOINT_STATE, TENSORBOARD_DIR, _worker_errors, class_weights,
                                           device_plan, make_worker_fn)

log = logging.getLogger(__name__)
CURVES_FILE = "training_curves.png"
TASKS = ("multilabel", "binary")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="input", required=True,
                        help="images_<size> dataset (written by preprocess or ingest --images-out)")
    parser.add_argument("--out", required=True, help="model folder to write (replaced atomically)")
    parser.add_argument("--arch", dest="model", metavar="NAME",
                        help=f"network from the zoo {conf_default('train', 'model')}")
    deprecated_alias(parser, "--model", "--arch")
    parser.add_argument("--task", choices=TASKS,
                        help=f"multilabel: the 14 findings; binary: one finding {conf_default('train', 'task')}")
    parser.add_argument("--binary-label",
                        help=f"the finding a binary task predicts {conf_default('train', 'binary_label')}")
    parser.add_argument("--num-proc", type=int,
                        help=f"Horovod processes, one Spark task slot each {conf_default('train', 'num_proc')}")
    parser.add_argument("--epochs", type=int,
                        help=f"maximum epochs; early stopping may end sooner {conf_default('train', 'epochs')}")
    parser.add_argument("--batch-size", type=int, help=f"batch size per process {conf_default('train', 'batch_size')}")
    parser.add_argument("--input-workers", type=nonnegative_int, metavar="C",
                        help="processes that decode and augment each Horovod process's input; 0: spark.task.cpus, "
                             f"the cores of one task slot {conf_default('train', 'input_workers')}")
    parser.add_argument("--learning-rate", type=float, help="Adam learning rate per process, scaled by the processes "
                                                            f"{conf_default('train', 'learning_rate')}")
    parser.add_argument("--weights", help="local weights file to start from; nothing is downloaded "
                                          f"{conf_default('train', 'weights')}")
    parser.add_argument("--normalization", choices=("rescale", "train_mean_std", "imagenet"),
                        help="input normalisation: pixels/255 (the seed papers), the train split's mean/std, or "
                             f"ImageNet statistics {conf_default('train', 'normalization')}")
    parser.add_argument("--equalize", action=argparse.BooleanOptionalAction, default=None,
                        help=f"histogram-equalise each film before normalising {conf_default('train', 'equalize')}")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="random affine augmentation of the train split; its ranges are in conf [train] "
                             f"{conf_default('train', 'augment')}")
    parser.add_argument("--class-weighting", action=argparse.BooleanOptionalAction, default=None,
                        help="CheXNet's per-label positive/negative loss weights from train counts "
                             f"{conf_default('train', 'class_weighting')}")
    parser.add_argument("--checkpoint-dir", help="where rank 0 checkpoints every epoch, keeping the last 2 and the "
                                                 "best (default: <out>.checkpoints; on a cluster a filesystem every "
                                                 "executor mounts)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --checkpoint-dir (epoch, weights, optimiser)")
    parser.add_argument("--tracking-uri", help="MLflow tracking store or server (default: MLFLOW_TRACKING_URI, "
                                               "else conf [tracking] uri, else mlruns/ beside --out)")


def check_args(args: argparse.Namespace) -> None:
    """Before Spark starts: the input is an images dataset and the paths safe (:mod:`cxr_spark.core.guards`)."""
    check_input("train", "--in", args.input, ("preprocess",))
    check_run({"--in": args.input, "--weights": args.weights},
              {"--out": (args.out, "train"), "--checkpoint-dir": (args.checkpoint_dir, None)})


def settings(args: argparse.Namespace, config: PipelineConfig) -> TrainConfig:
    """The run's settings: conf's [train] with the flags given (what ``--print-config`` shows)."""
    return override(config.train, model=args.model, task=args.task, binary_label=args.binary_label,
                    num_proc=args.num_proc, epochs=args.epochs, batch_size=args.batch_size,
                    input_workers=args.input_workers,
                    learning_rate=args.learning_rate, weights=args.weights, normalization=args.normalization,
                    equalize=args.equalize, augment=args.augment, class_weighting=args.class_weighting)


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    return train(spark, args.input, args.out, settings(args, config), checkpoint_dir=args.checkpoint_dir,
                 resume=args.resume, tracking=config.tracking, tracking_uri=args.tracking_uri)


def train_label_counts(spark: SparkSession, url: str, n_labels: int) -> np.ndarray:
    """Positive count per label over the train split, summed by Spark (one small row per partition)."""
    from cxr_spark.datasets.raw import METADATA_FIELDS

    field = next(f for f in METADATA_FIELDS if f.name == "labels")

    def count(frames):
        for frame in frames:
            total = np.zeros(n_labels, np.int64)
            for value in frame["labels"]:
                total += field.codec.decode(field, value).astype(np.int64)
            yield pd.DataFrame({"positives": [total.tolist()]})

    rows = (spark.read.parquet(url).where("split = 'train'").select("labels")
            .mapInPandas(count, "positives array<long>").collect())
    return np.sum([row["positives"] for row in rows], axis=0) if rows else np.zeros(n_labels, np.int64)


def _check_gloo(attempts: int = 3) -> None:
    """Horovod's "built with Gloo?" check, which ``horovod.spark.run`` makes first, made here with retries.

    The check forks a child that loads Horovod's extension and answers through a queue. A child forked from
    a driver whose TensorFlow or JVM threads hold a lock can die before it answers, and the check then
    raises ``queue.Empty`` (cf. horovod/horovod#2161). Horovod caches the first answer per arguments, so
    once an attempt here answers, ``run`` uses it instead of forking again. When none does, a spawned process
    (forked from nothing with threads) answers, and Horovod is given that answer (:func:`remember_gloo_built`).
    """
    import queue

    from horovod.common.util import gloo_built

    for attempt in range(1, attempts + 1):
        try:
            gloo_built(verbose=False)  # the arguments horovod.spark.run(verbose=1) passes
            return
        except queue.Empty:
            log.warning("Horovod's Gloo check: its child process exited without answering (attempt %d of %d)",
                        attempt, attempts)
    # Every forked child died: ask a spawned process, which inherits no thread, and give Horovod its answer.
    log.warning("Horovod's Gloo check: asking a new process instead (its children are forked from one with no "
                "threads)")
    # a ProcessPoolExecutor's process, not a (daemonic) Pool worker: the check forks a child of its own
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        built = pool.submit(_gloo_built).result()
    remember_gloo_built(built)
    if not built:
        raise RuntimeError("Horovod was built without Gloo (HOROVOD_WITH_GLOO=1; scripts/install.sh builds it so)")


def _gloo_built() -> bool:
    from horovod.common.util import gloo_built

    return bool(gloo_built(verbose=False))


def remember_gloo_built(built: bool) -> None:
    """Give ``horovod.common.util.gloo_built(verbose=False)``, the call ``horovod.spark.run(verbose=1)`` makes,
    its answer, so that it does not fork a child of its own to find it (horovod 0.28.1 keeps the answers of its
    ``_cache`` decorator in the closure of the function it returns)."""
    from horovod.common.util import gloo_built

    cache = gloo_built.__closure__[gloo_built.__code__.co_freevars.index("cache")].cell_contents
    cache[((), frozenset({("verbose", False)}))] = built


def train(spark: SparkSession, input_url: str, out: str, settings: TrainConfig,
          checkpoint_dir: str | None = None, resume: bool = False, tracking: TrackingConfig | None = None,
          tracking_uri: str | None = None) -> dict:
    """Train with ``settings.num_proc`` Horovod processes; write the model and ``model.json`` to ``out``.

    With ``tracking`` (and unless it is switched off) the run is logged to MLflow and the model registered
    (:mod:`cxr_spark.io.tracking`).
    """
    import horovod.spark

    from cxr_spark.core.normalization import normalization_spec

    started = time.time()
    url = to_url(input_url)
    settle(spark, url)
    manifest = read_json(spark, f"{url}/_manifest.json")
    splits, size = manifest["counts"]["splits"], manifest["counts"]["size"]
    n_train, n_val = splits.get("train", 0), splits.get("val", 0)
    slots = spark.sparkContext.defaultParallelism
    if settings.num_proc > slots:
        raise ValueError(f"--num-proc {settings.num_proc} exceeds the {slots} task slots this Spark application "
                         f"has; Horovod needs one slot per process (raise the cores or lower --num-proc)")
    if n_train == 0 or n_val == 0:
        raise ValueError(f"{url} needs train and val rows to train; it has {splits}")
    train_files = _split_files(spark, url, "train")
    if train_files < settings.num_proc:
        raise ValueError(f"{url}: the train split has {train_files} Parquet files but {settings.num_proc} ranks "
                         f"need one shard each; re-run preprocess with more files per split")
    if settings.task not in TASKS:
        raise ValueError(f"unknown task {settings.task!r}; known: {', '.join(TASKS)}")
    device_plan([], 0, settings.mixed_precision)  # an unknown setting fails here, not in every rank
    if settings.task == "binary" and settings.binary_label not in LABELS:
        raise ValueError(f"--binary-label {settings.binary_label!r} is not a finding; known: {', '.join(LABELS)}")
    normalization = normalization_spec(settings.normalization, read_json(spark, f"{url}/{NORMALIZATION_FILE}"),
                                       settings.equalize)
    label_index = LABELS.index(settings.binary_label) if settings.task == "binary" else None
    labels = [settings.binary_label] if label_index is not None else list(LABELS)
    positives = train_label_counts(spark, url, len(LABELS))
    if label_index is not None:
        positives = positives[label_index:label_index + 1]
    positive_weights, negative_weights = class_weights(n_train, positives)

    checkpoint_url = to_url(checkpoint_dir or f"{to_url(out)}.checkpoints")
    checkpoint_path = local_path(checkpoint_url)
    if checkpoint_path is None:
        raise NotImplementedError(f"--checkpoint-dir {checkpoint_url} must be a local or mounted path")
    if resume and not os.path.exists(os.path.join(checkpoint_path, CHECKPOINT_STATE)):
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint_path} (train once without --resume, "
                                f"or give the --checkpoint-dir of the interrupted run)")
    _clear_checkpoints(checkpoint_path, everything=not resume)

    plain = {
        "url": url, "size": int(size), "labels": labels, "label_index": label_index, "task": settings.task,
        "model": settings.model, "seed": settings.seed, "normalization": normalization,
        "batch_size": settings.batch_size, "learning_rate": settings.learning_rate, "epochs": settings.epochs,
        "patience": settings.patience, "shuffle_buffer": settings.shuffle_buffer,
        "input_workers": input_workers(spark, settings),
        "warmup_epochs": settings.warmup_epochs, "weights": settings.weights,
        "class_weighting": settings.class_weighting,
        "positive_weights": positive_weights, "negative_weights": negative_weights,
        "augmentation": {"enabled": settings.augment, "rotation_deg": settings.rotation_deg,
                         "shift_x": settings.shift_x, "shift_y": settings.shift_y, "shear_deg": settings.shear_deg,
                         "zoom": settings.zoom, "horizontal_flip": settings.horizontal_flip,
                         "fill_mode": settings.fill_mode},
        "mixed_precision": settings.mixed_precision,
        "checkpoint_dir": checkpoint_path, "resume": resume,
        "val_sharded": _split_files(spark, url, "val") >= settings.num_proc,
    }
    log.info("training %s (%s) on %d train / %d val images at %dpx with %d Horovod processes%s",
             settings.model, settings.task, n_train, n_val, size, settings.num_proc,
             f", resuming from {checkpoint_path}" if resume else "")
    uri = store_uri(tracking, out, tracking_uri) if tracking is not None else None
    experiment = open_experiment(uri, tracking) if uri is not None else None  # a bad store fails before training
    _check_gloo()
    try:
        results = horovod.spark.run(make_worker_fn(plain), num_proc=settings.num_proc, use_gloo=True,
                                    use_mpi=False, verbose=1, start_timeout=settings.start_timeout_s,
                                    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="1"))
    except Exception as error:
        # Horovod stops every process as soon as one exits with an error; say which rank and why
        errors = _worker_errors(checkpoint_path)
        if errors:
            raise RuntimeError(f"training failed on a Horovod process: {errors}") from error
        raise
    result = next(r for r in results if r is not None)
    model_version = f"{settings.model}-{result['weights_sha256'][:12]}"  # the same weights, the same version
    history, best = result["history"], result["best_epoch"]
    steps, global_batch = result["steps_per_epoch"], settings.batch_size * settings.num_proc
    card = {
        "model_version": model_version,
        "model": settings.model,
        "task": settings.task,
        "labels": labels,
        "input_size": int(size),
        "normalization": normalization,
        "thresholds": dict(zip(labels, result["thresholds"])),
        "thresholds_tuned_on": {"split": "val", "images": result["val_images_tuned"], "criterion": "max F1",
                                "epoch": best},
        "drift_reference": drift_reference(result["drift_reference"], labels),
        "best_epoch": best, "best_val_loss": history["val_loss"][best - 1], "ended": result["ended"],
        "data": manifest.get("data", "unknown"),
        "training": {**{k: v for k, v in plain.items() if k not in ("labels", "resume")},
                     "num_proc": settings.num_proc, "epochs_run": result["epochs_run"],
                     "steps_per_epoch": steps, "shard_sizes": result["shard_sizes"],
                     "images_per_epoch": steps * global_batch,
                     # the shard contract's remainder: train images not seen in a given epoch
                     "remainder_per_epoch": n_train - steps * global_batch,
                     "resumed": result["resumed"], "train_seconds": result["train_seconds"]},
        "history": history,
        "dataset": {"url": url, "code_version": manifest.get("code_version"),
                    "finished_at": manifest.get("finished_at"), "counts": manifest["counts"]},
        "code_version": code_version(), "libraries": library_versions(), "command": command_line(),
    }
    counts = {"train_images": n_train, "val_images": n_val, "epochs_run": result["epochs_run"],
              "steps_per_epoch": steps, "remainder_per_epoch": n_train - steps * global_batch,
              "best_epoch": best, "best_val_loss": history["val_loss"][best - 1],
              "best_val_auroc": history.get("val_auroc", [None] * best)[best - 1]}
    record = None
    with atomic_output(spark, out, "train") as tmp:
        write_bytes(f"{tmp}/{MODEL_FILE}", result["model_bytes"])
        plot_training_curves(history, local_path(f"{tmp}/{CURVES_FILE}"), f"{model_version}: {n_train} train images")
        if os.path.isdir(os.path.join(checkpoint_path, TENSORBOARD_DIR)):
            shutil.copytree(os.path.join(checkpoint_path, TENSORBOARD_DIR), local_path(f"{tmp}/{TENSORBOARD_DIR}"))
        if experiment is not None:
            record = start_training_run(uri, experiment, tracking, settings.task,
                                        {**plain, "num_proc": settings.num_proc}, history,
                                        _run_tags(card, manifest, settings))
            card["mlflow"] = record
        write_json(spark, f"{tmp}/{MODEL_CARD}", card)
        finish_manifest(spark, tmp, "train", started, config=settings, inputs={"images": input_version(spark, url)},
                        counts=counts, extra={"model_version": model_version, "data": card["data"]})
        if record is not None:
            try:
                finish_training_run(record, local_path(tmp))
            except BaseException:
                finish_training_run(record, local_path(tmp), ok=False)
                raise
            log.info("MLflow: run %s, registered %s (store %s)", record["run_id"], record["model_uri"], uri)
    result_counts = {**counts, "model_version": model_version}
    if record is None:
        return result_counts
    return {**result_counts, "mlflow_run": record["run_id"], "registered": record["model_uri"],
            "tracking_uri": record["tracking_uri"]}


def drift_reference(histograms: dict, labels: list[str]) -> dict:
    """``model.json``'s ``drift_reference``: rank 0's histograms of the val split (the probabilities per finding,
    the per-image mean intensity of the model input on the 0-255 scale), which batch-score compares each run with
    (:mod:`cxr_spark.core.drift`)."""
    return {"split": "val", "bins": BINS, "images": int(histograms["images"]),
            "probability_range": list(PROBABILITY_RANGE), "intensity_range": list(INTENSITY_RANGE),
            "probabilities": dict(zip(labels, histograms["probabilities"])),
            "input_intensity": histograms["input_intensity"]}


def _run_tags(card: dict, manifest: dict, settings: TrainConfig) -> dict[str, str]:
    """What an MLflow user filters runs by: code, data, task and how many Horovod processes."""
    return {"code_version": card["code_version"], "model_version": card["model_version"], "task": settings.task,
            "arch": settings.model, "horovod_size": str(settings.num_proc), "data": card["data"],
            "dataset": card["dataset"]["url"], "dataset_finished_at": str(manifest.get("finished_at")),
            "dataset_code_version": str(manifest.get("code_version")), "ended": card["ended"],
            "best_epoch": str(card["best_epoch"])}


def _clear_checkpoints(folder: str, everything: bool) -> None:
    """Remove an earlier run's checkpoint files from ``folder`` (only the files training writes there).

    A fresh run must not resume from, or mix with, an old one (``everything``); a resumed run keeps them and
    drops only earlier failures' error reports. Anything else in the folder is left alone.
    """
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        ours = name.startswith("ckpt-") or name in (CHECKPOINT_STATE, CHECKPOINT_STATE + ".tmp", TENSORBOARD_DIR)
        if name.endswith(".error") or (everything and ours):
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def input_workers(spark: SparkSession, settings: TrainConfig) -> int:
    """Input worker processes per rank: ``settings.input_workers``, or with 0 the cores of one task slot."""
    if settings.input_workers < 0:
        raise ValueError(f"input_workers {settings.input_workers}: expected 0 (the cores of one task slot) or more")
    return settings.input_workers or int(spark.conf.get("spark.task.cpus", "1"))


def _split_files(spark: SparkSession, dataset_url: str, split: str) -> int:
    """Parquet files (at least one row group each) holding ``split``: the unit Petastorm shards by."""
    from cxr_spark.io.storage import FileSystem

    return FileSystem(spark, dataset_url).count_files(f"{dataset_url}/split={split}", suffix=".parquet")


