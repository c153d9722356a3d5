"""``make bench`` (training part): does the input pipeline feed the model, and how do 2 Horovod
processes scale over 1? Measured side by side in one run on the same ``images_<size>`` dataset; medians.

1. the input pipeline's rate (row groups read, augmented, normalised) in one process on one core (images/s),
   exactly as a training epoch reads (:func:`cxr_spark.stages.train.input_pipeline.iterate_epoch`);
2. the training step rate of the demo model in one process on one core (images/s), compiled as
   :mod:`cxr_spark.stages.train.job` compiles it (class-weighted loss, AUROC metric);
3. their ratio (goal: the input pipeline delivers at least 2x what the model consumes);
4. Horovod-on-Spark throughput with 2 processes over 2 x that of 1 process, each process on one
   intra-op thread and doing the same number of steps: the scaling efficiency; and each process's CPU
   time per image in both runs (on a shared machine, wall times also measure everyone else's load).

Each measurement runs in a fresh process (a spawned child, or a Horovod process), so TensorFlow's
thread pools can still be set to one thread and OpenCV's to one too: one process, one core.
"""
from __future__ import annotations

import logging
import math
import os
import statistics
import time
from contextlib import contextmanager

log = logging.getLogger(__name__)


def one_core_tensorflow():
    """Import TensorFlow limited to one intra-op and one inter-op thread (call before any TF op runs)."""
    import cv2
    import tensorflow as tf

    cv2.setNumThreads(1)  # augmentation (warpAffine) and PNG decoding: one core as well
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


@contextmanager
def fresh_process():
    """A pool of one spawned child process, whose TensorFlow and OpenCV can still be set to one thread."""
    import multiprocessing

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        yield pool


def _in_memory_batches(url: str, batch: int, normalization: dict, seed: int) -> list[tuple]:
    """The train split as full, normalised batches in memory (no augmentation): the step measurement's input."""
    from cxr_spark.stages.train.input_pipeline import iterate_epoch

    return [(x, y) for x, y in iterate_epoch(url, "train", None, None, batch, None, seed, None, normalization)
            if len(x) == batch]


def _compiled_model(model_name: str, size: int, batches: list[tuple], optimizer):
    """The demo model compiled as training compiles it: CheXNet class weights from the labels, AUROC metric."""
    import numpy as np
    import tensorflow as tf

    from cxr_spark.stages.train.models import build_model
    from cxr_spark.stages.train.worker import class_weights, weighted_binary_crossentropy

    labels = np.concatenate([y for _, y in batches])
    model = build_model(model_name, size, labels.shape[1], seed=1)
    model.compile(optimizer=optimizer, loss=weighted_binary_crossentropy(*class_weights(len(labels), labels.sum(0))),
                  metrics=[tf.keras.metrics.AUC(multi_label=True, num_labels=labels.shape[1], name="auroc")])
    return model


def _train_steps(model, batches: list[tuple], steps: int) -> tuple[float, float]:
    """Wall and CPU seconds of this process for ``steps`` training steps over the in-memory batches (cycled)."""
    started, cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        model.train_on_batch(x, y)
    return time.perf_counter() - started, time.process_time() - cpu


def single_process_rates(url: str, settings: dict) -> dict:
    """In a fresh process: the input pipeline's and the model's images/s on one core (medians)."""
    from cxr_spark.stages.train.input_pipeline import Augmentation, iterate_epoch

    tf = one_core_tensorflow()
    batch, steps, repeats = settings["batch_size"], settings["steps"], settings["repeats"]
    augmentation = Augmentation(**settings["augmentation"])
    # one measurement reads whole epochs (one reader opened per epoch, as training does), at least as
    # many images as one step measurement trains on
    epochs = max(1, math.ceil(steps * batch / settings["n_train"]))
    input_rates = []
    for repeat in range(repeats + 1):  # the first pass warms the page cache and imports
        started, n = time.perf_counter(), 0
        for epoch in range(epochs):
            for inputs, _ in iterate_epoch(url, "train", None, None, batch, None, repeat * epochs + epoch,
                                           augmentation, settings["normalization"],
                                           shuffle_buffer=settings["shuffle_buffer"]):
                n += len(inputs)
        if repeat:
            input_rates.append(n / (time.perf_counter() - started))
    batches = _in_memory_batches(url, batch, settings["normalization"], seed=0)
    model = _compiled_model(settings["model"], settings["size"], batches, tf.keras.optimizers.legacy.Adam(1e-4))
    _train_steps(model, batches, 2)  # warm-up: tracing, allocation
    step_rates = [steps * batch / _train_steps(model, batches, steps)[0] for _ in range(repeats)]
    return {"input_images_per_s": statistics.median(input_rates), "input_images_per_measurement": n,
            "step_images_per_s": statistics.median(step_rates)}


def horovod_steps(url: str, settings: dict) -> list[tuple[float, float]]:
    """One Horovod process: wall and CPU seconds of each repeat of ``steps`` synchronous training steps."""
    tf = one_core_tensorflow()
    import horovod.tensorflow as hvd_tf
    import horovod.tensorflow.keras as hvd

    hvd.init()
    batch, steps = settings["batch_size"], settings["steps"]
    batches = _in_memory_batches(url, batch, settings["normalization"], seed=hvd.rank())
    optimizer = hvd.DistributedOptimizer(tf.keras.optimizers.legacy.Adam(1e-4 * hvd.size()))
    model = _compiled_model(settings["model"], settings["size"], batches, optimizer)
    hvd_tf.broadcast_variables(model.variables, root_rank=0)
    _train_steps(model, batches, 2)  # warm-up: tracing, allocation, the first allreduces
    seconds = []
    for _ in range(settings["repeats"]):
        hvd_tf.allreduce(tf.zeros(()), name="bench_barrier").numpy()  # every process starts the clock together
        seconds.append(_train_steps(model, batches, steps))
    return seconds


def horovod_rates(url: str, settings: dict, start_timeout: int) -> dict[int, tuple[float, float]]:
    """Horovod-on-Spark training with 1 and with 2 processes: total images/s and CPU ms per image per process.

    A repeat's throughput is every process's images over the slowest process's time; medians over repeats.
    """
    import horovod.spark

    totals = {}
    for num_proc in (1, 2):
        times = horovod.spark.run(horovod_steps, args=(url, settings), num_proc=num_proc, use_gloo=True,
                                    use_mpi=False, verbose=0, start_timeout=start_timeout,
                                    env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                                             PYTHONWARNINGS="ignore::FutureWarning"))
        images = settings["steps"] * settings["batch_size"]  # per process
        rate = statistics.median(num_proc * images / max(wall for wall, _ in ranks) for ranks in zip(*times))
        cpu_ms = statistics.median(1000 * cpu / images for rank in times for _, cpu in rank)
        totals[num_proc] = rate, cpu_ms
        log.info("bench: Horovod with %d process(es): %.1f images/s, %.1f CPU ms per image per process", num_proc,
                 rate, cpu_ms)
    return totals


def run_training_bench(spark, images_url: str, steps: int, repeats: int) -> dict:
    """All four figures for the ``images_<size>`` dataset at ``images_url``, with conf's [train] settings."""
    from cxr_spark.config import load_config
    from cxr_spark.core.normalization import normalization_spec
    from cxr_spark.datasets.images import NORMALIZATION_FILE
    from cxr_spark.io.storage import read_json, to_url

    config = load_config().train
    url = to_url(images_url)
    counts = read_json(spark, f"{url}/_manifest.json")["counts"]
    settings = {
        "model": config.model, "size": counts["size"], "batch_size": config.batch_size, "steps": steps,
        "repeats": repeats, "n_train": counts["splits"]["train"], "shuffle_buffer": config.shuffle_buffer,
        "normalization": normalization_spec(config.normalization, read_json(spark, f"{url}/{NORMALIZATION_FILE}"),
                                            config.equalize),
        "augmentation": {"enabled": config.augment, "rotation_deg": config.rotation_deg, "shift_x": config.shift_x,
                         "shift_y": config.shift_y, "shear_deg": config.shear_deg, "zoom": config.zoom,
                         "horizontal_flip": config.horizontal_flip},
    }
    if counts["splits"]["train"] < config.batch_size:
        raise ValueError(f"{url} has {counts['splits']['train']} train images, fewer than one batch of "
                         f"{config.batch_size}; raise --n-images")
    log.info("bench: single-process input pipeline and training steps on %s", url)
    with fresh_process() as pool:
        single = pool.apply(single_process_rates, (url, settings))
    result = {"model": settings["model"], "size": settings["size"], "batch_per_process": settings["batch_size"],
              "steps_per_measurement": steps, "train_images": settings["n_train"],
              "input_images_per_measurement": single["input_images_per_measurement"],
              "input_pipeline_images_per_s": single["input_images_per_s"],
              "train_step_images_per_s": single["step_images_per_s"],
              "input_to_step_ratio": single["input_images_per_s"] / single["step_images_per_s"]}
    if spark.sparkContext.defaultParallelism < 2:
        log.warning("bench: %d Spark task slot(s): Horovod scaling needs 2, skipped",
                    spark.sparkContext.defaultParallelism)
        return result
    totals = horovod_rates(url, settings, config.start_timeout_s)
    (rate_1, cpu_1), (rate_2, cpu_2) = totals[1], totals[2]
    result.update(horovod_1_process_images_per_s=rate_1, horovod_2_processes_images_per_s=rate_2,
                  horovod_1_process_to_plain_ratio=rate_1 / single["step_images_per_s"],
                  horovod_scaling_efficiency=rate_2 / (2 * rate_1),
                  horovod_1_process_cpu_ms_per_image=cpu_1, horovod_2_processes_cpu_ms_per_image=cpu_2)
    return result


def format_training_report(result: dict) -> str:
    lines = [f"Training benchmark: {result['model']} at {result['size']}px, batch {result['batch_per_process']} per "
             f"process, {result['train_images']} train images, one core per process, medians",
             f"1. input pipeline (row groups, augmentation, normalisation; C = 1), one process: "
             f"{result['input_pipeline_images_per_s']:.1f} images/s "
             f"(whole epochs, {result['input_images_per_measurement']} images a measurement)",
             f"2. training steps, one process: {result['train_step_images_per_s']:.1f} images/s "
             f"({result['steps_per_measurement']} steps a measurement)",
             f"3. input / step ratio: {result['input_to_step_ratio']:.2f}  (goal >= 2)"]
    if "horovod_scaling_efficiency" in result:
        cpu_ratio = result["horovod_1_process_cpu_ms_per_image"] / result["horovod_2_processes_cpu_ms_per_image"]
        lines += [f"4. Horovod-on-Spark, {result['steps_per_measurement']} steps per process: "
                  f"1 process {result['horovod_1_process_images_per_s']:.1f} images/s "
                  f"({result['horovod_1_process_to_plain_ratio']:.2f} x line 2), "
                  f"2 processes {result['horovod_2_processes_images_per_s']:.1f} images/s",
                  f"   scaling efficiency 2 / (2 x 1 process): {result['horovod_scaling_efficiency']:.2f}  "
                  f"(Horovod paper: about 0.90)",
                  f"   CPU time per image in each process (others' load does not slow it): 1 process "
                  f"{result['horovod_1_process_cpu_ms_per_image']:.1f} ms, 2 processes "
                  f"{result['horovod_2_processes_cpu_ms_per_image']:.1f} ms (ratio {cpu_ratio:.2f})"]
    else:
        lines.append("4. Horovod scaling: skipped (fewer than 2 Spark task slots)")
    return "\n".join(lines)
