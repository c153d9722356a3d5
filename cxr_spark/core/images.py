"""Pure image functions on bytes and arrays: header parsing, decoding, resizing, encoding.

Three containers are recognised by their magic bytes, never by file name: PNG, JPEG (JFIF/EXIF or
bare) and DICOM (``DICM`` after the 128-byte preamble). :func:`image_header` reads size and pixel
format from the header alone, so ingest can reject a decompression bomb or an unsupported pixel
format before anything is decoded; :func:`decode_grayscale` turns any accepted image into a 2-D uint8
array.

No Spark here; the Spark stages map these over partitions.
"""
from __future__ import annotations

import contextlib
import io
import re
import struct
import zlib
from dataclasses import dataclass

import cv2
import numpy as np

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
# OpenCV's own threads would fight Spark's task slots and Horovod's processes for the same cores.
cv2.setNumThreads(1)


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
def _malformed_dicom(what: str):
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

    with _malformed_dicom("DICOM unreadable"):
        dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels)
        for _ in dataset.iterall():  # pydicom decodes an element when it is first accessed
            pass
        return dataset


def _dicom_info(data: bytes) -> ImageHeader:
    ds = read_dicom(data)
    with _malformed_dicom("DICOM header"):
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
    with _malformed_dicom("DICOM pixel data"):
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
    the same rounding, bit for bit): the full-size image never becomes a NumPy array. Per 1024 px PNG
    that saved 0.5 ms of Python CPU in ingest's pass 1 (10.66 -> 10.17 ms, 6,000 images each way),
    1.2-1.3 ms in a bare Spark loop over the files and 1.5 ms in one process: the cost of the full-size
    array swings with the heap's state (``make bench`` times both paths as candidates).
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
    each factor 2 of ``k`` as one 2×2 average (OpenCV's vectorised path: 1024 -> 512 -> 256 took 0.22 ms,
    one 4×4 average 0.54 ms), then any odd rest in one step. The rest is area-resized (256 -> 224). Each
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
    tries every filter on every row: at 224 px it took 1.2 ms and 25.3 KB per radiograph, this 0.53 ms
    and 25.3 KB. ``compression`` (zlib level 0-9) uses OpenCV's writer instead (the synthetic dumps,
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
