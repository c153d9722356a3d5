"""The one canonical label list, and parsing of NIH ``Finding Labels`` strings onto it.

Every dataset, model and report takes its label order from :data:`LABELS`; nothing else in the
project spells the findings out.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

#: Canonical order (Wang et al. 2017; CheXNet). ``No Finding`` is the all-zero vector.
LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NUM_LABELS = len(LABELS)
NO_FINDING = "No Finding"
_INDEX = {name: i for i, name in enumerate(LABELS)}
# Spellings used by other NIH files for the same finding (BBox_List_2017.csv says "Infiltrate").
_ALIASES = {"Infiltrate": "Infiltration", "Pleural Thickening": "Pleural_Thickening"}


class UnknownFindingError(ValueError):
    """A ``Finding Labels`` string names a finding outside :data:`LABELS`."""


def canonical_name(name: str) -> str:
    """Return the canonical spelling of one finding name, or raise :class:`UnknownFindingError`."""
    stripped = name.strip()
    stripped = _ALIASES.get(stripped, stripped)
    if stripped not in _INDEX:
        raise UnknownFindingError(
            f"unknown finding {name!r}; expected one of {', '.join(LABELS)} or {NO_FINDING!r}"
        )
    return stripped


def parse_finding_labels(text: str) -> np.ndarray:
    """Turn an NIH ``Finding Labels`` string into a uint8 vector in :data:`LABELS` order.

    >>> parse_finding_labels("Cardiomegaly|Effusion").nonzero()[0].tolist()
    [1, 2]
    >>> int(parse_finding_labels("No Finding").sum())
    0
    """
    vector = np.zeros(NUM_LABELS, dtype=np.uint8)
    if text is None:
        raise UnknownFindingError("missing Finding Labels value")
    for part in text.split("|"):
        if part.strip() == NO_FINDING:
            continue
        vector[_INDEX[canonical_name(part)]] = 1
    return vector


def format_finding_labels(vector: Sequence[int]) -> str:
    """Inverse of :func:`parse_finding_labels`: ``"A|B"`` in canonical order, or ``"No Finding"``."""
    names = [LABELS[i] for i, flag in enumerate(vector) if flag]
    return "|".join(names) if names else NO_FINDING
