"""Decoding, resizing and encoding images: any accepted PNG, JPEG or DICOM to a 2-D uint8 array, the square
resize every stored image gets, and the PNG bytes the datasets store. The header checks that come first
are :mod:`cxr_spark.core.image_formats`'.

No Spark here; the Spark stages map these over partitions.
"""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

from cxr_spark.core.image_formats import (PNG_SIGNATURE, ImageError, error_detail, image_header, malformed_dicom,
                                          png_header, read_dicom)

# OpenCV's own threads would fight Spark's task slots and Horovod's processes for the same cores.
cv2.setNumThreads(1)


def scale_to_8bit(image: np.ndarray) -> np.ndarray:
    """Integer image of more than 8 bits to uint8 by a right shift that maps its highest used bit to bit 7.

    The bit depth actually used is inferred from the maximum (a 12-bit detector stored in 16-bit PNG
    keeps its contrast instead of turning almost black under a fixed ``>> 8``); the mapping stays
    linear with no clipping, so relative intensities are preserved.

    >>> scale_to_8bit(np.array([[0, 4095]], np.uint16)).tolist()
    [[0, 255]]
    """
    peak = int(image.max()) if image.size else 0
    shift = max(0, peak.bit_length() - 8)
    return (image >> shift).astype(np.uint8)


def window_to_8bit(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI window (PS3.3 C.11.2.1.2) onto 0-255."""
    width = max(float(width), 1.0)
    scaled = ((values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def minmax_to_8bit(values: np.ndarray) -> np.ndarray:
    """Stretch ``[min, max]`` linearly onto 0-255 (a constant image becomes 0)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.clip(np.rint((values - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def _first(value) -> float:
    """First value of a possibly multi-valued DICOM number (WindowCenter may hold several)."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def decode_dicom(data: bytes) -> np.ndarray:
    """DICOM bytes to a 2-D uint8 image.

    Monochrome: RescaleSlope/Intercept (the modality LUT) are applied; then the first
    WindowCenter/WindowWidth pair if present, else 8-bit stored data as is, else a min-max stretch of
    the image; MONOCHROME1 (white = low values) is inverted so bone is bright as in MONOCHROME2.
    Colour (RGB, YBR, PALETTE COLOR) is converted to luma.
    """
    image_header(data)  # refuse what the header already rules out (size, pixel format), with its reason
    ds = read_dicom(data, pixels=True)
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:  # read with the pixels: the header stops before
        raise ImageError("unsupported_format", "DICOM float pixel data")
    if "PixelData" not in ds:
        raise ImageError("corrupt_image", "DICOM has no pixel data")
    try:
        array = ds.pixel_array
    except (NotImplementedError, RuntimeError) as error:  # no handler for the transfer syntax
        raise ImageError("unsupported_format", f"DICOM pixel data not decodable "
                                               f"({ds.file_meta.get('TransferSyntaxUID', '?')}): "
                                               f"{error_detail(error)}") from error
    except Exception as error:  # noqa: BLE001 - any other failure of the pixel handlers is malformed data
        raise ImageError("corrupt_image", f"DICOM pixel data: {error_detail(error)}") from error
    with malformed_dicom("DICOM pixel data"):
        return _dicom_pixels(ds, array)


def _dicom_pixels(ds, array: np.ndarray) -> np.ndarray:
    """The decoded ``array`` of ``ds`` as 2-D uint8 (see :func:`decode_dicom`)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    photometric = str(ds.PhotometricInterpretation).upper()
    if photometric == "PALETTE COLOR":
        array = apply_color_lut(array, ds)
    if array.ndim == 3:  # pydicom returns YBR already converted to RGB
        rgb = array if array.dtype == np.uint8 else scale_to_8bit(array.astype(np.uint16))
        return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    has_rescale = float(ds.get("RescaleSlope", 1) or 1) != 1 or float(ds.get("RescaleIntercept", 0) or 0) != 0
    values = apply_modality_lut(array, ds)
    if "WindowCenter" in ds and "WindowWidth" in ds and ds.WindowCenter is not None and ds.WindowWidth:
        image = window_to_8bit(values.astype(np.float64), _first(ds.WindowCenter), _first(ds.WindowWidth))
    elif array.dtype == np.uint8 and not has_rescale:
        image = array
    else:
        image = minmax_to_8bit(values.astype(np.float64))
    if photometric == "MONOCHROME1":
        image = 255 - image
    return np.ascontiguousarray(image, dtype=np.uint8)


def decode_grayscale(data: bytes) -> np.ndarray:
    """Decode PNG, JPEG or DICOM bytes (sniffed by magic bytes) into a 2-D uint8 array.

    Colour and palette images are converted to luma (alpha dropped), 16-bit PNGs scaled by
    :func:`scale_to_8bit`, DICOM decoded by :func:`decode_dicom`. The header is checked first, so an
    image over :data:`MAX_PIXELS` or of an unsupported pixel format is refused before decoding.
    """
    header = image_header(data)
    if header.format == "dicom":
        return decode_dicom(data)
    buffer = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)  # palette PNGs come back expanded to BGR(A)
    if image is None:
        raise ImageError("corrupt_image", f"decoder could not read {len(data)} bytes")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype == np.uint16:
        image = scale_to_8bit(image)
    elif image.dtype != np.uint8:
        raise ImageError("unsupported_format", f"pixel type {image.dtype}")
    return image


def _box_factor(height: int, width: int, size: int) -> int:
    """The largest integer shrink ``k`` <= side // ``size`` that divides both sides (1: none)."""
    return next((k for k in range(min(height, width) // size, 1, -1) if height % k == 0 and width % k == 0), 1)


def decode_resized(data: bytes, size: int) -> np.ndarray:
    """:func:`decode_grayscale` then :func:`resize_square`, the same pixels, faster for the common case.

    When the first step of the resize is a 2×2 average of an 8-bit grayscale PNG (a 1024 px radiograph
    to 224), OpenCV decodes straight to half size (``IMREAD_REDUCED_GRAYSCALE_2``, a 2×2 average with
    the same rounding, bit for bit): the full-size image never becomes a NumPy array, which saves
    Python CPU per image (docs/benchmarks.md; ``make bench`` times both paths as candidates).
    """
    header = image_header(data)
    # an even box factor divides both sides, so both are even: the half-size decode loses no row or column
    if (header.format == "png" and header.conversion is None and png_header(data)[2] == 8
            and _box_factor(header.height, header.width, size) % 2 == 0):
        half = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_2)
        if half is None:
            raise ImageError("corrupt_image", f"decoder could not read {len(data)} bytes")
        return resize_square(half, size)
    return resize_square(decode_grayscale(data), size)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size``×``size`` with area averaging (alias-free when shrinking X-rays).

    A shrink by an integer factor ``k`` >= 2 that divides both sides is first taken as box averages:
    each factor 2 of ``k`` as one 2×2 average (OpenCV's vectorised path, faster than one 4×4 average),
    then any odd rest in one step. The rest is area-resized (256 -> 224). Each
    box step rounds, so a 2^n box stays within n/2 gray levels of the exact average; the whole resize
    is within half a gray level of one area resize from 1024 to 224 on average (``make bench``
    measures both).
    """
    if image.shape == (size, size):
        return image
    height, width = image.shape[:2]
    factor = _box_factor(height, width, size)
    while factor > 1:
        step = 2 if factor % 2 == 0 else factor
        height, width, factor = height // step, width // step, factor // step
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
    if image.shape == (size, size):
        return image
    interpolation = cv2.INTER_AREA if image.shape[0] >= size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def encode_png(image: np.ndarray, compression: int | None = None) -> bytes:
    """Encode a 2-D uint8 array as PNG bytes (lossless).

    By default (what the pipeline stores: ``images_<size>``, DICOM pixels in ``raw``) every row is
    written with PNG's "Up" filter and deflated with zlib's Huffman-only strategy. OpenCV's writer
    tries every filter on every row, which takes over twice as long for files of the same size on
    radiographs. ``compression`` (zlib level 0-9) uses OpenCV's writer instead (the synthetic dumps,
    written as a scanner's PNGs would be).
    """
    if compression is not None or image.ndim != 2 or image.dtype != np.uint8:
        ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1 if compression is None else compression])
        if not ok:
            raise ImageError("unsupported_format", f"cannot encode array {image.shape} {image.dtype}")
        return buffer.tobytes()
    height, width = image.shape
    rows = np.empty((height, width + 1), np.uint8)
    rows[:, 0] = 2  # filter type Up: each byte minus the one above it (the row above the first is zeros)
    rows[:1, 1:] = image[:1]
    np.subtract(image[1:], image[:-1], out=rows[1:, 1:])  # modulo 256, as PNG defines it
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    pixels = deflate.compress(rows) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale, no interlace
    return PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")
