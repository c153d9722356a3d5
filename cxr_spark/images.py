"""Pure image functions on bytes and arrays: header parsing, decoding, resizing, encoding.

No Spark here; the Spark stages map these over partitions.
"""
from __future__ import annotations

import struct

import cv2
import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# OpenCV's own threads would fight Spark's task slots and Horovod's processes for the same cores.
cv2.setNumThreads(1)


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a word from the quarantine vocabulary."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def png_header(data: bytes) -> tuple[int, int, int, int]:
    """Read ``(width, height, bit_depth, colour_type)`` from a PNG's IHDR chunk without decoding.

    >>> png_header(encode_png(np.zeros((3, 5), np.uint8)))[:2]
    (5, 3)
    """
    if len(data) == 0:
        raise ImageError("empty_file", "zero bytes")
    if data[:8] != PNG_SIGNATURE:
        raise ImageError("not_an_image", f"no PNG signature; first bytes {bytes(data[:8])!r}")
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise ImageError("corrupt_image", f"PNG header truncated or IHDR missing ({len(data)} bytes)")
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", data[16:26])
    return width, height, bit_depth, colour_type


def decode_grayscale(data: bytes) -> np.ndarray:
    """Decode PNG/JPEG bytes into a 2-D uint8 array (16-bit scaled down, colour converted to luma)."""
    buffer = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError("corrupt_image", f"decoder could not read {len(data)} bytes")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError("unsupported_format", f"pixel type {image.dtype}")
    return image


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size``×``size`` with area averaging (alias-free when shrinking X-rays)."""
    if image.shape == (size, size):
        return image
    interpolation = cv2.INTER_AREA if image.shape[0] >= size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def encode_png(image: np.ndarray, compression: int = 1) -> bytes:
    """Encode a 2-D uint8 array as PNG bytes (lossless; level 1 trades size for speed)."""
    ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise ImageError("unsupported_format", f"cannot encode array {image.shape} {image.dtype}")
    return buffer.tobytes()
