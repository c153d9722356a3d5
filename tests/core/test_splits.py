"""Splits are by patient on every path ingest takes (NIH's lists, the seeded hash), checked over the rows
ingest itself parses: synthetic metadata made here, and every row of the real NIH file when it is there."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter

import pytest

from cxr_spark.core.splits import hash_split, official_split


def _fraction(patient_id: int, seed: int) -> float:
    """The documented rule, written out: the first 8 bytes of SHA-256("<seed>:<patient>") over 2^64."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()[:8], "big") / 2**64


def test_hash_split_follows_its_rule_and_is_the_same_in_another_process():
    expected = []
    for patient in range(5_000):
        u = _fraction(patient, 3)
        expected.append("test" if u < 0.2 else "val" if u < 0.3 else "train")
    assert [hash_split(p, seed=3, val_fraction=0.1, test_fraction=0.2) for p in range(5_000)] == expected
    shares = Counter(expected)
    assert abs(shares["test"] / 5_000 - 0.2) < 0.02 and abs(shares["val"] / 5_000 - 0.1) < 0.02
    code = ("from cxr_spark.core.splits import hash_split; "
            "print(''.join(hash_split(p, 3, 0.1, 0.2)[0] for p in range(5000)))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})  # another salt for str hashes
    assert other.stdout.strip() == "".join(split[0] for split in expected)
    assert [official_split(False, p, 3, 0.1) for p in range(500)] == [
        "val" if _fraction(p, 3) < 0.1 else "train" for p in range(500)]
    assert official_split(True, 7, 3, 0.9) == "test"
    for val, test in ((0.6, 0.5), (0.5, 0.5), (0.0, 1.0), (-0.1, 0.2), (0.1, -0.2)):  # no room left for train
        with pytest.raises(ValueError, match="fractions must be >= 0 and leave room for train"):
            hash_split(1, seed=0, val_fraction=val, test_fraction=test)
    # no test fraction (NIH's lists give the test split) and no validation are both fine
    assert {hash_split(p, 0, 0.0, 0.0) for p in range(200)} == {"train"}
    assert {hash_split(p, 0, 0.3, 0.0) for p in range(200)} == {"train", "val"}


def _splits_by_patient(spark, metadata: str, split_lists: str | None, config) -> dict:
    from cxr_spark.stages.ingest.nih_metadata import read_metadata

    rows = read_metadata(spark, metadata, split_lists, config.ingest).select("image_id", "patient_id", "split")
    return {row["patient_id"]: row["splits"] for row in
            rows.where("patient_id IS NOT NULL").groupBy("patient_id")
            .agg({"split": "collect_set"}).withColumnRenamed("collect_set(split)", "splits").collect()}


def _check_patient_wise(spark, csv_path: str, split_lists: str | None, config, test_images: set | None = None):
    """No patient in two splits, all three splits used, and (with ``test_images``) exactly those images in
    test; returns the patients per split."""
    from cxr_spark.stages.ingest.nih_metadata import read_metadata

    by_patient = _splits_by_patient(spark, csv_path, split_lists, config)
    mixed = {patient: splits for patient, splits in by_patient.items() if len(splits) != 1}
    assert not mixed, f"{len(mixed)} patients in more than one split, e.g. {list(mixed.items())[:3]}"
    counts = Counter(splits[0] for splits in by_patient.values())
    assert set(counts) == {"train", "val", "test"}, counts
    if test_images is not None:  # NIH's test list is honoured image by image
        rows = read_metadata(spark, csv_path, split_lists, config.ingest).select("image_id", "split").collect()
        assert {row["image_id"] for row in rows if row["split"] == "test"} == test_images
    return counts


def test_every_patient_of_a_synthetic_dump_is_in_one_split_on_both_paths(spark, tiny_dump, config):
    csv_path = str(tiny_dump / "Data_Entry_2017.csv")
    lines = (tiny_dump / "Data_Entry_2017.csv").read_text().splitlines()[1:]
    patients = Counter(line.split(",")[3] for line in lines)
    assert max(patients.values()) > 1  # patients with several images, or the check could not fail
    _check_patient_wise(spark, csv_path, None, config)
    test_list = set((tiny_dump / "test_list.txt").read_text().split())
    _check_patient_wise(spark, csv_path, str(tiny_dump), config, test_list)


def test_every_patient_of_the_real_metadata_is_in_one_split_on_both_paths(spark, shared_data, config, tmp_path):
    import gzip

    csv_path = str(shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz")
    counts = _check_patient_wise(spark, csv_path, None, config)
    assert sum(counts.values()) == 30_805
    # an official-style list made here, patient-wise as NIH's: every image of every 5th patient
    with gzip.open(csv_path, "rt") as handle:
        rows = [line.split(",") for line in handle.read().splitlines()[1:]]
    test_images = {row[0] for row in rows if int(row[3]) % 5 == 0}
    (tmp_path / "test_list.txt").write_text("\n".join(sorted(test_images)) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(sorted({row[0] for row in rows} - test_images)) + "\n")
    _check_patient_wise(spark, csv_path, str(tmp_path), config, test_images)
