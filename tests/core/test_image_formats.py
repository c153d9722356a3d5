"""Sniffing and headers: PNG, JPEG and DICOM headers read without decoding, the size guard, and each refusal's reason
and detail, against Pillow, pydicom and files built here byte by byte. No Spark."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from films import big_png_header, dicom_bytes, pillow_bytes, refusal, rewritten_dicom
from PIL import Image

from cxr_spark.core.image_codec import decode_grayscale, encode_png
from cxr_spark.core.image_formats import (MAX_PIXELS, PNG_SIGNATURE, PNG_TAIL_BYTES, ImageError, check_png_end,
                                          error_detail, image_header, png_header, read_dicom, sniff_format)


def test_png_header_matches_pillow_and_rejects_non_images(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (37, 53), dtype=np.uint8)
    data = encode_png(pixels)
    assert png_header(data)[:2] == Image.open(__import__("io").BytesIO(data)).size
    assert np.array_equal(decode_grayscale(data), pixels)
    for bad, reason in ((b"", "empty_file"), (b"GIF89a" + b"\0" * 40, "not_an_image"), (data[:20], "corrupt_image")):
        with pytest.raises(ImageError) as error:
            png_header(bad)
        assert error.value.reason == reason


def test_a_truncated_png_is_corrupt_from_its_end_and_a_whole_one_is_not():
    from cxr_spark.stages.ingest.files import inspect_file

    data = encode_png(np.random.default_rng(5).integers(0, 256, (64, 48), dtype=np.uint8))
    whole = inspect_file(data)
    assert (whole["reason"], whole["format"], whole["width"], whole["height"]) == (None, "png", 48, 64)
    check_png_end(data[-PNG_TAIL_BYTES:])
    for cut in (data[:-1], data[:-12], data[:len(data) // 2], data[:100]):  # IEND lost, or more
        row = inspect_file(cut)  # what pass 1 does: the whole (truncated) file
        assert row["reason"] == "corrupt_image" and "IEND" in row["detail"], len(cut)
        with pytest.raises(ImageError, match="IEND"):
            check_png_end(cut[-PNG_TAIL_BYTES:])
    assert Image.open(io.BytesIO(data)).size == (48, 64)  # the reference: Pillow reads the whole file


def test_image_header_reads_mode_and_size_of_png_and_jpeg():
    gray = np.random.default_rng(2).integers(0, 256, (20, 30), dtype=np.uint8)
    l_image = Image.fromarray(gray)
    cases = {
        "L": (pillow_bytes(l_image), None),
        "RGB": (pillow_bytes(l_image.convert("RGB")), "rgb"),
        "RGBA": (pillow_bytes(l_image.convert("RGBA")), "rgba"),
        "P": (pillow_bytes(l_image.convert("P")), "palette"),
        "I;16": (pillow_bytes(Image.fromarray(gray.astype(np.uint16) * 257)), "16bit"),
        "JPEG L": (pillow_bytes(l_image, "JPEG"), None),
        "JPEG RGB": (pillow_bytes(l_image.convert("RGB"), "JPEG", progressive=True), "rgb"),
    }
    for name, (data, conversion) in cases.items():
        header = image_header(data)
        assert (header.width, header.height, header.conversion) == (30, 20, conversion), name
        assert header.format == ("jpeg" if name.startswith("JPEG") else "png")
    for data in (pillow_bytes(l_image.convert("LA")), pillow_bytes(l_image.convert("CMYK"), "JPEG")):
        with pytest.raises(ImageError) as error:
            image_header(data)
        assert error.value.reason == "unsupported_format"


def test_decompression_bomb_is_refused_from_the_header():
    side = int(MAX_PIXELS ** 0.5) + 1
    bomb = big_png_header(side, side)
    assert Image.open(__import__("io").BytesIO(bomb)).size == (side, side)  # Pillow agrees on the header
    for check in (image_header, decode_grayscale):
        with pytest.raises(ImageError) as error:
            check(bomb)
        assert error.value.reason == "image_too_large" and f"{side}x{side}" in error.value.detail


def test_dicom_headers_say_their_size_and_conversion_and_refuse_what_cannot_be_one_radiograph():
    gray8 = dicom_bytes(np.zeros((6, 9), np.uint8))
    header = image_header(gray8)
    assert (header.format, header.width, header.height, header.conversion) == ("dicom", 9, 6, None)  # Columns, Rows
    assert image_header(dicom_bytes(np.zeros((6, 9), np.uint16), BitsStored=12, HighBit=11)).conversion == "16bit"
    assert image_header(rewritten_dicom(gray8, PhotometricInterpretation="PALETTE COLOR")).conversion == "palette"
    for photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        rewritten = rewritten_dicom(gray8, PhotometricInterpretation=photometric, SamplesPerPixel=3,
                                     PlanarConfiguration=0)
        assert image_header(rewritten).conversion == "rgb", photometric
    refusals = {"NumberOfFrames": (2, "DICOM with 2 frames"), "PhotometricInterpretation": ("CMYK", "'CMYK'")}
    for keyword, (value, detail) in refusals.items():
        with pytest.raises(ImageError) as error:
            image_header(rewritten_dicom(gray8, **{keyword: value}))
        assert error.value.reason == "unsupported_format" and detail in error.value.detail, keyword
    with pytest.raises(ImageError) as error:
        image_header(rewritten_dicom(gray8, PhotometricInterpretation=None))
    assert error.value.reason == "unsupported_format" and "'missing'" in error.value.detail
    with pytest.raises(ImageError) as error:
        image_header(rewritten_dicom(gray8, Rows=0))
    assert error.value.reason == "corrupt_image" and "9x0" in error.value.detail


def _segment(marker: int, payload: bytes) -> bytes:
    """One JPEG marker segment, as the standard lays it out: 0xFF, the marker, a 2-byte length, the payload."""
    import struct

    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _frame(marker: int, precision: int, height: int, width: int, components: int) -> bytes:
    import struct

    return _segment(marker, struct.pack(">BHHB", precision, height, width, components) + bytes(3 * components))


def test_jpeg_headers_built_by_hand_are_read_as_the_standard_lays_them_out():
    from cxr_spark.core.image_formats import jpeg_header

    soi, app0 = b"\xff\xd8", _segment(0xE0, b"JFIF\x00" + bytes(9))
    sof = _frame(0xC2, 8, 200, 300, 1)  # progressive, 8-bit, 300 wide, 200 high, gray
    assert jpeg_header(soi + app0 + sof) == (300, 200, 8, 1, 0xC2)
    assert jpeg_header(soi + b"\xff\xff\xff" + app0 + b"\xff\x01" + b"\xff\xd0" + sof) == (300, 200, 8, 1, 0xC2)
    header = image_header(soi + app0 + _frame(0xC0, 8, 20, 30, 3))
    assert (header.format, header.width, header.height, header.conversion) == ("jpeg", 30, 20, "rgb")
    for data, reason, detail in [
        (soi + app0 + _frame(0xC3, 8, 20, 30, 1), "unsupported_format", "lossless 8-bit (SOF 0xC3)"),
        (soi + _frame(0xC1, 12, 20, 30, 1), "unsupported_format", "12-bit (SOF 0xC1)"),
        (soi + _frame(0xC0, 8, 20, 30, 4), "unsupported_format", "JPEG with 4 components"),
        (soi + app0 + _segment(0xDA, bytes(8)) + sof, "corrupt_image", "no start-of-frame header"),
        (soi + app0 + b"\xff\xd9", "corrupt_image", "no start-of-frame header"),
        (soi + app0 + sof[:8], "corrupt_image", "no start-of-frame header"),  # cut inside the frame header
        (soi + app0 + b"\x00\xc0" + sof, "corrupt_image", f"JPEG marker expected at byte {2 + len(app0)}"),
    ]:
        with pytest.raises(ImageError) as error:
            image_header(data)
        assert error.value.reason == reason and detail in error.value.detail, (detail, error.value.detail)


def test_jpeg_headers_of_encoded_files_agree_with_pillow():
    import cv2

    from cxr_spark.core.image_formats import jpeg_header

    rng = np.random.default_rng(12)
    for image in (rng.integers(0, 256, (37, 53), dtype=np.uint8), rng.integers(0, 256, (40, 25, 3), dtype=np.uint8)):
        for flags in ([], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]):
            data = cv2.imencode(".jpg", image, flags)[1].tobytes()
            width, height, precision, components, _ = jpeg_header(data)
            reference = Image.open(io.BytesIO(data))
            assert (width, height) == reference.size and precision == 8
            assert components == len(reference.getbands())


@pytest.mark.parametrize("changes, conversion", [
    ({"BitsStored": None}, "16bit"),  # BitsAllocated (16) stands in for BitsStored
    ({"BitsStored": None, "BitsAllocated": None}, None),  # neither: 8 bits
    ({"BitsStored": 8}, None),
    ({"NumberOfFrames": 1}, "16bit"),
    ({"NumberOfFrames": None}, "16bit"),
])
def test_dicom_header_defaults(changes, conversion):
    data = rewritten_dicom(dicom_bytes(np.zeros((4, 5), np.uint16), BitsStored=12, HighBit=11), **changes)
    header = image_header(data)
    assert (header.width, header.height, header.conversion) == (5, 4, conversion)


@pytest.mark.parametrize("changes, reason, detail", [
    ({"Rows": None}, "corrupt_image", "dicom header says 5x0"),
    ({"Columns": None}, "corrupt_image", "dicom header says 0x4"),
])
def test_dicom_headers_that_cannot_be_a_radiograph_are_refused_with_their_reason(changes, reason, detail):
    data = rewritten_dicom(dicom_bytes(np.zeros((4, 5), np.uint16), BitsStored=12, HighBit=11), **changes)
    for check in (image_header, decode_grayscale):
        with pytest.raises(ImageError) as error:
            check(data)
        assert (error.value.reason, error.value.detail) == (reason, detail)


@pytest.mark.parametrize("keyword, itemsize", [("FloatPixelData", 4), ("DoubleFloatPixelData", 8)])
def test_a_float_dicom_is_unsupported_not_corrupt(keyword, itemsize):
    # it was quarantined as corrupt_image "no pixel data": the header is read without the pixel elements
    data = rewritten_dicom(dicom_bytes(np.zeros((4, 5), np.uint16), BitsStored=12, HighBit=11), PixelData=None,
                            BitsAllocated=8 * itemsize, **{keyword: bytes(20 * itemsize)})
    with pytest.raises(ImageError) as error:
        decode_grayscale(data)
    assert (error.value.reason, error.value.detail) == ("unsupported_format", "DICOM float pixel data")


def test_jpeg_header_edges_a_walker_must_get_right():
    from cxr_spark.core.image_formats import jpeg_header

    soi, app0 = b"\xff\xd8", _segment(0xE0, b"JFIF\x00" + bytes(9))
    wide = _frame(0xC0, 8, 30_000, 40_000, 1)  # sides over 32,767: unsigned
    assert jpeg_header(soi + app0 + wide) == (40_000, 30_000, 8, 1, 0xC0)
    assert jpeg_header(soi + b"\xff\xd7" + _frame(0xC0, 8, 2, 3, 1)) == (3, 2, 8, 1, 0xC0)  # RST7 has no length
    assert jpeg_header(soi + app0 + _frame(0xC0, 8, 2, 3, 1)[:10]) == (3, 2, 8, 1, 0xC0)  # just the 10 bytes read
    with pytest.raises(ImageError, match="no start-of-frame"):  # an end of image ends the search
        jpeg_header(soi + b"\xff\xd9" + _frame(0xC0, 8, 2, 3, 1))
    with pytest.raises(ImageError) as error:
        jpeg_header(b"GIF89a\x01\x00\x01\x00")
    assert (error.value.reason, error.value.detail) == ("not_an_image", "no JPEG signature; first bytes b'GIF89a\\x01\\x00'")


def test_jpeg_segments_a_walker_must_not_misread_and_the_details_of_what_does_not_decode():
    from cxr_spark.core.image_formats import jpeg_header

    soi = b"\xff\xd8"
    exif = _segment(0xE1, bytes(40_000))  # an EXIF or ICC segment over 32,767 bytes: lengths are unsigned
    assert jpeg_header(soi + exif + _frame(0xC0, 8, 2, 3, 1)) == (3, 2, 8, 1, 0xC0)
    after_end = soi + b"\xff\xd9" + b"\x00\x00" + _frame(0xC0, 8, 2, 3, 1)  # nothing after the end is read
    with pytest.raises(ImageError) as error:
        jpeg_header(after_end)
    assert error.value.detail == f"JPEG has no start-of-frame header ({len(after_end)} bytes)"
    for frame, detail in [(_frame(0xC3, 8, 2, 3, 1), "JPEG lossless 8-bit (SOF 0xC3); only 8-bit lossy JPEG decodes"),
                          (_frame(0xC1, 12, 2, 3, 1), "JPEG 12-bit (SOF 0xC1); only 8-bit lossy JPEG decodes")]:
        with pytest.raises(ImageError) as error:
            image_header(soi + frame)
        assert (error.value.reason, error.value.detail) == ("unsupported_format", detail)


def _png_ihdr(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """The first 33 bytes of a PNG: signature and an IHDR chunk (CRC not checked by the header reader)."""
    return PNG_SIGNATURE + struct.pack(">I4sIIBBBBBI", 13, b"IHDR", width, height, bit_depth, colour_type, 0, 0, 0, 0)


def test_refusals_name_the_reason_and_what_was_found():
    assert refusal(sniff_format, b"") == ("empty_file", "zero bytes")
    assert refusal(png_header, b"") == ("empty_file", "zero bytes")
    gif = b"GIF89a\x01\x02\x03\x04"  # longer than the 8 bytes a detail quotes
    assert refusal(sniff_format, gif) == ("not_an_image",
                                           "no PNG, JPEG or DICOM signature; first bytes b'GIF89a\\x01\\x02'")
    assert refusal(png_header, gif) == ("not_an_image", "no PNG signature; first bytes b'GIF89a\\x01\\x02'")
    assert refusal(png_header, _png_ihdr(5, 3)[:32]) == ("corrupt_image",
                                                          "PNG header truncated or IHDR missing (32 bytes)")
    assert png_header(_png_ihdr(5, 3)) == (5, 3, 8, 0)  # 33 bytes are a whole header
    assert png_header(_png_ihdr(2 ** 31, 1))[0] == 2 ** 31  # sizes are unsigned 32-bit
    assert refusal(image_header, _png_ihdr(2 ** 31, 1)) == (
        "image_too_large", "png header says 2147483648x1 = 2,147,483,648 pixels > limit 50,000,000")
    assert refusal(image_header, _png_ihdr(5, 3, 8, 4)) == ("unsupported_format", "PNG gray+alpha, bit depth 8")
    assert refusal(image_header, _png_ihdr(5, 3, 8, 5)) == ("unsupported_format", "PNG colour type 5, bit depth 8")


def test_the_size_limits_are_inclusive_and_one_pixel_is_an_image():
    one = image_header(encode_png(np.zeros((1, 1), np.uint8)))
    assert (one.width, one.height) == (1, 1)
    assert image_header(encode_png(np.zeros((3, 5), np.uint8)), max_pixels=15).width == 5
    assert refusal(image_header, encode_png(np.zeros((3, 5), np.uint8)), max_pixels=14) == (
        "image_too_large", "png header says 5x3 = 15 pixels > limit 14")


def test_a_dicom_header_is_read_without_its_pixels_unless_asked():
    data = dicom_bytes(np.arange(20, dtype=np.uint8).reshape(4, 5))
    assert "PixelData" not in read_dicom(data)
    assert "PixelData" in read_dicom(data, pixels=True)


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


@pytest.mark.parametrize("changes, conversion", [({"BitsStored": 9}, "16bit"), ({"BitsStored": 8}, None)])
def test_more_than_8_stored_bits_need_a_conversion(changes, conversion):
    data = dicom_bytes(np.zeros((4, 5), np.uint16), HighBit=changes["BitsStored"] - 1, **changes)
    assert image_header(data).conversion == conversion
