"""Equal-width histograms: the one binning rule of calibration (report) and drift (train, batch-score).

A value ``x`` of ``[low, high]`` falls in bin ``floor(bins * (x - low) / (high - low))``, the top edge
``high`` in the last bin, so the bins are ``[low, low + w), ..., [high - w, high]``; values outside are
clipped into the first or last bin. :func:`cxr_spark.datasets.predictions.bin_column` is the same rule as a
Spark expression.
"""
from __future__ import annotations

import numpy as np

BINS = 10  # calibration bins of the probability, drift bins of probabilities and intensity
PROBABILITY_RANGE = (0.0, 1.0)
INTENSITY_RANGE = (0.0, 255.0)  # the 0-255 scale of a uint8 film


def bin_index(values, low: float = 0.0, high: float = 1.0, bins: int = BINS) -> np.ndarray:
    """The bin of each value (int64), computed in float64.

    >>> bin_index([0.0, 0.09999, 0.1, 0.95, 1.0]).tolist()
    [0, 0, 1, 9, 9]
    """
    scaled = (np.asarray(values, np.float64) - low) * bins / (high - low)
    return np.clip(np.floor(scaled), 0, bins - 1).astype(np.int64)


def bin_edges(low: float = 0.0, high: float = 1.0, bins: int = BINS) -> list[tuple[float, float]]:
    """``(lower, upper)`` of each bin.

    >>> bin_edges(0, 255, 5)[1]
    (51.0, 102.0)
    """
    return [(low + (high - low) * i / bins, low + (high - low) * (i + 1) / bins) for i in range(bins)]


def histogram(values, low: float = 0.0, high: float = 1.0, bins: int = BINS) -> list[int]:
    """Counts per bin of :func:`bin_index`.

    >>> histogram([0.05, 0.15, 0.17, 1.0], bins=4)
    [3, 0, 0, 1]
    """
    return np.bincount(bin_index(values, low, high, bins), minlength=bins).astype(int).tolist()
