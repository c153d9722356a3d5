"""The label order, parsing and formatting, against the published order and a plain count of the real metadata. No Spark."""
from __future__ import annotations

import csv
import gzip
from collections import Counter

import numpy as np
import pytest

from cxr_spark.core.labels import LABELS, UnknownFindingError, format_finding_labels, parse_finding_labels
from cxr_spark.core.metadata import COLUMN_NAMES
from cxr_spark.synth import read_data_entry_csv

#: The published order (Wang et al. 2017, Table 1 order as CheXNet uses it), typed here independently of
#: cxr_spark.core.labels: a model's outputs are read by position, so every position matters.
PUBLISHED_ORDER = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                   "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")


#: Images per finding in the real metadata file, as ../shared/data/README.md states them.
PUBLISHED_COUNTS = {"Infiltration": 19_894, "Effusion": 13_317, "Atelectasis": 11_559, "Nodule": 6_331,
                    "Mass": 5_782, "Pneumothorax": 5_302, "Consolidation": 4_667, "Pleural_Thickening": 3_385,
                    "Cardiomegaly": 2_776, "Emphysema": 2_516, "Edema": 2_303, "Fibrosis": 1_686,
                    "Pneumonia": 1_431, "Hernia": 227}


def test_label_order_is_the_published_order_position_by_position():
    assert LABELS == PUBLISHED_ORDER
    for position, name in enumerate(PUBLISHED_ORDER):  # each finding parses onto its published position
        assert np.flatnonzero(parse_finding_labels(name)).tolist() == [position], name


def test_parse_and_format_round_trip():
    vector = parse_finding_labels("Hernia|Atelectasis|Effusion")
    assert vector.dtype == np.uint8
    assert np.flatnonzero(vector).tolist() == [0, 2, 13]  # published positions of the three
    assert format_finding_labels(vector) == "Atelectasis|Effusion|Hernia"
    assert parse_finding_labels("No Finding").sum() == 0
    assert format_finding_labels(np.zeros(14, np.uint8)) == "No Finding"
    assert format_finding_labels(parse_finding_labels("No Finding")) == "No Finding"
    assert format_finding_labels([0] * 4 + [1, 1] + [0] * 8) == "Mass|Nodule"
    assert parse_finding_labels("Infiltrate")[3] == 1  # BBox file spelling of Infiltration


def test_unknown_finding_names_the_value_and_the_findings_expected():
    with pytest.raises(UnknownFindingError) as error:
        parse_finding_labels("Effusion|Covid")
    assert str(error.value) == ("unknown finding 'Covid'; expected one of " + ", ".join(PUBLISHED_ORDER)
                                + " or 'No Finding'")
    with pytest.raises(UnknownFindingError, match="^missing Finding Labels value$"):
        parse_finding_labels(None)


def test_no_finding_beside_a_finding_keeps_the_finding():
    # not in NIH's file, but a hand-edited one: "No Finding" sets nothing, the findings around it still count
    assert np.flatnonzero(parse_finding_labels("No Finding|Effusion|Mass")).tolist() == [2, 4]
    assert np.flatnonzero(parse_finding_labels(" Mass | No Finding ")).tolist() == [4]


def test_real_metadata_label_counts_match_a_plain_csv_count(shared_data):
    """Our parser over the real file agrees with counting the '|'-separated names with the csv module."""
    path = shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz"
    plain = Counter()
    with gzip.open(path, "rt", newline="") as handle:
        rows = csv.reader(handle)
        next(rows)
        for row in rows:
            plain.update(row[1].split("|"))
    table = read_data_entry_csv(str(path))
    assert len(table) == 112_120 and list(table.columns) == list(COLUMN_NAMES)
    totals = np.sum([parse_finding_labels(text) for text in table["finding_labels"]], axis=0)
    assert {name: int(totals[i]) for i, name in enumerate(LABELS)} == {name: plain[name] for name in LABELS}
    assert dict(zip(PUBLISHED_ORDER, totals.tolist())) == PUBLISHED_COUNTS == {name: plain[name] for name in LABELS}
    assert plain["No Finding"] == 60_361  # the figure stated in shared/data/README.md
    assert table["patient_id"].nunique() == 30_805
