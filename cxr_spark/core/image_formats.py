"""Image formats from their bytes: sniffing, headers, the size guard, DICOM reading, and error details.

Three containers are recognised by their magic bytes, never by file name: PNG, JPEG (JFIF/EXIF or
bare) and DICOM (``DICM`` after the 128-byte preamble). :func:`image_header` reads size and pixel
format from the header alone, so ingest can reject a decompression bomb or an unsupported pixel
format before anything is decoded; :func:`cxr_spark.core.image_codec.decode_grayscale` turns any accepted
image into a 2-D uint8 array.

No Spark here; the Spark stages map these over partitions.
"""
from __future__ import annotations

import contextlib
import io
import re
import struct
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
DICOM_MAGIC_OFFSET = 128  # a DICOM Part 10 file: 128-byte preamble, then b"DICM"
#: Decompression-bomb guard: an image whose header claims more pixels than this is quarantined as
#: ``image_too_large`` before it is decoded (a 50 MP 8-bit image decodes to 50 MB; NIH's are 1 MP,
#: the largest digital radiographs about 10 MP). Change it here; ingest and decoding both use it.
MAX_PIXELS = 50_000_000
#: What ingest checks of a PNG besides its header: its end, where a complete PNG has its IEND chunk (a
#: truncated one does not). Its pixels are checked when preprocess decodes it.
PNG_TAIL_BYTES = 1024
_IEND_CHUNK = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # length 0, type, CRC
#: Pixel formats that are converted to 8-bit grayscale when decoded (and counted by ingest).
CONVERSIONS = ("rgb", "rgba", "16bit", "palette")


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a word from the quarantine vocabulary."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageHeader:
    """What the header says: container, size and the conversion decoding will apply (None: 8-bit gray)."""

    format: str  # "png", "jpeg" or "dicom"
    width: int
    height: int
    conversion: str | None  # one of CONVERSIONS, or None


def sniff_format(data: bytes) -> str:
    """``"png"``, ``"jpeg"`` or ``"dicom"`` from the magic bytes; ImageError otherwise."""
    if len(data) == 0:
        raise ImageError("empty_file", "zero bytes")
    if data[:8] == PNG_SIGNATURE:
        return "png"
    if data[:3] == JPEG_SIGNATURE:
        return "jpeg"
    if data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    raise ImageError("not_an_image", f"no PNG, JPEG or DICOM signature; first bytes {bytes(data[:8])!r}")


def png_header(data: bytes) -> tuple[int, int, int, int]:
    """Read ``(width, height, bit_depth, colour_type)`` from a PNG's IHDR chunk without decoding.

    >>> import numpy as np; from cxr_spark.core.image_codec import encode_png
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


def check_png_end(tail: bytes) -> None:
    """ImageError ``corrupt_image`` unless ``tail`` (a PNG's last bytes) holds the IEND chunk.

    >>> import numpy as np; from cxr_spark.core.image_codec import encode_png
    >>> check_png_end(encode_png(np.zeros((3, 5), np.uint8))[-PNG_TAIL_BYTES:])
    """
    if _IEND_CHUNK not in bytes(tail):  # bytes: a memoryview has no substring search
        raise ImageError("corrupt_image", f"PNG truncated: no IEND chunk in its last {len(tail)} bytes")


# PNG colour types (IHDR) and the conversion each needs; 4 = gray + alpha has no safe reading of the
# alpha channel for a radiograph, so it is refused rather than guessed.
_PNG_COLOUR = {0: "gray", 2: "rgb", 3: "palette", 4: None, 6: "rgba"}


def _png_info(data: bytes) -> ImageHeader:
    width, height, bit_depth, colour_type = png_header(data)
    kind = _PNG_COLOUR.get(colour_type, None)
    if kind is None:
        name = "gray+alpha" if colour_type == 4 else f"colour type {colour_type}"
        raise ImageError("unsupported_format", f"PNG {name}, bit depth {bit_depth}")
    if kind == "gray":
        conversion = "16bit" if bit_depth == 16 else None  # 1/2/4-bit gray is expanded to 0-255 by libpng
    else:
        conversion = kind  # 16-bit colour is counted under its colour model
    return ImageHeader("png", width, height, conversion)


# Start-of-frame markers: C0-C3, C5-C7, C9-CB, CD-CF (C4 = DHT, C8 = JPG extension, CC = DAC).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_LOSSLESS = {0xC3, 0xC7, 0xCB, 0xCF}


def jpeg_header(data: bytes) -> tuple[int, int, int, int, int]:
    """``(width, height, precision, components, sof_marker)`` from a JPEG's start-of-frame segment."""
    if data[:3] != JPEG_SIGNATURE:
        raise ImageError("not_an_image", f"no JPEG signature; first bytes {bytes(data[:8])!r}")
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise ImageError("corrupt_image", f"JPEG marker expected at byte {position}")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        (length,) = struct.unpack(">H", data[position + 2:position + 4])
        if marker in _JPEG_SOF:
            if position + 10 > len(data):
                break
            precision, height, width, components = struct.unpack(">BHHB", data[position + 4:position + 10])
            return width, height, precision, components, marker
        if marker in (0xDA, 0xD9):  # scan data or end of image before any frame header
            break
        position += 2 + length
    raise ImageError("corrupt_image", f"JPEG has no start-of-frame header ({len(data)} bytes)")


def _jpeg_info(data: bytes) -> ImageHeader:
    width, height, precision, components, marker = jpeg_header(data)
    if marker in _JPEG_LOSSLESS or precision != 8:
        lossless = "lossless " if marker in _JPEG_LOSSLESS else ""
        raise ImageError("unsupported_format", f"JPEG {lossless}{precision}-bit (SOF 0x{marker:02X}); "
                                               f"only 8-bit lossy JPEG decodes")
    if components == 1:
        return ImageHeader("jpeg", width, height, None)
    if components == 3:
        return ImageHeader("jpeg", width, height, "rgb")
    raise ImageError("unsupported_format", f"JPEG with {components} components (CMYK or unknown colour model)")


_FIRST_QUOTE = re.compile(r"""b?['"]""")


def error_detail(error: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line, cut before the message's first quote (what follows a quote may be an
    element's value, and a value may be a patient's name) and at ``limit`` characters.

    >>> error_detail(ValueError("could not convert string to float: 'Doe^Jane'"))
    'ValueError: could not convert string to float: …'
    """
    message = " ".join(str(error).split())
    quote = _FIRST_QUOTE.search(message)
    if quote:
        message = message[:quote.start()].rstrip() + " …"
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


@contextlib.contextmanager
def malformed_dicom(what: str):
    """Any error but an ImageError while reading ``what`` becomes ``corrupt_image``: pydicom parses elements
    lazily and raises errors of any type (TypeError, AttributeError, NotImplementedError, ...) on bad bytes."""
    try:
        yield
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001 - see above; the quarantine must get every malformed file
        raise ImageError("corrupt_image", f"{what}: {error_detail(error)}") from error


def read_dicom(data: bytes, pixels: bool = False):
    """Parse DICOM bytes with pydicom (header only unless ``pixels``), every element decoded now, so a
    malformed one is an ImageError ``corrupt_image`` here and not later."""
    import pydicom  # imported here: only DICOM input pays for it

    with malformed_dicom("DICOM unreadable"):
        dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels)
        for _ in dataset.iterall():  # pydicom decodes an element when it is first accessed
            pass
        return dataset


def _dicom_info(data: bytes) -> ImageHeader:
    ds = read_dicom(data)
    with malformed_dicom("DICOM header"):
        return _dicom_header(ds)


def _dicom_header(ds) -> ImageHeader:
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if frames > 1:
        raise ImageError("unsupported_format", f"DICOM with {frames} frames (a single radiograph is expected)")
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        conversion = "16bit" if bits_stored > 8 else None
    elif photometric == "PALETTE COLOR":
        conversion = "palette"
    elif photometric == "RGB" or photometric.startswith("YBR"):
        conversion = "rgb"
    else:
        raise ImageError("unsupported_format", f"DICOM photometric interpretation {photometric or 'missing'!r}")
    return ImageHeader("dicom", columns, rows, conversion)


def image_header(data: bytes, max_pixels: int = MAX_PIXELS) -> ImageHeader:
    """Container, size and needed conversion from the header alone; ImageError with a quarantine reason.

    >>> import numpy as np; from cxr_spark.core.image_codec import encode_png
    >>> image_header(encode_png(np.zeros((3, 5), np.uint8)))
    ImageHeader(format='png', width=5, height=3, conversion=None)
    """
    kind = sniff_format(data)
    header = _png_info(data) if kind == "png" else _jpeg_info(data) if kind == "jpeg" else _dicom_info(data)
    if header.width <= 0 or header.height <= 0:
        raise ImageError("corrupt_image", f"{kind} header says {header.width}x{header.height}")
    if header.width * header.height > max_pixels:
        raise ImageError("image_too_large", f"{kind} header says {header.width}x{header.height} = "
                                            f"{header.width * header.height:,} pixels > limit {max_pixels:,}")
    return header


