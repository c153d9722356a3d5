"""What each Horovod process runs: the weighted loss, the Keras model fitted on this rank's shard, the
checkpoints and the errors a worker leaves for the driver.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

import numpy as np

from cxr_spark.core.drift import mean_intensity
from cxr_spark.core.histograms import INTENSITY_RANGE, PROBABILITY_RANGE, histogram
from cxr_spark.datasets.model_card import MODEL_FILE

CHECKPOINT_STATE = "state.json"
TENSORBOARD_DIR = "tensorboard"  # rank 0's event files, in the checkpoint folder and then in the model folder


def epoch_line(epoch: int, epochs: int, logs: dict, seconds: float, remaining_s: float) -> str:
    """One epoch's console line: its metrics, time and an upper bound on the time left.

    >>> epoch_line(3, 20, {"loss": 0.31, "val_auroc": 0.7412, "lr": 0.001}, 12.04, 204.7)
    'epoch 3/20: loss 0.3100 val_auroc 0.7412 lr 0.001 (12 s; at most 3 min 24 s left)'
    """
    shown = " ".join(f"{key} {value:.4f}" if key != "lr" else f"lr {value:.3g}" for key, value in logs.items())
    left = f"{int(remaining_s // 60)} min {int(remaining_s % 60)} s" if remaining_s >= 60 else f"{remaining_s:.0f} s"
    return f"epoch {epoch}/{epochs}: {shown} ({seconds:.0f} s; at most {left} left)"


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


MIXED_PRECISION = ("auto", "on", "off")


def device_plan(gpus: list, local_rank: int, mixed_precision: str) -> tuple[object | None, str]:
    """The GPU a rank pins (by its local rank; None without GPUs) and its Keras precision policy: float16
    compute with ``"on"``, or with ``"auto"`` when there is a GPU.

    >>> device_plan([], 0, "auto")
    (None, 'float32')
    >>> device_plan(["gpu:0", "gpu:1"], 3, "auto")
    ('gpu:1', 'mixed_float16')
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision {mixed_precision!r}: expected one of {', '.join(MIXED_PRECISION)}")
    gpu = gpus[local_rank % len(gpus)] if gpus else None
    use_float16 = mixed_precision == "on" or (mixed_precision == "auto" and gpu is not None)
    return gpu, "mixed_float16" if use_float16 else "float32"


def make_worker_fn(plain: dict):
    """Return the function each Horovod rank runs. ``plain`` holds only plain values (no session, no config)."""

    def train_on_rank(workers):
        import horovod.tensorflow as hvd_tf
        import horovod.tensorflow.keras as hvd
        import tensorflow as tf
        from horovod.tensorflow import allgather_object

        from cxr_spark.core.metrics import tune_thresholds
        from cxr_spark.stages.train.input_pipeline import (Augmentation, epoch_dataset, iterate_epoch, shard_size,
                                                           steps_per_epoch)
        from cxr_spark.stages.train.models import build_model

        hvd.init()
        rank, size = hvd.rank(), hvd.size()
        gpu, policy = device_plan(tf.config.list_physical_devices("GPU"), hvd.local_rank(), plain["mixed_precision"])
        if gpu is not None:  # one process per GPU, pinned by local rank
            tf.config.experimental.set_memory_growth(gpu, True)
            tf.config.set_visible_devices(gpu, "GPU")
        tf.keras.mixed_precision.set_global_policy(policy)  # with mixed_float16 the sigmoid head stays float32
        threads = max(1, (os.cpu_count() or 1) // hvd.local_size())
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.keras.utils.set_random_seed(plain["seed"] + rank)
        # the same data, settings and seed give the same weights (tested): deterministic kernels; the input
        # order is fixed by the seed (row groups, shuffle buffer, augmentation per rank and epoch)
        tf.config.experimental.enable_op_determinism()
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
                                 shuffle_buffer=plain["shuffle_buffer"], workers=workers)

        def val_epoch(_epoch: int, rank_=val_rank, size_=val_size):
            return iterate_epoch(url, "val", rank_, size_, batch, None, plain["seed"], None, plain["normalization"],
                                 label_index=label_index, workers=workers)

        model = build_model(plain["model"], image_size, n_outputs, plain["seed"], plain["weights"] or None)
        scaled_lr = plain["learning_rate"] * size  # the global batch grows with the number of processes
        optimizer = hvd.DistributedOptimizer(tf.keras.optimizers.legacy.Adam(scaled_lr))
        loss = (weighted_binary_crossentropy(plain["positive_weights"], plain["negative_weights"])
                if plain["class_weighting"] else "binary_crossentropy")
        model.compile(optimizer=optimizer, loss=loss,
                      metrics=[tf.keras.metrics.AUC(multi_label=True, num_labels=n_outputs, name="auroc")])

        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        prefix = os.path.join(plain["checkpoint_dir"], "ckpt")
        state_path = os.path.join(plain["checkpoint_dir"], CHECKPOINT_STATE)
        initial_epoch, history, resumed = 0, {}, None
        best = {"epoch": None, "val_loss": None, "checkpoint": None}
        if plain["resume"]:
            with open(state_path) as handle:
                state = json.load(handle)
            # every rank restores (the folder is shared); rank 0's state is broadcast after the first batch anyway
            checkpoint.read(state["checkpoint"]).expect_partial()
            initial_epoch, history = state["epoch"], state["history"]
            best = state.get("best", best)
            resumed = {"epoch": initial_epoch, "optimizer_iterations": state["optimizer_iterations"]}

        class CheckpointEachEpoch(tf.keras.callbacks.Callback):
            """Rank 0 writes weights + optimiser state and the history so far after every epoch, and keeps the
            checkpoints of the last two epochs and of the best (lowest val_loss) one."""

            def on_epoch_end(self, epoch, logs=None):
                for key, value in (logs or {}).items():
                    history.setdefault(key, []).append(float(value))
                if rank != 0:
                    return
                path = checkpoint.write(f"{prefix}-{epoch + 1}")
                if best["val_loss"] is None or history["val_loss"][-1] < best["val_loss"]:
                    best.update(epoch=epoch + 1, val_loss=history["val_loss"][-1], checkpoint=path)
                state = {"epoch": epoch + 1, "checkpoint": path, "history": history, "best": best,
                         "optimizer_iterations": int(optimizer.iterations.numpy())}
                with open(state_path + ".tmp", "w") as handle:
                    json.dump(state, handle)
                os.replace(state_path + ".tmp", state_path)  # a kill mid-write leaves the previous state
                keep = {f"ckpt-{epoch + 1}", f"ckpt-{epoch}", os.path.basename(best["checkpoint"])}
                for name in os.listdir(plain["checkpoint_dir"]):
                    if name.startswith("ckpt-") and name.split(".", 1)[0] not in keep:
                        os.remove(os.path.join(plain["checkpoint_dir"], name))

        class RestoredOptimizerState(tf.keras.callbacks.Callback):
            """Record the optimiser step count as training (re)starts: the checkpoint's on resume."""

            def on_train_batch_begin(self, batch, logs=None):
                if resumed is not None and "iterations_at_start" not in resumed:
                    resumed["iterations_at_start"] = int(optimizer.iterations.numpy())

        class EpochProgress(tf.keras.callbacks.Callback):
            """Rank 0 prints a line per epoch: its metrics and the time left if every epoch runs."""

            def __init__(self, epochs: int, first: int):
                super().__init__()
                self.epochs, self.first = epochs, first

            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.time()

            def on_epoch_end(self, epoch, logs=None):
                seconds = time.time() - self.started
                print(epoch_line(epoch + 1, self.epochs, dict(logs or {}), seconds,
                                 seconds * (self.epochs - epoch - 1)), flush=True)

        class RankZeroStatisticsForValidation(tf.keras.callbacks.Callback):
            """Before each validation every rank takes rank 0's batch-norm moving statistics (as PyTorch DDP
            broadcasts its buffers): they are updated from each rank's own batches, so without this every rank
            would validate a slightly different model, and the val_loss averaged over ranks (what early stopping
            and the best epoch go by) would not be that of the model rank 0 saves."""

            def on_test_begin(self, logs=None):
                if model.non_trainable_variables:
                    hvd_tf.broadcast_variables(model.non_trainable_variables, root_rank=0)

        early_stopping = tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=plain["patience"])
        callbacks = [
            RestoredOptimizerState(),
            hvd.callbacks.BroadcastGlobalVariablesCallback(0),  # every rank starts from rank 0's weights
            RankZeroStatisticsForValidation(),
            hvd.callbacks.MetricAverageCallback(),  # so every rank sees, and early-stops on, the same val_loss
            # a large scaled rate is unstable in the first steps: ramp up to it
            hvd.callbacks.LearningRateWarmupCallback(initial_lr=scaled_lr, warmup_epochs=plain["warmup_epochs"],
                                                     steps_per_epoch=steps, verbose=0),
            tf.keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, min_lr=1e-6),
            early_stopping,
            CheckpointEachEpoch(),
        ]
        if rank == 0:
            callbacks += [EpochProgress(plain["epochs"], initial_epoch),
                          tf.keras.callbacks.TensorBoard(os.path.join(plain["checkpoint_dir"], TENSORBOARD_DIR),
                                                         write_graph=False, profile_batch=0)]
        started = time.time()
        model.fit(epoch_dataset(lambda e: train_epoch(initial_epoch + e), image_size, n_outputs),
                  validation_data=epoch_dataset(val_epoch, image_size, n_outputs),
                  epochs=plain["epochs"], initial_epoch=initial_epoch, callbacks=callbacks, verbose=0)
        seconds = time.time() - started
        if rank != 0:
            return None
        # Keras restores the best weights only when it stops early: the saved model is the best epoch's
        # whichever way training ended (its checkpoint, kept by CheckpointEachEpoch).
        checkpoint.read(best["checkpoint"]).expect_partial()
        ended = (f"early stopping: val_loss did not improve for {plain['patience']} epochs"
                 if early_stopping.stopped_epoch > 0 else f"reached the last epoch ({plain['epochs']})")
        # Per-label decision thresholds, tuned on the whole validation split (one unsharded pass), and the
        # split's histograms batch-score measures drift against.
        labels, scores, intensities = [], [], []
        for inputs, batch_labels in iterate_epoch(url, "val", None, None, batch, None, 0, None,
                                                  plain["normalization"], label_index=label_index, workers=workers):
            labels.append(batch_labels)
            scores.append(model.predict_on_batch(inputs))
            intensities.append(mean_intensity(inputs, plain["normalization"]))
        labels, scores = np.concatenate(labels), np.concatenate(scores)
        thresholds = tune_thresholds(labels, scores)
        drift_reference = {"images": len(labels), "input_intensity": histogram(np.concatenate(intensities),
                                                                               *INTENSITY_RANGE),
                           "probabilities": [histogram(scores[:, j], *PROBABILITY_RANGE) for j in range(n_outputs)]}
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, MODEL_FILE)
            # the same layers in an uncompiled model: the file holds weights, not the training loss or optimiser
            tf.keras.Model(model.inputs, model.outputs, name=model.name).save(path)
            with open(path, "rb") as handle:
                model_bytes = handle.read()
        # the model's identity: its layers and weights (the .keras file's bytes also hold the time it was saved)
        digest = hashlib.sha256(model.to_json().encode())
        for weights in model.get_weights():
            digest.update(np.ascontiguousarray(weights).tobytes())
        return {"model_bytes": model_bytes, "weights_sha256": digest.hexdigest(),
                "history": history, "epochs_run": len(history.get("loss", [])),
                "best_epoch": best["epoch"], "ended": ended,
                "thresholds": thresholds, "val_images_tuned": len(labels), "drift_reference": drift_reference,
                "shard_sizes": sizes,
                "steps_per_epoch": steps, "resumed": resumed, "train_seconds": round(seconds, 1)}

    def run_and_report():
        from cxr_spark.stages.train.input_pipeline import InputWorkers

        try:
            with InputWorkers(plain["input_workers"]) as workers:  # this rank's decoding and augmenting processes
                return train_on_rank(workers)
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
