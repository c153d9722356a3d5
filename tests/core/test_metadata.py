"""Ages, their problems, and the metadata a DICOM header may give. No Spark."""
from __future__ import annotations

import pytest

from cxr_spark.core.metadata import age_problem, parse_age


@pytest.mark.parametrize("text,years", [("58", 58), ("058Y", 58), ("006M", 0), ("024M", 2), ("", None),
                                        ("abc", None), ("414", None), (None, None)])
def test_parse_age(text, years):
    assert parse_age(text) == years


@pytest.mark.parametrize("text,bad", [("58Y?", True), ("abc", True), ("414", True), ("058Y", False), ("61", False),
                                      ("", False), (None, False)])
def test_age_problem_flags_text_parse_age_cannot_read(text, bad):
    assert (age_problem(text) is not None) == bad
    assert bad == (text is not None and text.strip() != "" and parse_age(text) is None)


def test_dicom_metadata_keeps_view_sex_and_age_text_only_and_blanks_are_none():
    from pydicom.dataset import Dataset

    from cxr_spark.core.metadata import dicom_metadata

    ds = Dataset()
    ds.ViewPosition, ds.PatientSex, ds.PatientName, ds.PatientID = " PA ", "", "DOE^JOHN", "MRN1"
    assert dicom_metadata(ds) == {"view": "PA", "sex": None, "age_text": None}
    ds.PatientAge, ds.PatientSex = "045Y", "F"
    assert dicom_metadata(ds) == {"view": "PA", "sex": "F", "age_text": "045Y"}


@pytest.mark.parametrize("text, years", [("120", 120), ("121", None), ("120Y", 120), ("365D", 1), ("364D", 0),
                                         ("730D", 2), ("030D", 0), ("011M", 0), ("012M", 1), ("999M", 83)])
def test_ages_in_days_months_and_years_up_to_120(text, years):
    age = parse_age(text)
    assert age == years and (age is None or type(age) is int)


def test_a_dump_is_synthetic_only_when_synth_marked_it(tmp_path):
    from cxr_spark.core.metadata import dump_data_kind
    from cxr_spark.synth import SPEC_FILE

    assert dump_data_kind(str(tmp_path)) == "real"
    (tmp_path / SPEC_FILE).write_text("{}")
    assert dump_data_kind(str(tmp_path)) == "synthetic"
    assert dump_data_kind(None) == "unknown"  # a dump on another filesystem is not looked at
