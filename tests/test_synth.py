"""The synthetic dump has the NIH download's layout and is deterministic."""
from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from cxr_spark.metadata import HEADER
from cxr_spark.synth import SynthSpec, draw_radiograph, generate, read_data_entry_csv


def test_layout_header_and_patient_wise_lists(tiny_dump):
    lines = (tiny_dump / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == HEADER
    table = read_data_entry_csv(str(tiny_dump / "Data_Entry_2017.csv"))
    pngs = sorted(p.relative_to(tiny_dump).as_posix() for p in tiny_dump.rglob("*.png"))
    assert pngs == sorted(f"images_001/images/{name}" for name in table["image_id"])
    test = set((tiny_dump / "test_list.txt").read_text().split())
    train_val = set((tiny_dump / "train_val_list.txt").read_text().split())
    assert test and train_val and not test & train_val and test | train_val == set(table["image_id"])
    patient_of = dict(zip(table["image_id"], table["patient_id"]))
    assert not {patient_of[i] for i in test} & {patient_of[i] for i in train_val}
    with Image.open(tiny_dump / pngs[0]) as image:
        assert image.mode == "L" and image.size == (128, 128)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    digests = []
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate(SynthSpec(out=str(tmp_path / run), n_images=6, size=64, seed=seed, processes=1))
        digests.append(hashlib.sha256(b"".join(p.read_bytes() for p in sorted((tmp_path / run).rglob("*.png")))
                                      + (tmp_path / run / "Data_Entry_2017.csv").read_bytes()).hexdigest())
    assert digests[0] == digests[1] != digests[2]


def test_each_finding_changes_the_film():
    """Every finding's pattern changes pixels relative to the same film without it."""
    base = draw_radiograph(np.zeros(14, np.uint8), 256, seed=1, index=0).astype(int)
    for i in range(14):
        labels = np.zeros(14, np.uint8)
        labels[i] = 1
        changed = np.abs(draw_radiograph(labels, 256, seed=1, index=0).astype(int) - base) > 20
        assert changed.mean() > 0.001, f"finding {i} is invisible"


def test_sampling_from_real_metadata_keeps_real_rows(shared_data, tmp_path):
    source = read_data_entry_csv(str(shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz"))
    generate(SynthSpec(out=str(tmp_path), n_images=12, size=32, seed=5, processes=1,
                       metadata=str(shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz")))
    written = read_data_entry_csv(str(tmp_path / "Data_Entry_2017.csv"))
    assert len(written) == 12
    merged = written.merge(source, on="image_id", suffixes=("", "_real"))
    assert len(merged) == 12 and (merged["finding_labels"] == merged["finding_labels_real"]).all()
    assert (merged["patient_id"] == merged["patient_id_real"]).all()
