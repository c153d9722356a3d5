"""What a stored row calls the file it came from: one rule for every dataset (ingest's ``raw``, the batch
store). A file's name is its id, except for DICOM (by content, or by a ``.dcm``/``.dicom`` name): exports
often name DICOM files and folders after the patient or their UIDs, so a DICOM's id comes from its
content and no part of its path is ever stored.
"""
from __future__ import annotations

import re

#: A file named as DICOM (any case); the container is sniffed from the bytes too.
DICOM_NAME = r"(?i)\.(dcm|dicom)$"
#: Hex digits of the SHA-256 a DICOM's id keeps (128 bits: no collision among any plausible dump).
DICOM_ID_HEX = 32
#: What ``source_path`` says of a DICOM instead of its path.
DICOM_SOURCE = "dicom:"


def dicom_id(content_sha256: str) -> str:
    """A DICOM image's id, from its content's SHA-256 (hex).

    >>> dicom_id("ab" * 32)
    'abababababababababababababababab.dcm'
    """
    return content_sha256[:DICOM_ID_HEX] + ".dcm"


def is_dicom(path: str, image_format: str | None) -> bool:
    """A file is DICOM by its sniffed format or by its name."""
    return image_format == "dicom" or re.search(DICOM_NAME, path) is not None


def stored_identity(path: str, content_sha256: str, image_format: str | None) -> tuple[str, str]:
    """The ``(image_id, source_path)`` stored for the file at ``path``.

    >>> stored_identity("file:/dump/x/00000001_000.png", "ab" * 32, "png")
    ('00000001_000.png', 'file:/dump/x/00000001_000.png')
    >>> stored_identity("file:/dump/MRN123/Doe^John.dcm", "ab" * 32, None)
    ('abababababababababababababababab.dcm', 'dicom:abababababababababababababababab.dcm')
    """
    if is_dicom(path, image_format):
        image_id = dicom_id(content_sha256)
        return image_id, DICOM_SOURCE + image_id
    return path.rsplit("/", 1)[-1], path


def _any_case(extension: str) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" for c in extension)


#: The files a dump's listing takes (Hadoop glob syntax): PNG, JPEG and DICOM, whatever the case of their
#: extension; the container is then sniffed from the bytes, not the name.
IMAGE_GLOB = "*.{" + ",".join(_any_case(ext) for ext in ("png", "jpg", "jpeg", "dcm", "dicom")) + "}"
