"""The NIH ``Data_Entry_2017*.csv`` layout, declared once for pandas (synth) and Spark (ingest).

The header's bracketed names contain commas (``OriginalImage[Width,Height]``), so a header-driven
parser sees 11 fields under 9 names; the file is always read positionally with these 11 columns.
Some copies of the 2017 file end every line with an extra empty column, which is ignored.
"""
from __future__ import annotations

import re

HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
#: (column name, Spark SQL type) in file order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("image_id", "string"),
    ("finding_labels", "string"),
    ("follow_up", "int"),
    ("patient_id", "int"),
    ("age_text", "string"),
    ("sex", "string"),
    ("view", "string"),
    ("original_width", "int"),
    ("original_height", "int"),
    ("pixel_spacing_x", "double"),
    ("pixel_spacing_y", "double"),
)
COLUMN_NAMES = tuple(name for name, _ in COLUMNS)
SPARK_DDL = ", ".join(f"`{name}` {sql_type}" for name, sql_type in COLUMNS)

_AGE = re.compile(r"^\s*0*(\d{1,3})\s*([YMD]?)\s*$", re.IGNORECASE)


def parse_age(text: str | None) -> int | None:
    """Age in whole years from ``"58"`` (v2020 file) or ``"058Y"``/``"006M"`` (2017 file); None if unparseable.

    >>> parse_age("058Y"), parse_age("61"), parse_age("006M"), parse_age("old")
    (58, 61, 0, None)
    """
    if text is None:
        return None
    match = _AGE.match(text)
    if not match:
        return None
    value, unit = int(match.group(1)), match.group(2).upper()
    years = value if unit in ("", "Y") else value // 12 if unit == "M" else value // 365
    return years if 0 <= years <= 120 else None


def age_problem(text: str | None) -> str | None:
    """Why a non-empty age text is unusable (the ``unparseable_age`` detail), or None if it parses or is empty.

    An empty or missing age is simply unknown; text that :func:`parse_age` cannot read (``"58Y?"``,
    ``"abc"``, an age over 120) is a data error worth a quarantine row.

    >>> age_problem("058Y"), age_problem(""), age_problem("58Y?")
    (None, None, "Patient Age '58Y?' is not an age in years, months or days (0-120 years)")
    """
    if text is None or isinstance(text, float) or not str(text).strip() or parse_age(str(text)) is not None:
        return None
    return f"Patient Age {text!r} is not an age in years, months or days (0-120 years)"


#: The only DICOM attributes ingest keeps (everything else, names, ids, UIDs and dates included, is dropped).
DICOM_KEPT = {"view": "ViewPosition", "sex": "PatientSex", "age_text": "PatientAge"}


def dicom_metadata(dataset) -> dict:
    """``view``, ``sex`` and ``age_text`` from a pydicom dataset; None for absent or empty attributes."""
    values = {}
    for name, keyword in DICOM_KEPT.items():
        value = dataset.get(keyword)
        values[name] = str(value).strip() or None if value is not None else None
    return values


#: The file ``cxr-spark synth`` writes into every dump it generates (its spec and counts): how a dump is known
#: to be synthetic, and every dataset made from it with it (``data`` in their manifests).
SYNTH_SPEC_FILE = "_synth.json"


def dump_data_kind(local_folder: str | None) -> str:
    """``synthetic`` for a dump ``cxr-spark synth`` wrote, ``real`` for another local folder, ``unknown`` for a
    dump on another filesystem (not looked at)."""
    import os

    if local_folder is None:
        return "unknown"
    return "synthetic" if os.path.exists(os.path.join(local_folder, SYNTH_SPEC_FILE)) else "real"
