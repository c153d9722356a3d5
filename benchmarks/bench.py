"""``make bench``: ingest + preprocess throughput against the PNG-decoding limit, the training input
pipeline against the model's step rate and Horovod's scaling (:mod:`benchmarks.bench_train`), one rank's
input rate with 1 and 2 input workers (:mod:`benchmarks.bench_input`), and the Spark scoring job against
N x one process predicting in memory, with a 50-file batch-score (:mod:`benchmarks.bench_score`),
measured side by side; each stage's fixed cost (the intercept of time against images).

Everything is measured in one run: the ingest part on synthetic 1024×1024 PNGs, the training and
scoring parts on one ``images_<size>`` dataset of their own (synthetic films ingested and preprocessed
first, untimed). Repeated measurements are summarised by their median, and goals are stated as ratios,
never as absolute times (machines here are shared and noisy). ``--json`` writes the figures a program
compares (``ingest.plain_ratio``, ``input.scaling_c2_224``, ...; :func:`summary_figures`) and all the rest.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from cxr_spark.core.image_codec import decode_grayscale, decode_resized, encode_png, resize_square

log = logging.getLogger(__name__)
NIH_IMAGES = 112_120
PARTS = ("ingest", "train", "score")
MODEL_DUMP_SIZE = 256  # side of the synthetic films behind the training and scoring dataset
INPUT_SIZES = (128, 224)  # the input part: one rank's input pipeline at these sides
DECODER_IMAGES = 500  # files the single-process decoder rates are timed on


def _median_rate(work, n_images: int, repeats: int) -> float:
    """Images per second of ``work()`` over ``n_images``: the median of ``repeats`` timed runs."""
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        rates.append(n_images / (time.perf_counter() - started))
    return statistics.median(rates)


OURS = "opencv imdecode at half size (its 2x2 box) + resize_square: 2x2 box, then area (ours)"


ONE_PASS_WORK = ("one pass's own work on each file (read into raw's Parquet writer, checks, SHA-256, decode + "
                 "resize, PNG encode, raw row and images row kept: ingest.index_and_keep)")


def one_pass_work(size: int, folder: Path):
    """Pass 1's work on each file in this process, as one Spark task of ``ingest --images-out`` does it
    (:func:`~cxr_spark.stages.ingest.pass1.index_and_keep` of each file into one raw Parquet file in ``folder`` and one
    images_<size> file in its ``split=train`` folder), without Spark: decoding plus everything the pipeline
    must do to each file besides. Returns a function of a list of paths."""
    from cxr_spark.config import load_config
    from cxr_spark.core.labels import NUM_LABELS
    from cxr_spark.datasets.fields import encode_column
    from cxr_spark.datasets.raw import RawSchema
    from cxr_spark.io.parquet_parts import ParquetPartWriter, PartitionedPartWriter
    from cxr_spark.stages.ingest.pass1 import images_part_schema, index_and_keep, raw_arrow_schema

    config = load_config()
    labels = encode_column(RawSchema, "labels", [np.zeros(NUM_LABELS, np.uint8)])[0]
    folder.mkdir(parents=True, exist_ok=True)

    def work(some: list[Path]) -> None:
        with ParquetPartWriter(str(folder), "part.parquet", raw_arrow_schema(), image_column="png",
                               row_group_bytes=config.ingest.row_group_size_mb * 2**20) as writer, \
                PartitionedPartWriter(str(folder), "part.parquet", images_part_schema(size), column="split",
                                      image_column="image",
                                      row_group_bytes=config.preprocess.row_group_size_mb * 2**20) as image_writer:
            for path in some:  # the columns the plan gives a task (metadata, split, ...)
                index_and_keep(writer, str(path), size, {
                    "image_id": path.name, "patient_id": 1, "follow_up": 0, "age": 50, "sex": "M", "view": "PA",
                    "finding_labels": "No Finding", "labels": labels, "split": "train", "source_path": str(path)},
                    image_writer)

    return work


def decoder_rates(paths: list[Path], size: int, repeats: int, folder: Path) -> dict:
    """Single-process decode + resize rates (images/s on one core) of the candidate paths, interleaved
    so that every candidate sees the same load, and how far each one's pixels are from one INTER_AREA
    step; imagecodecs (not a dependency) is measured when installed. Timed with them: one pass's own
    work on each file (:func:`one_pass_work`, writing into ``folder``)."""
    import io

    blobs = [p.read_bytes() for p in paths]

    def candidate(decode, resize):
        return lambda some=blobs: [resize(decode(data)) for data in some]

    def opencv_one_area_step(image):
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)

    def opencv_reduced(data):  # decode at 1/4 scale (an exact divisor of 1024)
        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_4)

    def pillow_reduced(data):
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("L").reduce(4).resize((size, size), Image.BOX)

    def ours(image):
        return resize_square(image, size)

    candidates = {
        OURS: candidate(lambda data: decode_resized(data, size), lambda image: image),
        "opencv imdecode at full size + resize_square (the same pixels)": candidate(decode_grayscale, ours),
        "opencv imdecode + one INTER_AREA step": candidate(decode_grayscale, opencv_one_area_step),
        "opencv IMREAD_REDUCED_GRAYSCALE_4 + INTER_AREA": candidate(opencv_reduced, ours),
        "pillow decode + reduce(4) + BOX": candidate(pillow_reduced, lambda image: image),
    }
    try:
        import imagecodecs

        candidates["imagecodecs png_decode + resize_square (not installed by the project)"] = candidate(
            imagecodecs.png_decode, ours)
    except ImportError:
        pass
    work = one_pass_work(size, folder)
    timed = {**candidates, ONE_PASS_WORK: lambda: work(paths)}
    names = list(timed)
    for name in names:  # warm-up: without it the first candidate timed ran ~10% slower
        timed[name]()
    seconds = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:  # each run in another order
            started = time.perf_counter()
            timed[name]()
            seconds[name].append(time.perf_counter() - started)
    shutil.rmtree(folder)
    # The same work? Mean |difference| from one INTER_AREA step, in gray levels, on the first 10 images.
    reference = [np.asarray(image, np.int16) for image in candidates["opencv imdecode + one INTER_AREA step"](blobs[:10])]
    differences = {name: float(np.mean([np.abs(np.asarray(image, np.int16) - expected).mean() for image, expected
                                        in zip(candidates[name](blobs[:10]), reference)])) for name in candidates}
    rates = {name: len(blobs) / statistics.median(seconds[name]) for name in names}
    return {"decoders": {name: {"images_per_s": rates[name], "mean_abs_diff": differences[name]} for name in candidates},
            "one_pass_work_images_per_s": rates[ONE_PASS_WORK]}


def subset_dump(dump: Path, out: Path, n_images: int) -> Path:
    """The first ``n_images`` of a synthetic dump (hard links) with their metadata rows, for the marginal rate."""
    if (out / "Data_Entry_2017.csv").exists():
        return out
    header, *rows = (dump / "Data_Entry_2017.csv").read_text().splitlines(keepends=True)
    rows = rows[:n_images]
    names = {row.split(",", 1)[0] for row in rows}
    for path in dump.rglob("*.png"):
        if path.name in names:
            target = out / path.relative_to(dump)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    (out / "Data_Entry_2017.csv").write_text(header + "".join(rows))
    for lists in ("test_list.txt", "train_val_list.txt"):
        kept = [line for line in (dump / lists).read_text().splitlines(keepends=True) if line.strip() in names]
        (out / lists).write_text("".join(kept))
    return out


PATHS = ("one pass", "two stages")  # ingest --images-out; ingest, then preprocess


def spark_rates(dumps: dict[str, Path], work: Path, size: int, repeats: int) -> dict:
    """Both ways from a dump to ``images_<size>`` (``ingest --images-out``, and ingest then preprocess)
    timed on a small and a full dump, interleaved, and Spark's built-in image source doing the same
    resize on the full one. Returns median seconds per path, dump and stage."""
    import pandas as pd

    from cxr_spark.config import load_config, override
    from cxr_spark.io.session import build_session
    from cxr_spark.stages.ingest.job import ingest
    from cxr_spark.stages.preprocess import preprocess

    config = load_config()
    images_settings = override(config.preprocess, size=size)
    spark = build_session("cxr-spark bench")
    try:
        def one_pass(dump: Path) -> dict:
            started = time.perf_counter()
            ingest(spark, str(dump), str(work / "raw"), str(dump / "Data_Entry_2017.csv"), str(dump), config.ingest,
                   images_out=str(work / "images"), images_settings=images_settings)
            return {"total": time.perf_counter() - started}

        def two_stages(dump: Path) -> dict:
            started = time.perf_counter()
            ingest(spark, str(dump), str(work / "raw"), str(dump / "Data_Entry_2017.csv"), str(dump), config.ingest)
            ingested = time.perf_counter()
            preprocess(spark, str(work / "raw"), str(work / "images"), images_settings)
            done = time.perf_counter()
            return {"ingest": ingested - started, "preprocess": done - ingested, "total": done - started}

        def image_source():
            def resize_rows(batches):
                for frame in batches:
                    out = []
                    for data, height, width in zip(frame["data"], frame["height"], frame["width"]):
                        pixels = np.frombuffer(data, np.uint8).reshape(height, width, -1)[..., 0]
                        out.append(encode_png(resize_square(pixels, size)))  # stored as ours are
                    yield pd.DataFrame({"image": out})

            (spark.read.format("image").option("dropInvalid", True).option("recursiveFileLookup", "true")
             .load(str(dumps["full"])).select("image.data", "image.height", "image.width")
             .mapInPandas(resize_rows, "image binary").write.mode("overwrite").parquet(str(work / "image_source")))

        paths = {"one pass": one_pass, "two stages": two_stages}
        for path in paths.values():  # warm-up: JVM, Python workers, page cache
            path(dumps["full"])
        times = {path: {name: [] for name in dumps} for path in paths}
        for _ in range(repeats):
            for path, run_path in paths.items():
                for name, dump in dumps.items():
                    times[path][name].append(run_path(dump))
        result = {path: {name: {stage: statistics.median(run[stage] for run in runs) for stage in runs[0]}
                         for name, runs in by_dump.items()} for path, by_dump in times.items()}
        n_full = len(list(dumps["full"].rglob("*.png")))
        result["spark image source"] = n_full / _median_rate(image_source, n_full, repeats)
        result["slots"] = spark.sparkContext.defaultParallelism
        spark.catalog.clearCache()
        return result
    finally:
        spark.stop()


def keras_flow_rate(dump: Path, size: int, repeats: int) -> float:
    """The seed papers' input path: ``ImageDataGenerator.flow_from_directory`` over the PNGs."""
    from tensorflow.keras.preprocessing.image import ImageDataGenerator

    n_images = len(list(dump.rglob("*.png")))

    def flow():
        iterator = ImageDataGenerator(rescale=1 / 255).flow_from_directory(
            str(dump), target_size=(size, size), color_mode="grayscale", class_mode=None, batch_size=32,
            shuffle=False)
        for _ in range(len(iterator)):
            next(iterator)

    return _median_rate(flow, n_images, repeats)


def _synthetic_dump(dump: Path, n_images: int, size: int, seed: int) -> None:
    """Generate a synthetic NIH-style dump unless one of ``n_images`` is already there (``--keep`` reuses it)."""
    from cxr_spark.synth import SynthSpec, generate

    metadata = dump / "Data_Entry_2017.csv"
    if metadata.exists() and len(metadata.read_text().splitlines()) - 1 == n_images:
        return
    shutil.rmtree(dump, ignore_errors=True)
    generate(SynthSpec(out=str(dump), n_images=n_images, size=size, seed=seed))


def _load_average() -> float:
    """The machine's 1-minute load average: shared machines make every figure relative to it."""
    return os.getloadavg()[0]


def ingest_figures(base: Path, n_images: int, size: int, repeats: int) -> dict:
    """The ingest part: decoders, Spark ingest + preprocess, Spark's image source and Keras on 1024 px PNGs."""
    load_before = _load_average()
    dump = base / "dump"
    _synthetic_dump(dump, n_images, 1024, seed=11)
    paths = sorted(dump.rglob("*.png"))
    n_small = max(1, len(paths) // 4)
    dumps = {"small": subset_dump(dump, base / f"dump_first_{n_small}", n_small), "full": dump}
    log.info("bench: %d PNGs of 1024x1024 in %s (and the first %d of them)", len(paths), dump, n_small)
    # a rate per image: the first DECODER_IMAGES files are enough (all 2,000, five ways, took minutes)
    single = decoder_rates(paths[:DECODER_IMAGES], size, repeats, base / "one_pass_work")
    decoders, work = single["decoders"], single["one_pass_work_images_per_s"]
    spark = spark_rates(dumps, base / "work", size, repeats)
    keras = keras_flow_rate(dump, size, repeats)
    limit = max(decoder["images_per_s"] for decoder in decoders.values())
    slots = spark["slots"]
    n_full = len(paths)
    figures = {}
    for path in PATHS:
        seconds = spark[path]
        # Marginal: the cost of more images once the fixed per-run cost (Spark jobs, listing, Petastorm
        # metadata, manifests, renames) is paid; what a full-size run approaches.
        marginal = {stage: (n_full - n_small) / (seconds["full"][stage] - seconds["small"][stage])
                    for stage in seconds["full"]}
        plain = n_full / seconds["full"]["total"]
        figures[path] = {
            "seconds": seconds, "marginal_images_per_s": marginal,
            "marginal_ratio_to_n_x_limit": marginal["total"] / (slots * limit),
            "plain_images_per_s": plain, "plain_ratio_to_n_x_limit": plain / (slots * limit),
            "fixed_seconds_per_run": seconds["full"]["total"] - n_full / marginal["total"],
            # each stage's intercept of time against images
            "fixed_seconds_by_stage": {stage: seconds["full"][stage] - n_full / marginal[stage] for stage in marginal},
            "projected_full_nih_hours_per_core": NIH_IMAGES / (marginal["total"] / slots) / 3600,
        }
    ours = figures["one pass"]["plain_images_per_s"]
    return {
        "images": n_full, "small_images": n_small, "size": size, "repeats": repeats, "cores": os.cpu_count(),
        "spark_slots": slots,
        "single_process_rates": decoders, "ours": OURS,
        "limit_images_per_s_per_core": limit,
        "one_pass_work": ONE_PASS_WORK, "one_pass_work_images_per_s_per_core": work,
        "one_pass_work_ratio_to_limit": work / limit,
        # Spark's own efficiency: one pass's marginal rate against N processes doing its work on each file
        "one_pass_marginal_ratio_to_n_x_work": figures["one pass"]["marginal_images_per_s"]["total"] / (slots * work),
        "spark_paths": figures,
        "one_pass_ratio_to_two_stages": ours / figures["two stages"]["plain_images_per_s"],
        "spark_image_source_ratio_to_ours": (n_full / spark["spark image source"]) / ours,
        "keras_flow_from_directory_ratio_to_ours": keras / ours,
        "load_average_1min": [load_before, _load_average()],
    }


def model_dataset(spark, base: Path, n_images: int, size: int) -> str:
    """The training and scoring parts' ``images_<size>``: synthetic films ingested and preprocessed (untimed)."""
    from cxr_spark.config import load_config, override
    from cxr_spark.stages.ingest.job import ingest

    dump, work = base / "model_dump", base / "model_work"
    images = work / f"images_{size}"
    manifest = images / "_manifest.json"
    counts = json.loads(manifest.read_text())["counts"] if manifest.exists() else {}
    if (counts.get("images"), counts.get("size")) == (n_images, size):
        log.info("bench: reusing %s", images)
        return str(images)
    _synthetic_dump(dump, n_images, MODEL_DUMP_SIZE, seed=12)
    config = load_config()
    log.info("bench: ingesting and preprocessing %d synthetic films to %dpx for the training and scoring parts",
             n_images, size)
    ingest(spark, str(dump), str(work / "raw"), str(dump / "Data_Entry_2017.csv"), str(dump), config.ingest,
           images_out=str(images), images_settings=override(config.preprocess, size=size))
    return str(images)


def model_figures(base: Path, parts: set[str], n_images: int, size: int, steps: int, repeats: int,
                  score_batch_size: int) -> dict:
    """The training and scoring parts, in one Spark session, on one dataset."""
    from benchmarks.bench_input import run_input_bench
    from benchmarks.bench_score import run_scoring_bench
    from benchmarks.bench_train import run_training_bench
    from cxr_spark.io.session import build_session

    spark = build_session("cxr-spark bench (training, scoring)")
    try:
        images = model_dataset(spark, base, n_images, size)
        result = {}
        if "train" in parts:
            load_before = _load_average()
            result["training"] = run_training_bench(spark, images, steps, repeats)
            result["training"]["load_average_1min"] = [load_before, _load_average()]
            load_before = _load_average()
            result["input"] = run_input_bench(spark, str(base / "model_work" / "raw"), base / "model_work",
                                              INPUT_SIZES, repeats)
            result["input"]["load_average_1min"] = [load_before, _load_average()]
        if "score" in parts:
            load_before = _load_average()
            result["scoring"] = run_scoring_bench(spark, images, base / "model_work", repeats, score_batch_size)
            result["scoring"]["load_average_1min"] = [load_before, _load_average()]
        return result
    finally:
        spark.stop()


def run(n_images: int, size: int, repeats: int, keep: str | None, parts: set[str] = frozenset(PARTS),
        model_images: int = 1000, train_size: int = 128, train_steps: int = 10, score_batch_size: int = 64) -> dict:
    base = Path(keep).resolve() if keep else Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    result = {}
    try:
        if "ingest" in parts:
            result.update(ingest_figures(base, n_images, size, repeats))
        if parts & {"train", "score"}:
            result.update(model_figures(base, parts, model_images, train_size, train_steps, repeats,
                                        score_batch_size))
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    return result


def _load_line(load: list[float]) -> str:
    return f"   (1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end, on {os.cpu_count()} cores)"


def format_report(result: dict) -> str:
    from benchmarks.bench_input import format_input_report
    from benchmarks.bench_score import format_scoring_report
    from benchmarks.bench_train import format_training_report

    sections = []
    if "images" in result:
        n, small, slots = result["images"], result["small_images"], result["spark_slots"]
        lines = [f"Ingest + preprocess benchmark: {n} synthetic 1024x1024 PNGs -> {result['size']}px, "
                 f"median of {result['repeats']} runs, {slots} Spark slots on {result['cores']} cores", "",
                 f"1. single-process decode + resize (images/s on one core, the first {min(n, DECODER_IMAGES)} files):"]
        lines += [f"     {rate['images_per_s']:8.1f}  {name}  (mean |diff| from one INTER_AREA step: "
                  f"{rate['mean_abs_diff']:.2f} gray levels)" for name, rate in result["single_process_rates"].items()]
        lines += [f"   limit = the fastest: {result['limit_images_per_s_per_core']:.1f} images/s per core",
                  f"   beside them, {result['one_pass_work']}:",
                  f"     {result['one_pass_work_images_per_s_per_core']:8.1f}  = "
                  f"{result['one_pass_work_ratio_to_limit']:.2f} x limit: the most one pass could reach with no "
                  f"cost of its own in Spark",
                  f"2. Spark, dump -> images_{result['size']}, local[{slots}] (N = {slots}); goal >= 0.80 x (N x limit):"]
        for path, label in (("one pass", "ingest --images-out (one pass)"), ("two stages", "ingest, then preprocess")):
            fig = result["spark_paths"][path]
            seconds = fig["seconds"]["full"]
            split = (f": ingest {seconds['ingest']:.1f} s + preprocess {seconds['preprocess']:.1f} s"
                     if "ingest" in seconds else "")
            lines += [
                f"   {label}:",
                f"     marginal: {fig['marginal_images_per_s']['total']:.1f} images/s = "
                f"{fig['marginal_ratio_to_n_x_limit']:.2f} x (N x limit)"
                f"  [({n} - {small}) images / (time for {n} - time for {small})]",
                f"     plain: {fig['plain_images_per_s']:.1f} images/s = {fig['plain_ratio_to_n_x_limit']:.2f} x "
                f"(N x limit)  [{n} images in {seconds['total']:.1f} s{split}; "
                f"~{fig['fixed_seconds_per_run']:.1f} s fixed per run]",
            ]
        paths = result["spark_paths"]
        lines += [
            f"   one pass marginal / (N x one pass's own work in one process): "
            f"{result['one_pass_marginal_ratio_to_n_x_work']:.2f}  (what Spark itself costs)",
            f"   one pass / two stages (plain rates): {result['one_pass_ratio_to_two_stages']:.2f}",
            f"3. Spark image source + same resize: {result['spark_image_source_ratio_to_ours']:.2f} x ours; "
            f"Keras flow_from_directory: {result['keras_flow_from_directory_ratio_to_ours']:.2f} x ours  "
            f"(plain rates; ours = one pass)",
            f"4. projected for all {NIH_IMAGES:,} NIH images at the marginal rate: "
            f"{paths['one pass']['projected_full_nih_hours_per_core']:.2f} hours per core in one pass, "
            f"{paths['two stages']['projected_full_nih_hours_per_core']:.2f} in two stages",
            _load_line(result["load_average_1min"]),
        ]
        sections.append("\n".join(lines))
    if "training" in result:
        sections.append(format_training_report(result["training"]) + "\n" +
                        _load_line(result["training"]["load_average_1min"]))
    if "input" in result:
        sections.append(format_input_report(result["input"]) + "\n" + _load_line(result["input"]["load_average_1min"]))
    if "scoring" in result:
        sections.append(format_scoring_report(result["scoring"]) + "\n" +
                        _load_line(result["scoring"]["load_average_1min"]))
    summary = summary_figures(result)
    fixed = {key.split(".")[0]: value for key, value in summary.items() if key.endswith(".fixed_seconds")}
    if fixed:
        sections.append("Fixed cost per stage run (the intercept of time against images; goal <= 3 s each): " +
                        ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in fixed.items()))
    return "\n\n".join(sections)


def summary_figures(result: dict) -> dict:
    """The figures a program compares between runs (``bench.json``'s keys), those this run measured."""
    figures = {}
    if "images" in result:
        one_pass, two_stages = result["spark_paths"]["one pass"], result["spark_paths"]["two stages"]
        figures.update({
            "ingest.limit_per_core": result["limit_images_per_s_per_core"],
            "ingest.own_work_ratio": result["one_pass_work_ratio_to_limit"],
            "ingest.marginal_over_own_work": result["one_pass_marginal_ratio_to_n_x_work"],
            "ingest.plain_ratio": one_pass["plain_ratio_to_n_x_limit"],
            "ingest.fixed_seconds": one_pass["fixed_seconds_per_run"],
            "preprocess.fixed_seconds": two_stages["fixed_seconds_by_stage"]["preprocess"],
            "n_images": result["images"]})
    if "input" in result:
        by_size = result["input"]["by_size"]
        for size, sized in by_size.items():
            figures[f"input.rate_per_core_{size}"] = sized["rate_per_core"]
            figures[f"input.scaling_c2_{size}"] = sized["scaling_c2"]
    if "horovod_scaling_efficiency" in result.get("training", {}):
        figures["horovod.scaling"] = result["training"]["horovod_scaling_efficiency"]
    if "scoring" in result:
        scoring = result["scoring"]
        figures["score.whole_job_ratio"] = scoring["ratio_to_n_x_single"]
        if "spark_fixed_seconds" in scoring:
            figures["score.fixed_seconds"] = scoring["spark_fixed_seconds"]
        figures["batch_score.seconds_50_files"] = scoring["batch_score"]["seconds"]
    loads = [load for part in result.values() if isinstance(part, dict) for load in part.get("load_average_1min", [])]
    loads += result.get("load_average_1min", [])
    if loads:
        figures["load_average"] = statistics.mean(loads)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=2000,
                        help="synthetic 1024x1024 PNGs (default 2000); the marginal rate also times the first quarter")
    parser.add_argument("--size", type=int, default=224, help="resize target (default 224)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is shown")
    parser.add_argument("--skip", action="append", choices=PARTS, default=[],
                        help="leave out a part (repeatable): ingest, train (input pipeline, steps, Horovod scaling) "
                             "or score (Spark scoring vs model.predict)")
    parser.add_argument("--model-images", type=int, default=1000,
                        help="synthetic films in the training and scoring parts' dataset (default 1000)")
    parser.add_argument("--train-size", type=int, default=128,
                        help="image side of the training and scoring parts' dataset (default 128, the demo's)")
    parser.add_argument("--train-steps", type=int, default=10,
                        help="training steps per process in one measurement (default 10)")
    parser.add_argument("--score-batch-size", type=int,
                        help="images per model call when scoring (default from conf [score])")
    parser.add_argument("--keep", help="keep the images and outputs in this folder (reused on the next run)")
    parser.add_argument("--json", help="also write the figures as JSON here: the keys a program compares, and every "
                                       "figure under 'details'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:  # py4j's notes (some on the root logger) as Horovod's threads end
        handler.addFilter(lambda record: record.levelno >= logging.WARNING or "py4j" not in record.pathname)
    # petastorm 0.13.1's pyarrow deprecation warnings, in this process and every child
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from cxr_spark.config import load_config

    score_batch_size = args.score_batch_size or load_config().score.batch_size
    result = run(args.n_images, args.size, args.repeats, args.keep, set(PARTS) - set(args.skip), args.model_images,
                 args.train_size, args.train_steps, score_batch_size)
    print(format_report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**summary_figures(result), "details": result}, indent=2))
        log.info("bench: figures in %s", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
