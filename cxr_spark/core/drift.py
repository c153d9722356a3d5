"""Drift between a model's validation split and what a batch run scored: the population stability index (PSI)
of two histograms binned by :mod:`cxr_spark.core.histograms`, per finding (the probabilities) and for the
input (the per-image mean intensity as the model sees it, :func:`mean_intensity`).

``PSI = sum_i (o_i - r_i) * ln(o_i / r_i)`` over the bins, where ``r_i`` and ``o_i`` are the shares of the
reference's and the observed images in bin ``i``, each floored at :data:`PSI_FLOOR` (an empty bin would
make the logarithm infinite); the floored shares are not renormalised. 0 means the same distribution; the
usual reading is below 0.1 stable, 0.1-0.2 a moderate shift, above :data:`DRIFT_THRESHOLD` (0.2) drifted.
Pure numpy: the histograms come from Spark (batch-score) or numpy (train).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

PSI_FLOOR = 1e-4  # the share an empty bin counts as
DRIFT_THRESHOLD = 0.2  # a PSI above this is drifted
INPUT = "input"  # the name of the input's intensity in a drifted list, beside the findings


def mean_intensity(inputs: np.ndarray, normalization: Mapping) -> np.ndarray:
    """Each image's mean pixel on the 0-255 scale, recovered from the model's normalised input
    ``(x - mean) / std`` (so after resizing and any equalisation): ``mean(input) * std + mean``, in float64.

    >>> mean_intensity(np.full((2, 4, 4, 1), 0.5, np.float32), {"mean": 100.0, "std": 50.0}).tolist()
    [125.0, 125.0]
    """
    inputs = np.asarray(inputs)
    means = inputs.reshape(len(inputs), -1).mean(axis=1, dtype=np.float64)
    return means * float(normalization["std"]) + float(normalization["mean"])


def shares(counts: Sequence[int], floor: float = PSI_FLOOR) -> np.ndarray:
    """The share of each bin, floored at ``floor`` (not renormalised).

    >>> shares([3, 1, 0]).tolist()
    [0.75, 0.25, 0.0001]
    """
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    if total <= 0:
        raise ValueError(f"a histogram with no values has no shares: {counts.tolist()}")
    return np.maximum(counts / total, floor)


def psi(reference: Sequence[int], observed: Sequence[int], floor: float = PSI_FLOOR) -> float | None:
    """The population stability index of ``observed`` against ``reference`` (bin counts, the same bins);
    None when either has no values.

    >>> psi([50, 50], [50, 50])
    0.0
    >>> round(psi([50, 50], [90, 10]), 4)  # (0.9-0.5) ln(0.9/0.5) + (0.1-0.5) ln(0.1/0.5)
    0.8789
    """
    if len(reference) != len(observed):
        raise ValueError(f"histograms of different bins: {len(reference)} reference, {len(observed)} observed")
    if sum(reference) <= 0 or sum(observed) <= 0:
        return None
    r, o = shares(reference, floor), shares(observed, floor)
    return float(np.sum((o - r) * np.log(o / r)))


NOISE_DRAWS = 200  # pairs of samples drawn to estimate the PSI chance alone gives


def chance_psis(reference: Sequence[int], observed: Sequence[int], draws: int = NOISE_DRAWS,
                seed: int = 0) -> np.ndarray | None:
    """The PSIs of ``draws`` seeded pairs of multinomial samples of the reference's shares at the two sizes
    (floor included): what chance alone gives two samples of one and the same distribution. None when either
    histogram has no values."""
    n_reference, n_observed = int(sum(reference)), int(sum(observed))
    if n_reference <= 0 or n_observed <= 0:
        return None
    shares = np.asarray(reference, np.float64) / n_reference
    rng = np.random.default_rng(seed)
    return np.array([psi(rng.multinomial(n_reference, shares).tolist(), rng.multinomial(n_observed, shares).tolist())
                     for _ in range(draws)])


def sampling_noise(reference: Sequence[int], observed: Sequence[int], draws: int = NOISE_DRAWS,
                   seed: int = 0) -> float | None:
    """The PSI chance alone gives on average (the mean of :func:`chance_psis`). For well-filled bins it is close to
    ``(k - 1) (1/n_reference + 1/n_observed)``, ``k`` the bins filled; sparse bins add more (the floor).

    >>> round(sampling_noise([500, 500], [100, 0]), 2)  # about (2 - 1) * (1/1000 + 1/100)
    0.01
    """
    psis = chance_psis(reference, observed, draws, seed)
    return None if psis is None else float(psis.mean())


def within_chance(value: float | None, reference: Sequence[int], observed: Sequence[int]) -> bool:
    """Whether a PSI of ``value`` is one chance alone gives often: at or below the 95th percentile of
    :func:`chance_psis`.

    >>> within_chance(0.02, [40, 60], [4, 6]), within_chance(5.0, [40, 60], [10, 0])
    (True, False)
    """
    psis = chance_psis(reference, observed)
    return value is not None and psis is not None and value <= float(np.percentile(psis, 95))


def drifted(psi_per_finding: Mapping[str, float | None], input_psi: float | None,
            threshold: float = DRIFT_THRESHOLD) -> list[str]:
    """The findings (in the given order) whose PSI is over ``threshold``, then ``"input"`` if its PSI is.

    >>> drifted({"Effusion": 0.05, "Mass": 0.31}, 0.5)
    ['Mass', 'input']
    """
    over = [name for name, value in psi_per_finding.items() if value is not None and value > threshold]
    return over + ([INPUT] if input_psi is not None and input_psi > threshold else [])


def drift_summary(reference: Mapping, probabilities: Mapping[str, Sequence[int]], input_intensity: Sequence[int],
                  threshold: float = DRIFT_THRESHOLD) -> dict:
    """A run's drift record from the model's reference (``model.json``'s ``drift_reference``) and the run's
    own histograms: PSI per finding and of the input, the threshold and what drifted.

    A finding the reference lacks gets a PSI of None (it is not judged).

    >>> ref = {"bins": 2, "images": 4, "probabilities": {"Mass": [2, 2]}, "input_intensity": [4, 0]}
    >>> summary = drift_summary(ref, {"Mass": [2, 2]}, [0, 4])
    >>> summary["psi"], summary["drifted"]
    ({'Mass': 0.0}, ['input'])
    """
    psis = {name: (psi(reference["probabilities"][name], counts) if name in reference["probabilities"] else None)
            for name, counts in probabilities.items()}
    input_psi = psi(reference["input_intensity"], input_intensity)
    rounded = {name: _rounded(value) for name, value in psis.items()}
    histograms = {name: (reference["probabilities"][name], counts) for name, counts in probabilities.items()
                  if name in reference["probabilities"]}
    histograms[INPUT] = (reference["input_intensity"], input_intensity)
    noise = {name: _rounded(sampling_noise(*pair)) for name, pair in histograms.items()}
    values = {**psis, INPUT: input_psi}
    over = drifted(psis, input_psi, threshold)
    return {"status": "ok", "psi": rounded, "input_psi": _rounded(input_psi), "threshold": threshold,
            "drifted": over, "floor": PSI_FLOOR, "sampling_noise": noise,
            "within_noise": [name for name in over if within_chance(values[name], *histograms[name])],
            "reference_images": int(reference.get("images", sum(reference["input_intensity"]))),
            "images": int(sum(input_intensity))}


def _rounded(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 6)
