"""Train: Horovod-on-Spark data-parallel training of a Keras model on ``images_<size>``.

The driver turns every setting into plain values and ships a closure (:func:`make_worker_fn`) to
``horovod.spark.run``; no SparkSession or config object is pickled. Each rank reads only its own
Petastorm shard (row groups ``rank, rank + size, …``) of the train split. Rank 0 alone returns the
trained model, and the driver writes ``model/`` atomically.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import tempfile
import time

from pyspark.sql import SparkSession

from cxr_spark.config import PipelineConfig, TrainConfig, override
from cxr_spark.labels import LABELS
from cxr_spark.manifest import finish_manifest, input_version
from cxr_spark.plots import plot_training_curves
from cxr_spark.preprocess import NORMALIZATION_FILE
from cxr_spark.storage import FileSystem, atomic_output, local_path, read_json, to_url, write_bytes, write_json

log = logging.getLogger(__name__)
MODEL_FILE = "model.keras"
MODEL_CARD = "model.json"
CURVES_FILE = "training_curves.png"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="input", required=True, help="images_<size> dataset written by preprocess")
    parser.add_argument("--out", required=True, help="model folder to write (replaced atomically)")
    parser.add_argument("--model", help="model name from the zoo (default from conf: small_cnn)")
    parser.add_argument("--num-proc", type=int, help="Horovod processes, one Spark task slot each (default 2)")
    parser.add_argument("--epochs", type=int, help="maximum epochs (early stopping may end sooner)")
    parser.add_argument("--batch-size", type=int, help="batch size per process")
    parser.add_argument("--learning-rate", type=float, help="Adam learning rate per process (scaled by processes)")
    parser.add_argument("--weights", help="local weights file to start from (nothing is downloaded)")


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    settings = override(config.train, model=args.model, num_proc=args.num_proc, epochs=args.epochs,
                        batch_size=args.batch_size, learning_rate=args.learning_rate, weights=args.weights)
    return train(spark, args.input, args.out, settings)


def normalize(images, mean: float, std: float):
    """uint8 images to float32 standardised by the train split's statistics (numpy or TF tensors)."""
    return (images - mean) / std


def make_worker_fn(plain: dict):
    """Return the function each Horovod rank runs. ``plain`` holds only str/int/float values."""

    def train_on_rank():
        import numpy as np
        import tensorflow as tf
        import horovod.tensorflow.keras as hvd
        from petastorm import make_reader
        from petastorm.tf_utils import make_petastorm_dataset

        from cxr_spark.metrics import tune_thresholds
        from cxr_spark.models import build_model

        hvd.init()
        rank, size = hvd.rank(), hvd.size()
        threads = max(1, (os.cpu_count() or 1) // hvd.local_size())
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.keras.utils.set_random_seed(plain["seed"] + rank)
        mean, std, image_size = plain["mean"], plain["std"], plain["size"]

        def dataset(reader, training: bool):
            def to_example(row):
                image = normalize(tf.cast(row.image, tf.float32), mean, std)[..., tf.newaxis]
                return tf.ensure_shape(image, (image_size, image_size, 1)), tf.cast(row.labels, tf.float32)

            data = make_petastorm_dataset(reader).map(to_example, num_parallel_calls=2)
            if training:
                data = data.shuffle(plain["shuffle_buffer"], seed=plain["seed"] + rank)
            return data.batch(plain["batch_size"]).prefetch(2)

        def reader(split: str, sharded: bool):
            return make_reader(plain["url"], schema_fields=["image", "labels"], filters=[("split", "=", split)],
                               cur_shard=rank if sharded else None, shard_count=size if sharded else None,
                               num_epochs=None, shuffle_row_groups=True, seed=plain["seed"],
                               workers_count=2, reader_pool_type="thread")

        model = build_model(plain["model"], image_size, len(plain["labels"]), plain["seed"], plain["weights"] or None)
        scaled_lr = plain["learning_rate"] * size  # the global batch grows with the number of processes
        optimizer = hvd.DistributedOptimizer(tf.keras.optimizers.legacy.Adam(scaled_lr))
        model.compile(optimizer=optimizer, loss="binary_crossentropy",
                      metrics=[tf.keras.metrics.AUC(multi_label=True, num_labels=len(plain["labels"]), name="auroc")])
        callbacks = [
            hvd.callbacks.BroadcastGlobalVariablesCallback(0),  # every rank starts from rank 0's weights
            hvd.callbacks.MetricAverageCallback(),  # so every rank sees, and early-stops on, the same val_loss
            # a large scaled rate is unstable in the first steps: ramp up to it
            hvd.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr, warmup_epochs=plain["warmup_epochs"],
                                                     steps_per_epoch=plain["steps_per_epoch"], verbose=0),
            tf.keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-6),
            tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=plain["patience"], restore_best_weights=True),
        ]
        with reader("train", True) as train_reader, reader("val", plain["val_sharded"]) as val_reader:
            history = model.fit(dataset(train_reader, True), validation_data=dataset(val_reader, False),
                                epochs=plain["epochs"], steps_per_epoch=plain["steps_per_epoch"],
                                validation_steps=plain["validation_steps"], callbacks=callbacks,
                                verbose=2 if rank == 0 else 0)
        if rank != 0:
            return None
        # Per-label decision thresholds, tuned on the whole validation split (one pass, no sharding; the
        # single-threaded pool, since petastorm's thread pool can end a one-epoch read early).
        with make_reader(plain["url"], schema_fields=["image", "labels"], filters=[("split", "=", "val")],
                         num_epochs=1, reader_pool_type="dummy") as val_rows:
            rows = list(val_rows)
        val_images = normalize(np.stack([r.image for r in rows]).astype(np.float32), mean, std)[..., np.newaxis]
        val_scores = model.predict(val_images, batch_size=plain["batch_size"], verbose=0)
        thresholds = tune_thresholds(np.stack([r.labels for r in rows]), val_scores)
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, MODEL_FILE)
            model.save(path)
            with open(path, "rb") as handle:
                model_bytes = handle.read()
        clean = {key: [float(v) for v in values] for key, values in history.history.items()}
        return {"model_bytes": model_bytes, "history": clean, "epochs_run": len(history.epoch),
                "thresholds": thresholds, "val_images_tuned": len(rows)}

    return train_on_rank


def _split_files(spark: SparkSession, dataset_url: str, split: str) -> int:
    """Parquet files (at least one row group each) holding ``split``: the unit Petastorm shards by."""
    fs = FileSystem(spark, dataset_url)
    return fs.count_files(f"{dataset_url}/split={split}", suffix=".parquet")


def train(spark: SparkSession, input_url: str, out: str, settings: TrainConfig) -> dict:
    """Train with ``settings.num_proc`` Horovod processes; write the model and ``model.json`` to ``out``."""
    import horovod.spark

    started = time.time()
    url = to_url(input_url)
    manifest = read_json(spark, f"{url}/_manifest.json")
    normalization = read_json(spark, f"{url}/{NORMALIZATION_FILE}")
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
    global_batch = settings.batch_size * settings.num_proc
    plain = {
        "url": url, "size": int(size), "labels": list(LABELS), "model": settings.model, "seed": settings.seed,
        "mean": float(normalization["mean"]), "std": float(normalization["std"]),
        "batch_size": settings.batch_size, "learning_rate": settings.learning_rate, "epochs": settings.epochs,
        "patience": settings.patience, "shuffle_buffer": settings.shuffle_buffer,
        "warmup_epochs": settings.warmup_epochs, "weights": settings.weights,
        # Every rank runs the same number of steps, or the allreduce of the shorter one would hang.
        "steps_per_epoch": max(1, n_train // global_batch),
        "validation_steps": max(1, math.ceil(n_val / global_batch)),
        "val_sharded": _split_files(spark, url, "val") >= settings.num_proc,
    }
    log.info("training %s on %d train / %d val images at %dpx with %d Horovod processes, %d steps per epoch",
             settings.model, n_train, n_val, size, settings.num_proc, plain["steps_per_epoch"])
    results = horovod.spark.run(make_worker_fn(plain), num_proc=settings.num_proc, use_gloo=True,
                                use_mpi=False, verbose=1, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                                                             PYTHONWARNINGS="ignore::FutureWarning"))
    result = next(r for r in results if r is not None)
    model_version = f"{settings.model}-{hashlib.sha256(result['model_bytes']).hexdigest()[:12]}"
    history = result["history"]
    card = {
        "model_version": model_version,
        "model": settings.model,
        "task": "multilabel",
        "labels": list(LABELS),
        "input_size": int(size),
        "normalization": {"mode": "train_mean_std", "mean": plain["mean"], "std": plain["std"]},
        "thresholds": dict(zip(LABELS, result["thresholds"])),
        "thresholds_tuned_on": {"split": "val", "images": result["val_images_tuned"], "criterion": "max F1"},
        "training": {**{k: v for k, v in plain.items() if k not in ("labels",)}, "num_proc": settings.num_proc,
                     "epochs_run": result["epochs_run"]},
        "history": history,
        "dataset": {"url": url, "code_version": manifest.get("code_version"), "counts": manifest["counts"]},
    }
    best = min(range(len(history["val_loss"])), key=history["val_loss"].__getitem__)
    counts = {"train_images": n_train, "val_images": n_val, "epochs_run": result["epochs_run"],
              "best_epoch": best + 1, "best_val_loss": history["val_loss"][best],
              "best_val_auroc": history.get("val_auroc", [None] * (best + 1))[best]}
    with atomic_output(spark, out) as tmp:
        write_bytes(f"{tmp}/{MODEL_FILE}", result["model_bytes"])
        write_json(spark, f"{tmp}/{MODEL_CARD}", card)
        plot_training_curves(history, local_path(f"{tmp}/{CURVES_FILE}"), f"{model_version}: {n_train} train images")
        finish_manifest(spark, tmp, "train", started, config=settings, inputs={"images": input_version(spark, url)},
                        counts=counts,
                        extra={"model_version": model_version})
    return {**counts, "model_version": model_version}


def load_model_card(spark: SparkSession, model_dir: str) -> dict:
    """Read ``model.json``: the labels, input size, normalisation and thresholds a model scores with."""
    return read_json(spark, f"{to_url(model_dir)}/{MODEL_CARD}")

