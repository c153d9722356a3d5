"""``make bench``: ingest + preprocess throughput against the PNG-decoding limit, measured side by side.

Everything is measured in one run on the same synthetic 1024×1024 PNGs; repeated measurements are
summarised by their median, and goals are stated as ratios, never as absolute times (machines here
are shared and noisy).
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
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from cxr_spark.images import decode_grayscale, resize_square

log = logging.getLogger(__name__)
NIH_IMAGES = 112_120


def _median_rate(work, n_images: int, repeats: int) -> float:
    """Images per second of ``work()`` over ``n_images``: the median of ``repeats`` timed runs."""
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        rates.append(n_images / (time.perf_counter() - started))
    return statistics.median(rates)


OURS = "opencv imdecode + resize_square: 4x4 box, then area (ours)"


def decoder_rates(paths: list[Path], size: int, repeats: int) -> dict[str, float]:
    """Single-process decode + resize rates (images/s on one core) of the candidate paths, interleaved
    so that every candidate sees the same load, and how far each one's pixels are from one INTER_AREA
    step. imagecodecs (not a dependency) is measured when installed."""
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
        OURS: candidate(decode_grayscale, ours),
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
    names = list(candidates)
    for name in names:  # warm-up: without it the first candidate timed ran ~10% slower
        candidates[name]()
    seconds = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:  # each run in another order
            started = time.perf_counter()
            candidates[name]()
            seconds[name].append(time.perf_counter() - started)
    # The same work? Mean |difference| from one INTER_AREA step, in gray levels, on the first 10 images.
    reference = [np.asarray(image, np.int16) for image in candidates["opencv imdecode + one INTER_AREA step"](blobs[:10])]
    differences = {name: float(np.mean([np.abs(np.asarray(image, np.int16) - expected).mean() for image, expected
                                        in zip(candidates[name](blobs[:10]), reference)])) for name in names}
    return {name: {"images_per_s": len(blobs) / statistics.median(seconds[name]), "mean_abs_diff": differences[name]}
            for name in names}


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


def spark_rates(dumps: dict[str, Path], work: Path, size: int, repeats: int) -> dict:
    """Ours (ingest + preprocess) timed on a small and a full dump, interleaved, and Spark's built-in
    image source doing the same resize on the full one. Returns median seconds per stage and dump."""
    import pandas as pd

    from cxr_spark.config import load_config, override
    from cxr_spark.ingest import ingest
    from cxr_spark.preprocess import preprocess
    from cxr_spark.session import build_session

    config = load_config()
    spark = build_session("cxr-spark bench")
    try:
        def ours(dump: Path) -> tuple[float, float]:
            started = time.perf_counter()
            ingest(spark, str(dump), str(work / "raw"), str(dump / "Data_Entry_2017.csv"), str(dump), config.ingest)
            ingested = time.perf_counter()
            preprocess(spark, str(work / "raw"), str(work / "images"), override(config.preprocess, size=size))
            return ingested - started, time.perf_counter() - ingested

        def image_source():
            def resize(batches):
                for frame in batches:
                    out = []
                    for data, height, width in zip(frame["data"], frame["height"], frame["width"]):
                        pixels = np.frombuffer(data, np.uint8).reshape(height, width, -1)[..., 0]
                        out.append(cv2.imencode(".png", resize_square(pixels, size))[1].tobytes())
                    yield pd.DataFrame({"image": out})

            (spark.read.format("image").option("dropInvalid", True).option("recursiveFileLookup", "true")
             .load(str(dumps["full"])).select("image.data", "image.height", "image.width")
             .mapInPandas(resize, "image binary").write.mode("overwrite").parquet(str(work / "image_source")))

        ours(dumps["full"])  # warm-up: JVM, Python workers, page cache
        times = {name: {"ingest": [], "preprocess": []} for name in dumps}
        for _ in range(repeats):
            for name, dump in dumps.items():
                ingest_s, preprocess_s = ours(dump)
                times[name]["ingest"].append(ingest_s)
                times[name]["preprocess"].append(preprocess_s)
        result = {name: {stage: statistics.median(values) for stage, values in stages.items()}
                  for name, stages in times.items()}
        for name in times:
            result[name]["total"] = statistics.median(
                [a + b for a, b in zip(times[name]["ingest"], times[name]["preprocess"])])
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


def run(n_images: int, size: int, repeats: int, keep: str | None) -> dict:
    from cxr_spark.synth import SynthSpec, generate

    base = Path(keep or tempfile.mkdtemp(prefix="cxr-bench-"))
    dump = base / "dump"
    if not (dump / "Data_Entry_2017.csv").exists():
        generate(SynthSpec(out=str(dump), n_images=n_images, size=1024, seed=11))
    paths = sorted(dump.rglob("*.png"))
    n_small = max(1, len(paths) // 4)
    dumps = {"small": subset_dump(dump, base / f"dump_first_{n_small}", n_small), "full": dump}
    log.info("bench: %d PNGs of 1024x1024 in %s (and the first %d of them)", len(paths), dump, n_small)
    try:
        decoders = decoder_rates(paths, size, repeats)
        spark = spark_rates(dumps, base / "work", size, repeats)
        keras = keras_flow_rate(dump, size, repeats)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    limit = max(decoder["images_per_s"] for decoder in decoders.values())
    slots = spark["slots"]
    n_full = len(paths)
    # Marginal: the cost of more images once the fixed per-run cost (Spark jobs, listing, Petastorm metadata,
    # manifests, renames) is paid; what a full-size run approaches.
    marginal = {stage: (n_full - n_small) / (spark["full"][stage] - spark["small"][stage])
                for stage in ("ingest", "preprocess", "total")}
    plain = n_full / spark["full"]["total"]
    return {
        "images": n_full, "small_images": n_small, "size": size, "repeats": repeats, "cores": os.cpu_count(),
        "spark_slots": slots,
        "single_process_rates": decoders, "ours": OURS,
        "limit_images_per_s_per_core": limit,
        "spark_seconds": {name: spark[name] for name in ("small", "full")},
        "spark_marginal_images_per_s": marginal,
        "marginal_ratio_to_n_x_limit": marginal["total"] / (slots * limit),
        "spark_plain_images_per_s": plain,
        "plain_ratio_to_n_x_limit": plain / (slots * limit),
        "fixed_seconds_per_run": spark["full"]["total"] - n_full / marginal["total"],
        "spark_image_source_ratio_to_ours": (n_full / spark["spark image source"]) / plain,
        "keras_flow_from_directory_ratio_to_ours": keras / plain,
        "projected_full_nih_hours_per_core": NIH_IMAGES / (marginal["total"] / slots) / 3600,
    }


def format_report(result: dict) -> str:
    seconds, marginal = result["spark_seconds"], result["spark_marginal_images_per_s"]
    n, small, slots = result["images"], result["small_images"], result["spark_slots"]
    lines = [f"Ingest + preprocess benchmark: {n} synthetic 1024x1024 PNGs -> {result['size']}px, "
             f"median of {result['repeats']} runs, {slots} Spark slots on {result['cores']} cores", "",
             "1. single-process decode + resize (images/s on one core):"]
    lines += [f"     {rate['images_per_s']:8.1f}  {name}  (mean |diff| from one INTER_AREA step: "
              f"{rate['mean_abs_diff']:.2f} gray levels)" for name, rate in result["single_process_rates"].items()]
    lines += [
        f"   limit = the fastest: {result['limit_images_per_s_per_core']:.1f} images/s per core",
        f"2. Spark ingest + preprocess, local[{slots}] (N = {slots}):",
        f"     marginal: {marginal['total']:.1f} images/s = {result['marginal_ratio_to_n_x_limit']:.2f} x (N x limit)  "
        f"(goal >= 0.80)  [({n} - {small}) images / (time for {n} - time for {small})]",
        f"       ingest {1000 / marginal['ingest']:.1f} ms + preprocess {1000 / marginal['preprocess']:.1f} ms "
        f"per image on {slots} slots",
        f"     plain: {result['spark_plain_images_per_s']:.1f} images/s = {result['plain_ratio_to_n_x_limit']:.2f} x "
        f"(N x limit)  [{n} images in {seconds['full']['total']:.1f} s: ingest {seconds['full']['ingest']:.1f} s + "
        f"preprocess {seconds['full']['preprocess']:.1f} s, of which ~{result['fixed_seconds_per_run']:.1f} s "
        f"fixed per run]",
        f"3. Spark image source + same resize: {result['spark_image_source_ratio_to_ours']:.2f} x ours; "
        f"Keras flow_from_directory: {result['keras_flow_from_directory_ratio_to_ours']:.2f} x ours  (plain rates)",
        f"4. projected for all {NIH_IMAGES:,} NIH images at the marginal rate: "
        f"{result['projected_full_nih_hours_per_core']:.2f} hours per core",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_spark.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=400,
                        help="synthetic 1024x1024 PNGs (default 400); the marginal rate also times the first quarter")
    parser.add_argument("--size", type=int, default=224, help="resize target (default 224)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the median is shown")
    parser.add_argument("--keep", help="keep the images and outputs in this folder (reused on the next run)")
    parser.add_argument("--json", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    result = run(args.n_images, args.size, args.repeats, args.keep)
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
