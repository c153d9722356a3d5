"""A batch run's drift record: its histograms (probabilities per finding, the per-image mean intensity of the
model input) counted by Spark, compared on the driver with the model's val-split reference in ``model.json``
(``drift_reference``, written by train) by :mod:`cxr_spark.core.drift`. The record goes into
``_runs/<run_id>.json`` as ``drift``; the formula, floor and threshold are in docs/batch-score.md.
"""
from __future__ import annotations

import logging

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from cxr_spark.core.drift import DRIFT_THRESHOLD, INPUT, PSI_FLOOR, drift_summary
from cxr_spark.core.histograms import BINS, INTENSITY_RANGE, PROBABILITY_RANGE
from cxr_spark.datasets.predictions import bin_column

log = logging.getLogger("cxr_spark.stages.batch_score.job")  # the stage's messages, wherever they are made

NO_REFERENCE = "no reference"
NOTHING_SCORED = "nothing scored"


def run_histograms(scored: DataFrame, labels: list[str]) -> tuple[dict[str, list[int]], list[int]]:
    """Counts per bin of each finding's probability and of ``input_intensity`` over the rows of ``scored``
    (grouped by Spark: at most ``BINS`` rows per finding reach the driver)."""
    probability_bin = bin_column(F.col("p"), *PROBABILITY_RANGE).alias("bin")
    by_finding = (scored.select(F.posexplode("probabilities").alias("label", "p"))
                  .groupBy("label", probability_bin).count().collect())
    probabilities = {label: [0] * BINS for label in labels}
    for row in by_finding:
        probabilities[labels[row["label"]]][row["bin"]] = int(row["count"])
    intensity = [0] * BINS
    for row in scored.groupBy(bin_column(F.col("input_intensity"), *INTENSITY_RANGE).alias("bin")).count().collect():
        intensity[row["bin"]] = int(row["count"])
    return probabilities, intensity


def usable_reference(card: dict) -> tuple[dict | None, str | None]:
    """The card's ``drift_reference`` when a run can be compared with it, else None and why."""
    reference = card.get("drift_reference")
    if not isinstance(reference, dict):
        return None, "model.json has no drift_reference (the model was trained before drift monitoring)"
    try:
        sizes = {len(reference["input_intensity"])} | {len(c) for c in reference["probabilities"].values()}
        images = sum(reference["input_intensity"])
    except (KeyError, TypeError, AttributeError) as error:
        return None, f"model.json's drift_reference lacks {error} (needs probabilities and input_intensity)"
    if sizes != {BINS} or reference.get("bins", BINS) != BINS:
        return None, f"model.json's drift_reference has {sorted(sizes)} bins; batch-score bins by {BINS}"
    if images <= 0:
        return None, "model.json's drift_reference counts no image"
    return reference, None


def _not_measured(status: str, reason: str) -> dict:
    return {"status": status, "reason": reason, "psi": None, "input_psi": None, "threshold": DRIFT_THRESHOLD,
            "drifted": [], "floor": PSI_FLOOR}


def drift_record(card: dict, scored: DataFrame | None, labels: list[str], run_id: str,
                 fail_on_drift: bool = False) -> dict:
    """The run's ``drift``: PSI per finding and of the input against the reference, the threshold and what
    drifted (logged as a warning); or, with a ``status`` and a ``reason``, why nothing was measured (the model
    has no reference, no image was scored: ``scored`` is None). Never raises for a missing reference."""
    reference, why = usable_reference(card)
    if reference is None:
        unchecked = ", so --fail-on-drift cannot fail it" if fail_on_drift else ""
        (log.warning if fail_on_drift else log.info)("batch-score run %s: no drift measured%s: %s", run_id,
                                                     unchecked, why)
        return _not_measured(NO_REFERENCE, why)
    if scored is None:
        return _not_measured(NOTHING_SCORED, "no image was scored in this run")
    probabilities, intensity = run_histograms(scored, labels)
    record = {**drift_summary(reference, probabilities, intensity),
              "histograms": {"probabilities": probabilities, "input_intensity": intensity}}
    if (card.get("normalization") or {}).get("equalize"):
        # equalisation gives every film a mean near 128: the input's intensity cannot show drift
        record.update(input_psi=None, drifted=[name for name in record["drifted"] if name != INPUT],
                      within_noise=[name for name in record["within_noise"] if name != INPUT],
                      input_not_measured="the model equalises histograms, so every film's mean intensity is "
                                         "about 128 whatever came in")
    if record["drifted"]:
        values = {**record["psi"], "input": record["input_psi"]}
        small = record["within_noise"]
        caveat = (f"; {', '.join(small)}: a PSI that two samples of the same films this small often give by chance "
                  "(more images decide)" if small else "")
        log.warning("batch-score run %s drifted from the model's validation split: %s (PSI over %s)%s", run_id,
                    ", ".join(f"{name} {values[name]:.3f}" for name in record["drifted"]), DRIFT_THRESHOLD, caveat)
    return record
