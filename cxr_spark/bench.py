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


def decoder_rates(paths: list[Path], size: int, repeats: int) -> dict[str, float]:
    """Single-process decode + resize rates (images/s on one core) of the candidate paths."""
    blobs = [p.read_bytes() for p in paths]

    def opencv_area():
        for data in blobs:
            resize_square(decode_grayscale(data), size)

    def opencv_reduced():
        for data in blobs:  # decode at 1/4 scale (exact divisor of 1024), then area-resize the rest
            image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_4)
            resize_square(image, size)

    def pillow_reduce():
        import io

        for data in blobs:
            with Image.open(io.BytesIO(data)) as image:
                image.convert("L").reduce(4).resize((size, size), Image.BOX)

    return {name: _median_rate(fn, len(blobs), repeats)
            for name, fn in (("opencv imdecode + INTER_AREA (ours)", opencv_area),
                             ("opencv IMREAD_REDUCED_GRAYSCALE_4 + INTER_AREA", opencv_reduced),
                             ("pillow decode + reduce(4) + BOX", pillow_reduce))}


def spark_rates(dump: Path, work: Path, size: int, repeats: int) -> dict[str, float]:
    """Ours (ingest + preprocess), and Spark's built-in image source doing the same resize, in images/s."""
    import pandas as pd

    from cxr_spark.config import load_config, override
    from cxr_spark.ingest import ingest
    from cxr_spark.preprocess import preprocess
    from cxr_spark.session import build_session

    config = load_config()
    spark = build_session("cxr-spark bench")
    n_images = len(list(dump.rglob("*.png")))
    try:
        def ours():
            ingest(spark, str(dump), str(work / "raw"), str(dump / "Data_Entry_2017.csv"), str(dump), config.ingest)
            preprocess(spark, str(work / "raw"), str(work / "images"), override(config.preprocess, size=size))

        def image_source():
            def resize(batches):
                for frame in batches:
                    out = []
                    for data, height, width in zip(frame["data"], frame["height"], frame["width"]):
                        pixels = np.frombuffer(data, np.uint8).reshape(height, width, -1)[..., 0]
                        out.append(cv2.imencode(".png", resize_square(pixels, size))[1].tobytes())
                    yield pd.DataFrame({"image": out})

            (spark.read.format("image").option("dropInvalid", True).option("recursiveFileLookup", "true")
             .load(str(dump)).select("image.data", "image.height", "image.width")
             .mapInPandas(resize, "image binary").write.mode("overwrite").parquet(str(work / "image_source")))

        ours()  # warm-up: JVM, Python workers, page cache
        result = {"ours": _median_rate(ours, n_images, repeats)}
        result["spark image source"] = _median_rate(image_source, n_images, repeats)
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
    log.info("bench: %d PNGs of 1024x1024 in %s", len(paths), dump)
    try:
        decoders = decoder_rates(paths, size, repeats)
        spark = spark_rates(dump, base / "work", size, repeats)
        keras = keras_flow_rate(dump, size, repeats)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    limit = decoders["opencv imdecode + INTER_AREA (ours)"]
    slots = spark["slots"]
    return {
        "images": len(paths), "size": size, "repeats": repeats, "cores": os.cpu_count(), "spark_slots": slots,
        "single_process_rates": decoders,
        "limit_images_per_s_per_core": limit,
        "spark_ingest_preprocess_images_per_s": spark["ours"],
        "ratio_to_n_x_limit": spark["ours"] / (slots * limit),
        "spark_image_source_ratio_to_ours": spark["spark image source"] / spark["ours"],
        "keras_flow_from_directory_ratio_to_ours": keras / spark["ours"],
        "projected_full_nih_hours_per_core": NIH_IMAGES / (spark["ours"] / slots) / 3600,
    }


def format_report(result: dict) -> str:
    lines = [f"Ingest + preprocess benchmark: {result['images']} synthetic 1024x1024 PNGs -> {result['size']}px, "
             f"median of {result['repeats']} runs, {result['spark_slots']} Spark slots on {result['cores']} cores", "",
             "1. single-process decode + resize (images/s on one core):"]
    lines += [f"     {rate:8.1f}  {name}" for name, rate in result["single_process_rates"].items()]
    lines += [
        f"2. Spark ingest + preprocess: {result['spark_ingest_preprocess_images_per_s']:.1f} images/s = "
        f"{result['ratio_to_n_x_limit']:.2f} x (N x limit) with N = {result['spark_slots']}  (goal >= 0.80)",
        f"3. Spark image source + same resize: {result['spark_image_source_ratio_to_ours']:.2f} x ours; "
        f"Keras flow_from_directory: {result['keras_flow_from_directory_ratio_to_ours']:.2f} x ours",
        f"4. projected for all {NIH_IMAGES:,} NIH images: {result['projected_full_nih_hours_per_core']:.2f} hours per core",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxr_spark.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=200, help="synthetic 1024x1024 PNGs (default 200)")
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
