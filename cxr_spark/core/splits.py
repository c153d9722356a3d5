"""Patient-wise split assignment: one pure function, used by ingest and by the synthetic generator.

A split is a function of the patient alone, so no patient's images can land in two splits.
"""
from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")


def patient_fraction(patient_id: int | str, seed: int) -> float:
    """Map a patient to a stable number in [0, 1): the same on every machine and Python process.

    Python's ``hash`` is salted per process, so a cryptographic digest is used instead.
    """
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(patient_id: int | str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Assign ``train``/``val``/``test`` to a patient by hashing; fractions are of patients.

    >>> hash_split(1, seed=0, val_fraction=0.0, test_fraction=0.0)
    'train'
    """
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            f"split fractions must be >= 0 and leave room for train; got val={val_fraction}, "
            f"test={test_fraction}"
        )
    u = patient_fraction(patient_id, seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def official_split(in_test_list: bool, patient_id: int | str, seed: int, val_fraction: float) -> str:
    """Honour NIH's ``test_list.txt``; carve validation out of ``train_val_list.txt`` by patient.

    ``val_fraction`` is the fraction of train_val patients moved to validation.
    """
    if in_test_list:
        return "test"
    return "val" if patient_fraction(patient_id, seed) < val_fraction else "train"
