"""``make bench`` (scoring part): the Spark scoring job's rate against N x one process predicting in memory.

Measured side by side in one run on the same ``images_<size>`` dataset with the same model file, saved
as :mod:`cxr_spark.stages.train.job` saves one (``model.keras`` + ``model.json``), freshly initialised (scoring
speed does not depend on the weights):

1. the single-process limit: the images already decoded in memory as uint8, normalised with
   :func:`cxr_spark.stages.train.input_pipeline.model_inputs` and run through ``model.predict`` on one thread;
2. :func:`cxr_spark.stages.score.score` over every split, after a warm-up run (Python workers started,
   TensorFlow imported, the model loaded once per worker): images / wall time of the whole job;
3. the marginal rate: the extra images of scoring every split instead of the test split over the extra
   time, which leaves out the job's fixed cost (planning, writing, the manifest) that dominates small runs;
4. CPU seconds per image of the whole Spark job (driver, JVM, Python workers) against line 1's: wall
   times on a shared machine also measure everyone else's load, CPU times only our own work.

The three are interleaved, repeat by repeat, so that each sees the shared machine's load of the moment.
Goal: the Spark rate is at least 0.7 x (N x the single-process rate) with N task slots.
"""
from __future__ import annotations

import hashlib
import logging
import statistics
import time
from pathlib import Path

log = logging.getLogger(__name__)


def save_demo_model(spark, images_url: str, folder: Path) -> str:
    """A freshly initialised demo model for ``images_url``'s size in ``folder``, as train writes one."""
    from cxr_spark.config import load_config
    from cxr_spark.core.labels import LABELS
    from cxr_spark.core.normalization import normalization_spec
    from cxr_spark.datasets.images import NORMALIZATION_FILE
    from cxr_spark.datasets.model_card import MODEL_CARD, MODEL_FILE
    from cxr_spark.io.storage import read_json, to_url, write_json
    from cxr_spark.stages.train.models import build_model

    config = load_config().train
    url = to_url(images_url)
    size = read_json(spark, f"{url}/_manifest.json")["counts"]["size"]
    folder.mkdir(parents=True, exist_ok=True)
    build_model(config.model, size, len(LABELS), seed=config.seed).save(folder / MODEL_FILE)
    version = f"{config.model}-{hashlib.sha256((folder / MODEL_FILE).read_bytes()).hexdigest()[:12]}"
    normalization = normalization_spec(config.normalization, read_json(spark, f"{url}/{NORMALIZATION_FILE}"),
                                       config.equalize)
    write_json(spark, to_url(str(folder / MODEL_CARD)), {
        "model_version": version, "model": config.model, "task": "multilabel", "labels": list(LABELS),
        "input_size": size, "normalization": normalization, "thresholds": dict.fromkeys(LABELS, 0.5),
        "thresholds_tuned_on": None, "training": {"freshly_initialised_for": "make bench"}, "history": {},
        "dataset": {"url": url}})
    return version


_MODELS: dict[str, object] = {}  # in the child process: model path -> Keras model


def predict_seconds(model_path: str, images, normalization: dict, batch_size: int) -> tuple[float, float]:
    """In a fresh process on one thread: wall and CPU seconds to normalise and ``model.predict`` images in memory.

    The first call in the process loads the model and warms it up.
    """
    from benchmarks.bench_train import one_core_tensorflow
    from cxr_spark.core.normalization import model_inputs

    if model_path not in _MODELS:
        tf = one_core_tensorflow()
        _MODELS[model_path] = tf.keras.models.load_model(model_path, compile=False)
        _MODELS[model_path].predict(model_inputs(images[:batch_size], normalization), batch_size=batch_size,
                                    verbose=0)
    started, cpu = time.perf_counter(), time.process_time()
    _MODELS[model_path].predict(model_inputs(images, normalization), batch_size=batch_size, verbose=0)
    return time.perf_counter() - started, time.process_time() - cpu


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its descendants: the Spark JVM and its Python workers."""
    import psutil  # a requirement of Horovod's

    total = 0.0
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _images_in_memory(spark, url: str, size: int):
    """Every image of the dataset decoded to one uint8 (N, size, size) array in the driver."""
    import numpy as np

    from cxr_spark.datasets.fields import decode_column
    from cxr_spark.datasets.images import images_schema

    column = spark.read.parquet(url).select("image").toPandas()["image"]
    return np.stack(decode_column(images_schema(size), "image", column))


def run_scoring_bench(spark, images_url: str, work: Path, repeats: int, batch_size: int) -> dict:
    """The single-process limit, the Spark job's rate and its marginal rate, and their ratios."""
    from benchmarks.bench_train import fresh_process
    from cxr_spark.datasets.model_card import MODEL_CARD, MODEL_FILE
    from cxr_spark.io.storage import read_json, to_url
    from cxr_spark.stages.score import score

    url = to_url(images_url)
    model_dir = work / "bench_model"
    save_demo_model(spark, url, model_dir)
    card = read_json(spark, to_url(str(model_dir / MODEL_CARD)))
    images = _images_in_memory(spark, url, card["input_size"])

    def spark_seconds(split: str) -> tuple[float, float]:
        started, cpu = time.perf_counter(), _cpu_seconds()
        scored[split] = score(spark, url, str(model_dir), str(work / f"bench_predictions_{split}"), split,
                              batch_size)["scored"]
        return time.perf_counter() - started, _cpu_seconds() - cpu

    log.info("bench: model.predict in one process over %d images in memory, and Spark scoring of every split and "
             "of the test split, interleaved", len(images))
    scored, runs = {}, {"predict": [], "all": [], "test": []}
    with fresh_process() as pool:
        def predict() -> tuple[float, float]:
            return pool.apply(predict_seconds, (str(model_dir / MODEL_FILE), images, card["normalization"],
                                                batch_size))

        predict()  # warm-up: TensorFlow, the model
        spark_seconds("all")  # warm-up: Python workers, TensorFlow, the model loaded once per worker
        for _ in range(repeats):  # side by side: each repeat sees the machine's load at that moment
            runs["predict"].append(predict())
            runs["all"].append(spark_seconds("all"))
            runs["test"].append(spark_seconds("test"))
    (t_predict, cpu_predict), (t_all, cpu_all), (t_test, cpu_test) = (
        tuple(statistics.median(column) for column in zip(*runs[key])) for key in ("predict", "all", "test"))
    single, n_all, n_test = len(images) / t_predict, scored["all"], scored["test"]
    slots = spark.sparkContext.defaultParallelism
    rate = n_all / t_all
    result = {"images": n_all, "test_images": n_test, "model": card["model"], "size": card["input_size"],
              "batch_size": batch_size, "spark_slots": slots, "single_process_predict_images_per_s": single,
              "spark_score_images_per_s": rate, "spark_score_seconds": t_all, "spark_score_test_seconds": t_test,
              "ratio_to_n_x_single": rate / (slots * single),
              "predict_cpu_ms_per_image": 1000 * cpu_predict / len(images),
              "spark_score_cpu_ms_per_image": 1000 * cpu_all / n_all,
              "cpu_efficiency": (cpu_predict / len(images)) / (cpu_all / n_all)}
    log.info("bench: batch-score of a 50-file dump into a new store, each run in a fresh session")
    result["batch_score"] = batch_score_seconds(model_dir, work, repeats)
    if n_all > n_test and t_all > t_test:
        marginal = (n_all - n_test) / (t_all - t_test)
        result.update(spark_marginal_images_per_s=marginal, marginal_ratio_to_n_x_single=marginal / (slots * single),
                      spark_fixed_seconds=t_all - n_all / marginal,
                      spark_marginal_cpu_ms_per_image=1000 * (cpu_all - cpu_test) / (n_all - n_test))
    return result


def batch_score_seconds(model_dir: Path, work: Path, repeats: int, n_files: int = 50) -> dict:
    """Wall seconds of :func:`cxr_spark.stages.batch_score.job.batch_score` on a dump of ``n_files`` synthetic
    1024x1024 PNGs into a store it has not seen, each run in a fresh process and Spark session, timed from
    the session's start (what a nightly run pays after ``spark-submit`` has started it), and the session's start;
    with the driver JVM's class-data archive (:mod:`cxr_spark.io.jvm_archive`; as every local session starts
    when ``make install`` made one) and without, interleaved; medians."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from cxr_spark.io.jvm_archive import SWITCH_ENV, java_options
    from cxr_spark.synth import SynthSpec, generate_or_reuse

    dump = work / f"batch_dump_{n_files}"
    generate_or_reuse(SynthSpec(out=str(dump), n_images=n_files, size=1024, seed=31))
    folder = next(path.parent for path in sorted(dump.rglob("*.png")))
    ways = {"": "1", "_without_archive": "0"} if java_options() else {"": "0"}
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way, switch in ways.items():
            store = work / "batch_store"
            shutil.rmtree(store, ignore_errors=True)
            done = subprocess.run([sys.executable, "-m", "benchmarks.bench_score", str(folder), str(model_dir),
                                   str(store)], check=True, capture_output=True, text=True,
                                  env={**os.environ, SWITCH_ENV: switch})
            runs[way].append(json.loads(done.stdout.strip().splitlines()[-1]))
            if runs[way][-1]["scored"] != n_files:
                raise RuntimeError(f"bench: batch-score scored {runs[way][-1]['scored']} of {n_files} files")
    result = {"files": n_files, "jvm_archive": bool(java_options())}
    for way, done_runs in runs.items():
        result[f"seconds{way}"] = statistics.median(run["seconds"] for run in done_runs)
        result[f"session_start_seconds{way}"] = statistics.median(run["session_start_seconds"] for run in done_runs)
    return result


def _batch_score_once(folder: str, model_dir: str, store: str) -> dict:
    """One batch-score in this fresh process: the session's start and the run after it, in seconds."""
    started = time.perf_counter()
    from cxr_spark.io.session import build_session
    from cxr_spark.stages.batch_score.job import batch_score

    spark = build_session("cxr-spark bench (batch-score)")
    session = time.perf_counter()
    summary = batch_score(spark, folder, model_dir, store)
    done = time.perf_counter()
    spark.stop()
    return {"session_start_seconds": session - started, "seconds": done - session, "scored": summary["scored"]}


def format_scoring_report(result: dict) -> str:
    slots = result["spark_slots"]
    lines = [f"Scoring benchmark: {result['model']} at {result['size']}px, {result['images']} images, batch "
             f"{result['batch_size']}, {slots} Spark slots, medians",
             f"1. single-process model.predict, images in memory, one thread: "
             f"{result['single_process_predict_images_per_s']:.1f} images/s",
             f"2. Spark score(), whole job (images / wall time, {result['spark_score_seconds']:.1f} s): "
             f"{result['spark_score_images_per_s']:.1f} images/s = {result['ratio_to_n_x_single']:.2f} x "
             f"(N x line 1) with N = {slots}  (goal >= 0.90)"]
    if "spark_marginal_images_per_s" in result:
        lines.append(f"3. Spark score(), marginal (all {result['images']} vs test {result['test_images']} images, "
                     f"fixed cost {result['spark_fixed_seconds']:.1f} s a job): "
                     f"{result['spark_marginal_images_per_s']:.1f} images/s = "
                     f"{result['marginal_ratio_to_n_x_single']:.2f} x (N x line 1)")
    else:
        lines.append("3. Spark score(), marginal: not measurable (scoring every split was not slower than the test "
                     "split)")
    marginal_cpu = ""
    if "spark_marginal_cpu_ms_per_image" in result:
        marginal_cpu = (f" (marginal {result['spark_marginal_cpu_ms_per_image']:.1f} ms: "
                        f"{result['predict_cpu_ms_per_image'] / result['spark_marginal_cpu_ms_per_image']:.2f})")
    lines.append(f"4. CPU time per image (others' load does not slow it): model.predict "
                 f"{result['predict_cpu_ms_per_image']:.1f} ms; Spark job (driver, JVM, Python workers) "
                 f"{result['spark_score_cpu_ms_per_image']:.1f} ms: CPU efficiency {result['cpu_efficiency']:.2f}"
                 f"{marginal_cpu}")
    batch = result["batch_score"]
    lines.append(f"5. batch-score of a {batch['files']}-file dump (1024 px PNGs) into a new store, in a fresh process: "
                 f"{batch['seconds']:.1f} s after the Spark session started ({batch['session_start_seconds']:.1f} s)  "
                 f"(goal < 10 s)")
    if "seconds_without_archive" in batch:
        lines.append(f"   without the driver JVM's class-data archive: {batch['seconds_without_archive']:.1f} s after the "
                     f"session started ({batch['session_start_seconds_without_archive']:.1f} s)")
    else:
        lines.append("   (no class-data archive for this JVM and Spark: `python -m cxr_spark.make_jvm_archive` makes one)")
    return "\n".join(lines)


if __name__ == "__main__":  # one timed batch-score (batch_score_seconds runs it in a fresh process)
    import json
    import sys
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    print(json.dumps(_batch_score_once(*sys.argv[1:4])))
