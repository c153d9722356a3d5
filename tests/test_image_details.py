"""What a quarantine row says about a bad image (its reason and a detail a person can act on), DICOM
files that are malformed in any way, palette-colour DICOM, multi-valued windows and the resize's
interpolation, each against an expectation computed here. No Spark."""
from __future__ import annotations

import io
import struct
import warnings
import zlib

import cv2
import numpy as np
import pytest
from conftest import dicom_bytes

from cxr_spark.core.image_codec import decode_grayscale, decode_resized, encode_png, resize_square, scale_to_8bit
from cxr_spark.core.image_formats import (PNG_SIGNATURE, ImageError, error_detail, image_header, png_header, read_dicom,
                                          sniff_format)
from cxr_spark.datasets.quarantine import REASONS
from cxr_spark.stages.ingest.files import index_file


def _refusal(call, *args, **kwargs) -> tuple[str, str]:
    with pytest.raises(ImageError) as error:
        call(*args, **kwargs)
    return error.value.reason, error.value.detail


def _png_ihdr(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """The first 33 bytes of a PNG: signature and an IHDR chunk (CRC not checked by the header reader)."""
    return PNG_SIGNATURE + struct.pack(">I4sIIBBBBBI", 13, b"IHDR", width, height, bit_depth, colour_type, 0, 0, 0, 0)


def test_refusals_name_the_reason_and_what_was_found():
    assert _refusal(sniff_format, b"") == ("empty_file", "zero bytes")
    assert _refusal(png_header, b"") == ("empty_file", "zero bytes")
    gif = b"GIF89a\x01\x02\x03\x04"  # longer than the 8 bytes a detail quotes
    assert _refusal(sniff_format, gif) == ("not_an_image",
                                           "no PNG, JPEG or DICOM signature; first bytes b'GIF89a\\x01\\x02'")
    assert _refusal(png_header, gif) == ("not_an_image", "no PNG signature; first bytes b'GIF89a\\x01\\x02'")
    assert _refusal(png_header, _png_ihdr(5, 3)[:32]) == ("corrupt_image",
                                                          "PNG header truncated or IHDR missing (32 bytes)")
    assert png_header(_png_ihdr(5, 3)) == (5, 3, 8, 0)  # 33 bytes are a whole header
    assert png_header(_png_ihdr(2 ** 31, 1))[0] == 2 ** 31  # sizes are unsigned 32-bit
    assert _refusal(image_header, _png_ihdr(2 ** 31, 1)) == (
        "image_too_large", "png header says 2147483648x1 = 2,147,483,648 pixels > limit 50,000,000")
    assert _refusal(image_header, _png_ihdr(5, 3, 8, 4)) == ("unsupported_format", "PNG gray+alpha, bit depth 8")
    assert _refusal(image_header, _png_ihdr(5, 3, 8, 5)) == ("unsupported_format", "PNG colour type 5, bit depth 8")


def test_the_size_limits_are_inclusive_and_one_pixel_is_an_image():
    one = image_header(encode_png(np.zeros((1, 1), np.uint8)))
    assert (one.width, one.height) == (1, 1)
    assert image_header(encode_png(np.zeros((3, 5), np.uint8)), max_pixels=15).width == 5
    assert _refusal(image_header, encode_png(np.zeros((3, 5), np.uint8)), max_pixels=14) == (
        "image_too_large", "png header says 5x3 = 15 pixels > limit 14")


def test_a_dicom_header_is_read_without_its_pixels_unless_asked():
    data = dicom_bytes(np.arange(20, dtype=np.uint8).reshape(4, 5))
    assert "PixelData" not in read_dicom(data)
    assert "PixelData" in read_dicom(data, pixels=True)


def test_every_malformed_dicom_is_quarantined_with_a_one_line_detail_that_names_no_one():
    # Seeded random damage to a DICOM (a few bytes changed, sometimes cut short). pydicom decodes elements
    # lazily and raised TypeError, AttributeError, NotImplementedError, ... from inside ingest (the whole
    # Spark job failed) for 190 of 3,000 such files before every error became corrupt_image.
    pixels = np.arange(400, dtype=np.uint16).reshape(20, 20)
    good = dicom_bytes(pixels, WindowCenter=200, WindowWidth=300, PatientName="Doe^Jane", PatientAge="062Y")
    rng = np.random.default_rng(0)
    reasons = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on each oddity it reads past
        for _ in range(1000):
            data = bytearray(good)
            for _ in range(rng.integers(1, 4)):
                data[int(rng.integers(128, len(data)))] = int(rng.integers(0, 256))
            if rng.random() < 0.3:
                data = data[:int(rng.integers(132, len(data)))]
            row = index_file(bytes(data), 16)  # ingest's pass 1 over one file, as a Spark task runs it
            reasons.add(row["reason"])
            if row["reason"] is not None:
                assert row["reason"] in REASONS and row["image"] is None
                assert "\n" not in row["detail"] and "Doe" not in row["detail"] and "Jane" not in row["detail"]
            else:
                assert row["image"] is not None
    assert {None, "corrupt_image", "unsupported_format"} <= reasons


def test_each_stage_of_reading_a_dicom_names_itself_in_the_detail():
    good = dicom_bytes(np.zeros((4, 5), np.uint8), WindowCenter="1234", WindowWidth="10")
    at = good.index(b"\x02\x00\x10\x00UI")  # the transfer syntax element, its VR made unknown
    cases = [(good[:at + 4] + b"\x55\xec" + good[at + 6:],
              "DICOM unreadable: NotImplementedError: Unknown Value Representation …"),
             (dicom_bytes(np.zeros((4, 5), np.uint8), Rows=[4, 4]), "DICOM header: TypeError: int() argument must be "
                                                                   "a string, a bytes-like object or a real number, not …"),
             (good.replace(b"1234", b"ab;d"), "DICOM pixel data: ValueError: could not convert string to float: …")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for data, detail in cases:
            assert _refusal(decode_grayscale, data) == ("corrupt_image", detail)


def test_error_details_are_one_line_of_at_most_200_characters_with_values_hidden():
    for quoted, detail in [("can't read 'Doe^Jane'", "ValueError: can …"), ("read 'O'Brien' now", "ValueError: read …"),
                           ('read "Doe^Jane"', "ValueError: read …"), ("read b'Doe^Jane'", "ValueError: read …")]:
        assert error_detail(ValueError(quoted)) == detail
    assert error_detail(ValueError("two\n  lines")) == "ValueError: two lines"
    assert error_detail(ValueError()) == "ValueError"
    exact = ValueError("x" * (200 - len("ValueError: ")))
    assert error_detail(exact) == f"ValueError: {'x' * 188}"
    long = error_detail(ValueError("y" * 300))
    assert len(long) == 200 and long == f"ValueError: {'y' * 187}…"


def test_empty_frame_count_and_bits_stored_take_their_defaults():
    one_frame = dicom_bytes(np.zeros((4, 5), np.uint16), BitsStored=12, HighBit=11, NumberOfFrames=None)
    assert image_header(one_frame).conversion == "16bit"  # an empty NumberOfFrames is one frame
    assert image_header(dicom_bytes(np.zeros((4, 5), np.uint8), BitsStored=None)).conversion is None  # 8 allocated


def test_a_transfer_syntax_without_a_decoder_is_unsupported_and_named():
    from pydicom import dcmread
    from pydicom.encaps import encapsulate

    ds = dcmread(io.BytesIO(dicom_bytes(np.zeros((4, 5), np.uint8))))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"  # JPEG-LS lossless: no plugin in our stack
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(20)])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    reason, detail = _refusal(decode_grayscale, buffer.getvalue())
    assert reason == "unsupported_format" and "\n" not in detail
    assert detail.startswith("DICOM pixel data not decodable (1.2.840.10008.1.2.4.80): RuntimeError: Unable to decompress …")


def test_a_palette_colour_dicom_decodes_to_the_luma_of_its_lookup_table():
    rng = np.random.default_rng(4)
    lut = rng.integers(0, 256, (3, 256))  # 8-bit red, green, blue per index, stored as 16-bit v * 257
    indices = rng.integers(0, 256, (6, 7)).astype(np.uint8)
    tables = {f"{colour}PaletteColorLookupTableData": (lut[k] * 257).astype("<u2").tobytes()
              for k, colour in enumerate(("Red", "Green", "Blue"))}
    descriptors = {f"{colour}PaletteColorLookupTableDescriptor": [256, 0, 16] for colour in ("Red", "Green", "Blue")}
    data = dicom_bytes(indices, PhotometricInterpretation="PALETTE COLOR", **tables, **descriptors)
    assert image_header(data).conversion == "palette"
    red, green, blue = (lut[k][indices] for k in range(3))  # 16-bit v * 257 >> 8 is v again
    expected = 0.299 * red + 0.587 * green + 0.114 * blue
    assert np.abs(decode_grayscale(data) - expected).max() <= 1.0  # OpenCV's fixed-point luma rounds


def test_the_first_of_several_windows_is_applied():
    values = np.arange(0, 1000, 10, dtype=np.uint16).reshape(10, 10)
    data = dicom_bytes(values, BitsStored=12, HighBit=11, WindowCenter=[300, 700], WindowWidth=[201, 401])
    expected = np.clip(np.rint(((values - 299.5) / 200 + 0.5) * 255), 0, 255)  # PS3.3 C.11.2.1.2, centre 300
    np.testing.assert_array_equal(decode_grayscale(data), expected)


@pytest.mark.parametrize("changes, conversion", [({"BitsStored": 9}, "16bit"), ({"BitsStored": 8}, None)])
def test_more_than_8_stored_bits_need_a_conversion(changes, conversion):
    data = dicom_bytes(np.zeros((4, 5), np.uint16), HighBit=changes["BitsStored"] - 1, **changes)
    assert image_header(data).conversion == conversion


def test_scaling_to_8_bits_shifts_only_what_does_not_fit():
    np.testing.assert_array_equal(scale_to_8bit(np.array([[0, 200, 255]], np.uint16)), [[0, 200, 255]])
    assert scale_to_8bit(np.zeros((0, 5), np.uint16)).shape == (0, 5)


def _area_weights(source: int, target: int) -> np.ndarray:
    """(target, source): the share of each source pixel in each target pixel of an area resize."""
    edges = np.arange(target + 1) * source / target
    left, right = np.arange(source), np.arange(1, source + 1)
    overlap = np.clip(np.minimum(right, edges[1:, None]) - np.maximum(left, edges[:-1, None]), 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("shape", [(256, 256), (224, 256)])
def test_a_shrink_by_a_fraction_is_an_area_average(shape):
    image = np.random.default_rng(9).integers(0, 256, shape).astype(np.uint8)
    expected = _area_weights(shape[0], 224) @ image @ _area_weights(shape[1], 224).T
    got = resize_square(image, 224).astype(np.float64)
    assert np.abs(got - expected).max() <= 0.5 + 1e-3  # one rounding, as OpenCV's INTER_AREA
    linear = cv2.resize(image, (224, 224), interpolation=cv2.INTER_LINEAR)
    assert np.abs(linear - expected).max() > 2  # the test tells the two apart


def _bilinear_weights(source: int, target: int) -> np.ndarray:
    """(target, source): linear interpolation between pixel centres (half-pixel aligned, edges clamped)."""
    centres = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0, source - 1)
    low = np.floor(centres).astype(int)
    high, frac = np.minimum(low + 1, source - 1), centres - low
    weights = np.zeros((target, source))
    weights[np.arange(target), low] += 1 - frac
    weights[np.arange(target), high] += frac
    return weights


@pytest.mark.parametrize("shape", [(10, 10), (200, 300)])
def test_an_image_shorter_than_the_target_is_interpolated_bilinearly(shape):
    image = np.random.default_rng(10).integers(0, 256, shape).astype(np.uint8)
    size = 16 if shape[0] == 10 else 224
    expected = _bilinear_weights(shape[0], size) @ image @ _bilinear_weights(shape[1], size).T
    assert np.abs(resize_square(image, size) - expected).max() <= 1.0  # OpenCV's fixed-point weights round


def test_a_16_bit_png_is_written_with_its_16_bits():
    image = np.random.default_rng(12).integers(0, 65536, (6, 7)).astype(np.uint16)
    decoded = cv2.imdecode(np.frombuffer(encode_png(image), np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, image)


def _gray_png(levels: np.ndarray, bit_depth: int) -> bytes:
    """A grayscale PNG of ``levels`` (each < 2**bit_depth) at that bit depth, rows packed and unfiltered."""
    per_byte = 8 // bit_depth
    height, width = levels.shape
    padded = np.zeros((height, -(-width // per_byte) * per_byte), np.uint8)
    padded[:, :width] = levels
    groups = padded.reshape(height, -1, per_byte).astype(np.uint16)
    packed = sum(groups[:, :, k] << (8 - bit_depth * (k + 1)) for k in range(per_byte)).astype(np.uint8)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), packed], axis=1).tobytes()  # filter 0 a row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("bit_depth", [4, 8])
def test_the_fast_decode_and_the_full_decode_give_the_same_pixels(bit_depth):
    levels = np.random.default_rng(11).integers(0, 2 ** bit_depth, (64, 64)).astype(np.uint8)
    data = _gray_png(levels, bit_depth)
    full = decode_grayscale(data)
    np.testing.assert_array_equal(full, levels * (255 // (2 ** bit_depth - 1)))  # low depths span 0-255
    box = full.astype(np.float64).reshape(16, 4, 16, 4).mean(axis=(1, 3))  # 64 -> 16 is a 4x4 box average
    got = decode_resized(data, 16)
    assert np.abs(got - box).max() <= 1.0  # two 2x2 steps, each rounding
    np.testing.assert_array_equal(got, resize_square(full, 16))
