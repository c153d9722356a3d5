"""``make bench`` (training part): does the input pipeline feed the model, and how do 2 Horovod
processes scale over 1? Everything measured side by side in one run on the same dataset; medians.

1. the Petastorm reader + augmentation + normalisation rate of one process (images/s);
2. the training step rate of the demo model in one process with one core (images/s);
3. their ratio (goal: the input pipeline delivers at least 2x what the model consumes);
4. Horovod-on-Spark throughput with 2 processes over 1 (one core each), as scaling efficiency.
"""
from __future__ import annotations

import logging
import statistics
import time

log = logging.getLogger(__name__)
BATCH = 16


def _input_rate(url: str, size: int, repeats: int) -> float:
    from cxr_spark.input_pipeline import Augmentation, iterate_epoch

    spec = {"mode": "rescale", "mean": 0.0, "std": 255.0}
    rates = []
    for seed in range(repeats):
        started, n = time.perf_counter(), 0
        for inputs, _ in iterate_epoch(url, "train", None, None, BATCH, None, seed, Augmentation(), spec):
            n += len(inputs)
        rates.append(n / (time.perf_counter() - started))
    return statistics.median(rates)


def _timed_training(url: str, size: int, model_name: str, steps: int, repeats: int, distributed: bool) -> float:
    """Images/s of ``steps`` training steps on one core (median of ``repeats``), under Horovod or alone."""
    import tensorflow as tf

    from cxr_spark.input_pipeline import iterate_epoch
    from cxr_spark.models import build_model

    tf.config.threading.set_intra_op_parallelism_threads(1)  # one core per process, as one GPU each
    tf.config.threading.set_inter_op_parallelism_threads(1)
    optimizer, rank, barrier = tf.keras.optimizers.legacy.Adam(1e-4), 0, lambda: None
    if distributed:
        import horovod.tensorflow as hvd_tf
        import horovod.tensorflow.keras as hvd

        hvd.init()
        optimizer, rank = hvd.DistributedOptimizer(optimizer), hvd.rank()
        barrier = lambda: hvd_tf.allreduce(tf.zeros(1), name="barrier")  # noqa: E731 - start timing together
    spec = {"mode": "rescale", "mean": 0.0, "std": 255.0}
    batches = list(iterate_epoch(url, "train", None, None, BATCH, None, rank, None, spec))
    model = build_model(model_name, size, batches[0][1].shape[1], seed=1)
    model.compile(optimizer=optimizer, loss="binary_crossentropy")
    if distributed:
        hvd_tf.broadcast_variables(model.variables, root_rank=0)
    for x, y in batches[:2]:  # warm-up: tracing, allocation
        model.train_on_batch(x, y)
    rates = []
    for _ in range(repeats):
        barrier()
        started = time.perf_counter()
        for step in range(steps):
            x, y = batches[step % len(batches)]
            model.train_on_batch(x, y)
        rates.append(steps * BATCH / (time.perf_counter() - started))
    return statistics.median(rates)


def horovod_rates(url: str, size: int, model_name: str, steps: int, repeats: int) -> dict[int, float]:
    """Total images/s of Horovod-on-Spark training with 1 and with 2 processes (needs 2 task slots)."""
    import os

    import horovod.spark

    totals = {}
    for num_proc in (1, 2):
        rates = horovod.spark.run(_timed_training, args=(url, size, model_name, steps, repeats, True),
                                  num_proc=num_proc, use_gloo=True, use_mpi=False, verbose=0,
                                  env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        totals[num_proc] = sum(rates)  # every process's rate; they step in lock-step
        log.info("bench: Horovod with %d process(es): %.1f images/s", num_proc, totals[num_proc])
    return totals


def step_rate(url: str, size: int, model_name: str, steps: int, repeats: int) -> float:
    """One process, one core: the demo model's training steps per second, as images/s (no Horovod)."""
    import multiprocessing

    # a fresh process, so TensorFlow's thread pools can still be set to one thread
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_timed_training, (url, size, model_name, steps, repeats, False))


def run_training_bench(spark, images_url: str, size: int, model_name: str = "small_cnn", steps: int = 20,
                       repeats: int = 3) -> dict:
    """All four figures for the ``images_<size>`` dataset at ``images_url``."""
    from cxr_spark.storage import to_url

    url = to_url(images_url)
    reader = _input_rate(url, size, repeats)
    model = step_rate(url, size, model_name, steps, repeats)
    horovod = horovod_rates(url, size, model_name, steps, repeats) if spark.sparkContext.defaultParallelism >= 2 \
        else {}
    result = {"model": model_name, "size": size, "batch_per_process": BATCH,
              "input_pipeline_images_per_s": reader, "train_step_images_per_s": model,
              "input_to_step_ratio": reader / model}
    if horovod:
        result.update(horovod_1_process_images_per_s=horovod[1], horovod_2_processes_images_per_s=horovod[2],
                      horovod_scaling_efficiency=horovod[2] / (2 * horovod[1]))
    return result


def format_training_report(result: dict) -> str:
    lines = [f"Training benchmark: {result['model']} at {result['size']}px, batch {result['batch_per_process']} "
             f"per process, medians",
             f"1. Petastorm reader + augmentation, one process: {result['input_pipeline_images_per_s']:.1f} images/s",
             f"2. training steps, one process on one core:     {result['train_step_images_per_s']:.1f} images/s",
             f"3. input / step ratio: {result['input_to_step_ratio']:.2f}  (goal >= 2)"]
    if "horovod_scaling_efficiency" in result:
        lines.append(f"4. Horovod-on-Spark, one core per process: 1 process {result['horovod_1_process_images_per_s']:.1f}"
                     f" images/s, 2 processes {result['horovod_2_processes_images_per_s']:.1f} images/s: "
                     f"scaling efficiency {result['horovod_scaling_efficiency']:.2f} (Horovod paper: about 0.90)")
    return "\n".join(lines)
