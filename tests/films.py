"""Images and DICOM files made for the tests, byte by byte or with pydicom and Pillow."""
from __future__ import annotations

import io

import numpy as np
import pytest

from cxr_spark.core.image_codec import encode_png
from cxr_spark.core.image_formats import ImageError


def pillow_bytes(image, fmt="PNG", **options) -> bytes:
    """A Pillow image saved as ``fmt`` with ``options``."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def big_png_header(width: int, height: int) -> bytes:
    """A PNG whose (valid-CRC) IHDR claims ``width`` x ``height`` but whose pixel data is tiny."""
    import struct
    import zlib

    data = bytearray(encode_png(np.zeros((2, 2), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def rewritten_dicom(data: bytes, **changes) -> bytes:
    """``data`` read with pydicom, attributes changed (None deletes one), written again."""
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(data))
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def refusal(call, *args, **kwargs) -> tuple[str, str]:
    """The reason and detail of the :class:`ImageError` ``call(*args, **kwargs)`` must raise."""
    with pytest.raises(ImageError) as error:
        call(*args, **kwargs)
    return error.value.reason, error.value.detail


def dicom_bytes(pixels, **attributes) -> bytes:
    """An uncompressed single-frame DICOM file built with pydicom (explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
