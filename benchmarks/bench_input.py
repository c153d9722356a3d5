"""``make bench`` (input part): how fast one Horovod rank's input pipeline delivers training batches with
C = 1 and C = 2 input worker processes, at 128 and 224 px, measured side by side in one run.

The pipeline is the training epoch itself (:func:`cxr_spark.stages.train.input_pipeline.iterate_epoch`):
the rank's row groups read and PNG-decoded, each image augmented with conf's [train] ranges, shuffled
and normalised into full batches. C = 1 does it all in the measuring process, on one core; C = 2 has two
spawned workers decode and augment while the measuring process batches and normalises. Each measurement
reads whole epochs (at least ``min_images``), C = 1 and C = 2 interleaved repeat by repeat; medians.

Figures: the rate per core (C = 1, images/s) and the scaling ``rate(C = 2) / (2 x rate(C = 1))``; goals
>= 1,000 images/s per core at 224 px and scaling >= 0.8. On a machine with 2 cores, C = 2's measuring
process shares them with its two workers, so the scaling there is a lower bound.
"""
from __future__ import annotations

import logging
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)
WORKERS = (1, 2)


def images_at(spark, raw: str, base: Path, size: int) -> str:
    """``images_<size>`` preprocessed from the bench's ``raw`` dataset (reused when made from the same rows)."""
    import json

    from cxr_spark.config import load_config, override
    from cxr_spark.stages.preprocess import preprocess

    out = base / f"images_{size}"
    manifest, raw_manifest = out / "_manifest.json", Path(raw) / "_manifest.json"
    if manifest.exists() and json.loads(manifest.read_text())["counts"]["raw_rows"] == \
            json.loads(raw_manifest.read_text())["counts"]["ingested"]:
        return str(out)
    preprocess(spark, raw, str(out), override(load_config().preprocess, size=size))
    return str(out)


def epoch_rates(url: str, settings: dict) -> dict[int, float]:
    """In a fresh process: images/s of whole training epochs with each of :data:`WORKERS` (medians)."""
    import cv2

    from cxr_spark.stages.train.input_pipeline import Augmentation, InputWorkers, iterate_epoch

    cv2.setNumThreads(1)
    augmentation = Augmentation(**settings["augmentation"])
    epochs = max(1, math.ceil(settings["min_images"] / settings["n_train"]))
    pools = {count: InputWorkers(count) for count in WORKERS}
    rates: dict[int, list[float]] = {count: [] for count in WORKERS}
    try:
        for repeat in range(settings["repeats"] + 1):  # the first round: page cache, imports, workers' imports
            for count, workers in pools.items():
                started, n = time.perf_counter(), 0
                for epoch in range(epochs):
                    for inputs, _ in iterate_epoch(url, "train", None, None, settings["batch_size"], None,
                                                   repeat * epochs + epoch, augmentation, settings["normalization"],
                                                   shuffle_buffer=settings["shuffle_buffer"], workers=workers):
                        n += len(inputs)
                if repeat:
                    rates[count].append(n / (time.perf_counter() - started))
    finally:
        for workers in pools.values():
            workers.close()
    return {count: statistics.median(values) for count, values in rates.items()}


def run_input_bench(spark, raw: str, base: Path, sizes: tuple[int, ...], repeats: int,
                    min_images: int = 2000) -> dict:
    """The rates per rank at each of ``sizes`` with C = 1 and 2, and the scaling."""
    from cxr_spark.config import load_config
    from cxr_spark.core.normalization import normalization_spec
    from cxr_spark.datasets.images import NORMALIZATION_FILE
    from cxr_spark.io.storage import read_json, to_url

    config = load_config().train
    result = {"workers": list(WORKERS), "repeats": repeats, "by_size": {}}
    for size in sizes:
        url = to_url(images_at(spark, raw, base, size))
        counts = read_json(spark, f"{url}/_manifest.json")["counts"]
        settings = {
            "batch_size": config.batch_size, "shuffle_buffer": config.shuffle_buffer, "repeats": repeats,
            "n_train": counts["splits"]["train"], "min_images": min_images,
            "normalization": normalization_spec(config.normalization, read_json(spark, f"{url}/{NORMALIZATION_FILE}"),
                                                config.equalize),
            "augmentation": {"enabled": config.augment, "rotation_deg": config.rotation_deg,
                             "shift_x": config.shift_x, "shift_y": config.shift_y, "shear_deg": config.shear_deg,
                             "zoom": config.zoom, "horizontal_flip": config.horizontal_flip,
                             "fill_mode": config.fill_mode},
        }
        log.info("bench: one rank's input pipeline at %dpx with %s input workers", size,
                 " and ".join(map(str, WORKERS)))
        # a fresh process of its own, not a daemonic pool worker: it starts the input workers
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            rates = pool.submit(epoch_rates, url, settings).result()
        result["by_size"][size] = {"train_images": settings["n_train"], "images_per_s": rates,
                                   "rate_per_core": rates[1], "scaling_c2": rates[2] / (2 * rates[1])}
    return result


def format_input_report(result: dict) -> str:
    lines = [f"Input benchmark: one Horovod rank's training batches (read, decode, augment, shuffle, normalise), "
             f"C input worker processes, whole epochs, median of {result['repeats']}"]
    for size, figures in result["by_size"].items():
        rates = figures["images_per_s"]
        lines.append(f"   {size}px: C=1 {rates[1]:.1f} images/s (per core; goal at 224px >= 1000), C=2 {rates[2]:.1f} "
                     f"images/s: scaling C=2 / (2 x C=1) = {figures['scaling_c2']:.2f} (goal >= 0.80)")
    return "\n".join(lines)
