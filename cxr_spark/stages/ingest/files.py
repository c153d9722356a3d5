"""Pass 1's work on one file, pure Python run inside the executors: its container, size, pixel format and
DICOM fields from the header, its SHA-256, and (with ``--images-out``) its pixels as ``images_<size>`` stores
them; a file that cannot be used gets its quarantine reason and detail.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from cxr_spark.core.image_codec import decode_dicom, encode_png, resize_square
from cxr_spark.core.image_formats import PNG_TAIL_BYTES, ImageError, check_png_end, image_header, read_dicom
from cxr_spark.core.metadata import age_problem, dicom_metadata, parse_age
from cxr_spark.datasets.images import encode_resized, resize_encoded
from cxr_spark.io.storage import sha256_hex

INSPECT_OUT = ("format string, width int, height int, conversion string, view string, sex string, age int, "
               "reason string, detail string")


def inspect_file(data: bytes) -> dict:
    """Header facts of one whole file, or its quarantine reason; DICOM is decoded too, so pass 2 cannot
    fail. A PNG is checked from its header and its last :data:`PNG_TAIL_BYTES` (its IEND chunk), never
    decoded."""
    return _inspect(data)[0]


def _inspect(data: bytes) -> tuple[dict, np.ndarray | None]:
    """:func:`inspect_file`, and a DICOM's decoded pixels (None for other files): decoding is most of a
    DICOM's cost, and pass 1 resizes those same pixels."""
    row = dict.fromkeys(("format", "width", "height", "conversion", "view", "sex", "age", "reason", "detail"))
    pixels = None
    try:
        header = image_header(data)
        row.update(format=header.format, width=header.width, height=header.height, conversion=header.conversion)
        if header.format == "png":
            check_png_end(data[-PNG_TAIL_BYTES:])
        elif header.format == "dicom":
            fields = dicom_metadata(read_dicom(data))
            problem = age_problem(fields["age_text"])
            if problem:
                raise ImageError("unparseable_age", f"DICOM {problem}")
            row.update(view=fields["view"], sex=fields["sex"], age=parse_age(fields["age_text"]))
            pixels = decode_dicom(data)
    except ImageError as error:
        row.update(reason=error.reason, detail=error.detail)
    return row, pixels


INSPECT_COLUMNS = [field.split()[0] for field in INSPECT_OUT.split(", ")]
#: With ``--images-out``, pass 1 also returns each file as images_<size> stores it.
IMAGE_OUT = "image binary, pixel_mean float, pixel_std float"


def index_file(data: bytes, size: int | None = None) -> dict:
    """Pass 1 for one file: :func:`inspect_file`, its SHA-256 and, with ``size``, the image decoded and resized
    as ``images_<size>`` stores it (then a file whose pixels do not decode is quarantined here)."""
    row, pixels = _inspect(data)
    row["content_sha256"] = sha256_hex(data) if len(data) else None  # as for the 0-byte files Spark never reads
    if size is not None:
        row.update(image=None, pixel_mean=None, pixel_std=None)
        if row["reason"] is None:
            try:  # a DICOM is resized from the pixels inspecting it decoded (the same as decode_resized's)
                row["image"], row["pixel_mean"], row["pixel_std"] = (
                    resize_encoded(data, size) if pixels is None else encode_resized(resize_square(pixels, size)))
            except ImageError as error:
                row.update(reason=error.reason, detail=error.detail)
    return row


def stored_bytes(data: bytes, file_format: str) -> bytes:
    """What ``raw`` stores of an accepted file: its original bytes, or for DICOM the pixels re-encoded as
    PNG (no DICOM header is ever stored)."""
    return encode_png(decode_dicom(data)) if file_format == "dicom" else data


def dicom_as_png(content: pd.Series) -> pd.Series:
    """DICOM bytes re-encoded as PNG; null stays null."""
    return pd.Series([None if data is None else stored_bytes(data, "dicom") for data in content])
