"""Train: Horovod-on-Spark data-parallel training of a Keras model on ``images_<size>``.

The driver turns every setting into plain values and ships a closure (:func:`make_worker_fn`) to
``horovod.spark.run``; no SparkSession or config object is pickled. Each rank reads only its own
Petastorm shard of the train split, one pass per epoch (the contract is in
:mod:`cxr_spark.stages.train.input_pipeline`). Rank 0 alone writes checkpoints (``--resume`` continues from them)
and returns the trained model, and the driver writes ``model/`` atomically.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tempfile
import time

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession

from cxr_spark.config import PipelineConfig, TrainConfig, override
from cxr_spark.core.labels import LABELS
from cxr_spark.datasets.manifest import finish_manifest, input_version
from cxr_spark.core.plots import plot_training_curves
from cxr_spark.datasets.images import NORMALIZATION_FILE
from cxr_spark.io.commit import atomic_output, settle
from cxr_spark.core.guards import check_run
from cxr_spark.io.storage import local_path, read_json, to_url, write_bytes, write_json
from cxr_spark.datasets.model_card import MODEL_CARD, MODEL_FILE

log = logging.getLogger(__name__)
CURVES_FILE = "training_curves.png"
CHECKPOINT_STATE = "state.json"
TASKS = ("multilabel", "binary")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="input", required=True, help="images_<size> dataset written by preprocess")
    parser.add_argument("--out", required=True, help="model folder to write (replaced atomically)")
    parser.add_argument("--model", help="model name from the zoo (default from conf: small_cnn)")
    parser.add_argument("--task", choices=TASKS, help="multilabel: the 14 findings (default); binary: one finding")
    parser.add_argument("--binary-label", help="the finding a binary task predicts (default from conf: Pneumonia)")
    parser.add_argument("--num-proc", type=int, help="Horovod processes, one Spark task slot each (default 2)")
    parser.add_argument("--epochs", type=int, help="maximum epochs (early stopping may end sooner)")
    parser.add_argument("--batch-size", type=int, help="batch size per process")
    parser.add_argument("--learning-rate", type=float, help="Adam learning rate per process (scaled by processes)")
    parser.add_argument("--weights", help="local weights file to start from (nothing is downloaded)")
    parser.add_argument("--normalization", choices=("rescale", "train_mean_std", "imagenet"),
                        help="input normalisation: pixels/255 (the seed papers), the train split's mean/std "
                             "(default), or ImageNet statistics")
    parser.add_argument("--equalize", action=argparse.BooleanOptionalAction, default=None,
                        help="histogram-equalise each film before normalising (default off)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="random affine augmentation of the train split (default on; see conf [train])")
    parser.add_argument("--class-weighting", action=argparse.BooleanOptionalAction, default=None,
                        help="CheXNet's per-label positive/negative loss weights from train counts (default on)")
    parser.add_argument("--checkpoint-dir", help="where rank 0 checkpoints every epoch (default: <out>.checkpoints;"
                                                 " on a cluster a filesystem every executor mounts)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --checkpoint-dir (epoch, weights, optimiser)")


def check_args(args: argparse.Namespace) -> None:
    """The run's paths, before Spark starts (:func:`cxr_spark.core.guards.check_run`)."""
    check_run({"--in": args.input, "--weights": args.weights},
              {"--out": (args.out, "train"), "--checkpoint-dir": (args.checkpoint_dir, None)}, folders=("--in",))


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    settings = override(config.train, model=args.model, task=args.task, binary_label=args.binary_label,
                        num_proc=args.num_proc, epochs=args.epochs, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, weights=args.weights, normalization=args.normalization,
                        equalize=args.equalize, augment=args.augment, class_weighting=args.class_weighting)
    return train(spark, args.input, args.out, settings, checkpoint_dir=args.checkpoint_dir, resume=args.resume)


def class_weights(n_images: int, positives: np.ndarray) -> tuple[list[float], list[float]]:
    """CheXNet's weights per label: positives weigh |N|/(|P|+|N|), negatives |P|/(|P|+|N|).

    A label with no positives or no negatives in the train split keeps the unweighted (1, 1).

    >>> class_weights(10, np.array([2, 0]))
    ([0.8, 1.0], [0.2, 1.0])
    """
    positive, negative = [], []
    for count in np.asarray(positives, dtype=np.int64):
        if 0 < count < n_images:
            positive.append((n_images - int(count)) / n_images)
            negative.append(int(count) / n_images)
        else:
            positive.append(1.0)
            negative.append(1.0)
    return positive, negative


def weighted_binary_crossentropy(positive_weights: list[float], negative_weights: list[float]):
    """A Keras loss: binary cross-entropy per label with class weights, averaged over labels."""
    import tensorflow as tf

    pos = tf.constant(positive_weights, tf.float32)
    neg = tf.constant(negative_weights, tf.float32)

    def loss(y_true, y_pred):
        y_true = tf.cast(y_true, tf.float32)
        p = tf.clip_by_value(tf.cast(y_pred, tf.float32), 1e-7, 1 - 1e-7)
        per_label = -(pos * y_true * tf.math.log(p) + neg * (1 - y_true) * tf.math.log(1 - p))
        return tf.reduce_mean(per_label, axis=-1)

    return loss


def make_worker_fn(plain: dict):
    """Return the function each Horovod rank runs. ``plain`` holds only plain values (no session, no config)."""

    def train_on_rank():
        import tensorflow as tf
        import horovod.tensorflow.keras as hvd
        from horovod.tensorflow import allgather_object

        from cxr_spark.stages.train.input_pipeline import Augmentation, epoch_dataset, iterate_epoch, shard_size, steps_per_epoch
        from cxr_spark.core.metrics import tune_thresholds
        from cxr_spark.stages.train.models import build_model

        hvd.init()
        rank, size = hvd.rank(), hvd.size()
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:  # one process per GPU, pinned by local rank
            tf.config.experimental.set_memory_growth(gpus[hvd.local_rank() % len(gpus)], True)
            tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
        if plain["mixed_precision"] == "on" or (plain["mixed_precision"] == "auto" and gpus):
            tf.keras.mixed_precision.set_global_policy("mixed_float16")  # the sigmoid head stays float32
        threads = max(1, (os.cpu_count() or 1) // hvd.local_size())
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.keras.utils.set_random_seed(plain["seed"] + rank)
        url, image_size, batch = plain["url"], plain["size"], plain["batch_size"]
        n_outputs, label_index = len(plain["labels"]), plain["label_index"]

        # Every rank must run the same number of steps, or the allreduce of the longer one would hang.
        sizes = allgather_object(shard_size(url, "train", rank, size))
        steps = steps_per_epoch(sizes, batch)
        if steps == 0:
            raise ValueError(f"rank shards of {sizes} train images cannot fill one batch of {batch} per rank; "
                             f"lower --batch-size or --num-proc")
        augmentation = Augmentation(**plain["augmentation"]) if plain["augmentation"]["enabled"] else None
        val_rank, val_size = (rank, size) if plain["val_sharded"] else (None, None)

        def train_epoch(epoch: int):
            return iterate_epoch(url, "train", rank, size, batch, steps, plain["seed"] * 1000 + epoch * size + rank,
                                 augmentation, plain["normalization"], label_index=label_index,
                                 shuffle_buffer=plain["shuffle_buffer"])

        def val_epoch(_epoch: int, rank_=val_rank, size_=val_size):
            return iterate_epoch(url, "val", rank_, size_, batch, None, plain["seed"], None, plain["normalization"],
                                 label_index=label_index)

        model = build_model(plain["model"], image_size, n_outputs, plain["seed"], plain["weights"] or None)
        scaled_lr = plain["learning_rate"] * size  # the global batch grows with the number of processes
        optimizer = hvd.DistributedOptimizer(tf.keras.optimizers.legacy.Adam(scaled_lr))
        loss = (weighted_binary_crossentropy(plain["positive_weights"], plain["negative_weights"])
                if plain["class_weighting"] else "binary_crossentropy")
        model.compile(optimizer=optimizer, loss=loss,
                      metrics=[tf.keras.metrics.AUC(multi_label=True, num_labels=n_outputs, name="auroc")])

        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        prefix = os.path.join(plain["checkpoint_dir"], "ckpt") if plain["checkpoint_dir"] else None
        state_path = os.path.join(plain["checkpoint_dir"], CHECKPOINT_STATE) if prefix else None
        initial_epoch, history, resumed = 0, {}, None
        if plain["resume"]:
            with open(state_path) as handle:
                state = json.load(handle)
            # every rank restores (the folder is shared); rank 0's state is broadcast after the first batch anyway
            checkpoint.read(state["checkpoint"]).expect_partial()
            initial_epoch, history = state["epoch"], state["history"]
            resumed = {"epoch": initial_epoch, "optimizer_iterations": state["optimizer_iterations"]}

        class CheckpointEachEpoch(tf.keras.callbacks.Callback):
            """Rank 0 writes weights + optimiser state and the history so far after every epoch."""

            def on_epoch_end(self, epoch, logs=None):
                for key, value in (logs or {}).items():
                    history.setdefault(key, []).append(float(value))
                if rank != 0 or prefix is None:
                    return
                path = checkpoint.write(f"{prefix}-{epoch + 1}")
                state = {"epoch": epoch + 1, "checkpoint": path, "history": history,
                         "optimizer_iterations": int(optimizer.iterations.numpy())}
                with open(state_path + ".tmp", "w") as handle:
                    json.dump(state, handle)
                os.replace(state_path + ".tmp", state_path)  # a kill mid-write leaves the previous state

        class RestoredOptimizerState(tf.keras.callbacks.Callback):
            """Record the optimiser step count as training (re)starts: the checkpoint's on resume."""

            def on_train_batch_begin(self, batch, logs=None):
                if resumed is not None and "iterations_at_start" not in resumed:
                    resumed["iterations_at_start"] = int(optimizer.iterations.numpy())

        callbacks = [
            RestoredOptimizerState(),
            hvd.callbacks.BroadcastGlobalVariablesCallback(0),  # every rank starts from rank 0's weights
            hvd.callbacks.MetricAverageCallback(),  # so every rank sees, and early-stops on, the same val_loss
            # a large scaled rate is unstable in the first steps: ramp up to it
            hvd.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr, warmup_epochs=plain["warmup_epochs"],
                                                     steps_per_epoch=steps, verbose=0),
            tf.keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-6),
            tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=plain["patience"], restore_best_weights=True),
            CheckpointEachEpoch(),
        ]
        started = time.time()
        model.fit(epoch_dataset(lambda e: train_epoch(initial_epoch + e), image_size, n_outputs),
                  validation_data=epoch_dataset(val_epoch, image_size, n_outputs),
                  epochs=plain["epochs"], initial_epoch=initial_epoch, callbacks=callbacks,
                  verbose=2 if rank == 0 else 0)
        seconds = time.time() - started
        if rank != 0:
            return None
        # Per-label decision thresholds, tuned on the whole validation split (one unsharded pass).
        labels, scores = [], []
        for inputs, batch_labels in iterate_epoch(url, "val", None, None, batch, None, 0, None,
                                                  plain["normalization"], label_index=label_index):
            labels.append(batch_labels)
            scores.append(model.predict_on_batch(inputs))
        labels, scores = np.concatenate(labels), np.concatenate(scores)
        thresholds = tune_thresholds(labels, scores)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, MODEL_FILE)
            # the same layers in an uncompiled model: the file holds weights, not the training loss or optimiser
            tf.keras.Model(model.inputs, model.outputs, name=model.name).save(path)
            with open(path, "rb") as handle:
                model_bytes = handle.read()
        return {"model_bytes": model_bytes, "history": history, "epochs_run": len(history.get("loss", [])),
                "thresholds": thresholds, "val_images_tuned": len(labels), "shard_sizes": sizes,
                "steps_per_epoch": steps, "resumed": resumed, "train_seconds": round(seconds, 1)}

    def run_and_report():
        try:
            return train_on_rank()
        except BaseException as error:
            # Horovod reports only that a process exited; leave its error where the driver can quote it
            if plain["checkpoint_dir"]:
                import horovod.tensorflow as hvd_tf

                rank = hvd_tf.rank() if hvd_tf.is_initialized() else os.environ.get("HOROVOD_RANK", "?")
                with open(os.path.join(plain["checkpoint_dir"], f"rank-{rank}.error"), "w") as handle:
                    handle.write(f"{type(error).__name__}: {error}"[:2000])
            raise

    return run_and_report


def _worker_errors(checkpoint_dir: str) -> str:
    """The errors failed ranks left in the checkpoint folder, one line each."""
    names = sorted(n for n in os.listdir(checkpoint_dir) if n.endswith(".error"))
    lines = []
    for name in names:
        with open(os.path.join(checkpoint_dir, name)) as handle:
            lines.append(f"{name[:-len('.error')]}: {handle.read().strip()}")
    return "; ".join(lines)


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


def train(spark: SparkSession, input_url: str, out: str, settings: TrainConfig,
          checkpoint_dir: str | None = None, resume: bool = False) -> dict:
    """Train with ``settings.num_proc`` Horovod processes; write the model and ``model.json`` to ``out``."""
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
    if not resume and os.path.isdir(checkpoint_path):
        for name in os.listdir(checkpoint_path):  # a fresh run must not resume from, or mix with, an old one
            os.remove(os.path.join(checkpoint_path, name))
    os.makedirs(checkpoint_path, exist_ok=True)
    for name in os.listdir(checkpoint_path):
        if name.endswith(".error"):  # an earlier failure's report, not this run's
            os.remove(os.path.join(checkpoint_path, name))

    plain = {
        "url": url, "size": int(size), "labels": labels, "label_index": label_index, "task": settings.task,
        "model": settings.model, "seed": settings.seed, "normalization": normalization,
        "batch_size": settings.batch_size, "learning_rate": settings.learning_rate, "epochs": settings.epochs,
        "patience": settings.patience, "shuffle_buffer": settings.shuffle_buffer,
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
    try:
        results = horovod.spark.run(make_worker_fn(plain), num_proc=settings.num_proc, use_gloo=True,
                                    use_mpi=False, verbose=1, start_timeout=settings.start_timeout_s,
                                    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                                             PYTHONWARNINGS="ignore::FutureWarning"))
    except Exception as error:
        # Horovod stops every process as soon as one exits with an error; say which rank and why
        errors = _worker_errors(checkpoint_path)
        if errors:
            raise RuntimeError(f"training failed on a Horovod process: {errors}") from error
        raise
    result = next(r for r in results if r is not None)
    model_version = f"{settings.model}-{hashlib.sha256(result['model_bytes']).hexdigest()[:12]}"
    history = result["history"]
    steps, global_batch = result["steps_per_epoch"], settings.batch_size * settings.num_proc
    card = {
        "model_version": model_version,
        "model": settings.model,
        "task": settings.task,
        "labels": labels,
        "input_size": int(size),
        "normalization": normalization,
        "thresholds": dict(zip(labels, result["thresholds"])),
        "thresholds_tuned_on": {"split": "val", "images": result["val_images_tuned"], "criterion": "max F1"},
        "training": {**{k: v for k, v in plain.items() if k not in ("labels", "resume")},
                     "num_proc": settings.num_proc, "epochs_run": result["epochs_run"],
                     "steps_per_epoch": steps, "shard_sizes": result["shard_sizes"],
                     "images_per_epoch": steps * global_batch,
                     # the shard contract's remainder: train images not seen in a given epoch
                     "remainder_per_epoch": n_train - steps * global_batch,
                     "resumed": result["resumed"], "train_seconds": result["train_seconds"]},
        "history": history,
        "dataset": {"url": url, "code_version": manifest.get("code_version"), "counts": manifest["counts"]},
    }
    best = min(range(len(history["val_loss"])), key=history["val_loss"].__getitem__)
    counts = {"train_images": n_train, "val_images": n_val, "epochs_run": result["epochs_run"],
              "steps_per_epoch": steps, "remainder_per_epoch": n_train - steps * global_batch,
              "best_epoch": best + 1, "best_val_loss": history["val_loss"][best],
              "best_val_auroc": history.get("val_auroc", [None] * (best + 1))[best]}
    with atomic_output(spark, out, "train") as tmp:
        write_bytes(f"{tmp}/{MODEL_FILE}", result["model_bytes"])
        write_json(spark, f"{tmp}/{MODEL_CARD}", card)
        plot_training_curves(history, local_path(f"{tmp}/{CURVES_FILE}"), f"{model_version}: {n_train} train images")
        finish_manifest(spark, tmp, "train", started, config=settings, inputs={"images": input_version(spark, url)},
                        counts=counts, extra={"model_version": model_version})
    return {**counts, "model_version": model_version}


def _split_files(spark: SparkSession, dataset_url: str, split: str) -> int:
    """Parquet files (at least one row group each) holding ``split``: the unit Petastorm shards by."""
    from cxr_spark.io.storage import FileSystem

    return FileSystem(spark, dataset_url).count_files(f"{dataset_url}/split={split}", suffix=".parquet")


