"""Decoding DICOM pixels to 8-bit gray: rescale, windows, MONOCHROME1, colour and palette, and what does not decode,
against pydicom and numpy computed here. No Spark."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from films import dicom_bytes, refusal, rewritten_dicom

from cxr_spark.core.image_codec import decode_grayscale
from cxr_spark.core.image_formats import ImageError, image_header


def test_dicom_window_rescale_and_monochrome1_match_pydicom_voi():
    from pydicom import dcmread
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    stored = np.random.default_rng(4).integers(0, 4096, (12, 10)).astype(np.uint16)
    data = dicom_bytes(stored, BitsStored=12, HighBit=11, PhotometricInterpretation="MONOCHROME1",
                        RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=1500, WindowWidth=3000)
    assert image_header(data).conversion == "16bit"
    ds = dcmread(__import__("io").BytesIO(data))
    # pydicom's VOI output spans the rescaled stored range, [0, 4095] * 2 - 1024; scaled to 8 bits and
    # inverted for MONOCHROME1
    voi = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    expected = 255 - np.rint((voi + 1024) / (4095 * 2) * 255)
    assert np.abs(decode_grayscale(data).astype(int) - expected).max() <= 1


def _expected_dicom(data: bytes) -> np.ndarray:
    """The 8-bit image a DICOM should become, computed here: pydicom's stored values, the modality LUT
    (slope, intercept) and the VOI window (PS3.3 C.11.2.1.2) written out in numpy, a min-max stretch
    without a window (8-bit data without rescale as it is), MONOCHROME1 inverted."""
    import io

    from pydicom import dcmread

    ds = dcmread(io.BytesIO(data))
    stored = ds.pixel_array.astype(np.float64)
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    values = stored * slope + intercept
    if "WindowCenter" in ds and "WindowWidth" in ds:  # a centre without a width is no window
        center, width = float(ds.WindowCenter), float(ds.WindowWidth)
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        image = np.where(values <= low, 0, np.where(values > high, 255,
                                                    ((values - (center - 0.5)) / (width - 1) + 0.5) * 255))
    elif ds.BitsAllocated == 8 and (slope, intercept) == (1, 0):
        image = stored
    else:
        image = (values - values.min()) / (values.max() - values.min()) * 255
    image = np.clip(np.rint(image), 0, 255)
    return (255 - image if ds.PhotometricInterpretation == "MONOCHROME1" else image).astype(np.uint8)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("window", [None, (1500, 3000), (300, 400)])
@pytest.mark.parametrize("rescale", [(1, 0), (2, -1024), (-1, 4095)])
def test_12_bit_dicom_decodes_as_pydicom_and_numpy_compute_it(photometric, window, rescale):
    stored = np.random.default_rng(8).integers(0, 4096, (12, 10)).astype(np.uint16)
    attributes = {"BitsStored": 12, "HighBit": 11, "PhotometricInterpretation": photometric,
                  "RescaleSlope": rescale[0], "RescaleIntercept": rescale[1]}
    if window:
        attributes.update(WindowCenter=window[0], WindowWidth=window[1])
    data = dicom_bytes(stored, **attributes)
    decoded = decode_grayscale(data)
    assert decoded.dtype == np.uint8 and decoded.shape == (12, 10)
    assert np.abs(decoded.astype(int) - _expected_dicom(data)).max() <= 1  # rounding at .5 may differ


def test_8_bit_monochrome1_dicom_is_inverted_with_or_without_a_window():
    stored = np.random.default_rng(9).integers(0, 256, (6, 7)).astype(np.uint8)
    for attributes in ({}, {"WindowCenter": 128, "WindowWidth": 256}):
        data = dicom_bytes(stored, PhotometricInterpretation="MONOCHROME1", **attributes)
        assert np.abs(decode_grayscale(data).astype(int) - _expected_dicom(data)).max() <= 1
    plain = dicom_bytes(stored, PhotometricInterpretation="MONOCHROME1")
    assert np.array_equal(decode_grayscale(plain), 255 - stored)


def test_dicom_without_window_is_stretched_min_to_max():
    stored = np.array([[100, 200], [300, 1100]], np.uint16)
    decoded = decode_grayscale(dicom_bytes(stored))
    assert decoded.tolist() == np.rint((stored - 100) / 1000 * 255).astype(int).tolist()


def test_real_dicom_sample_decodes_like_pydicom(shared_data):
    from pydicom import dcmread

    path = next((shared_data / "samples").glob("rsna_*.dcm"))
    data = path.read_bytes()
    header = image_header(data)
    assert (header.format, header.width, header.height, header.conversion) == ("dicom", 1024, 1024, None)
    assert np.array_equal(decode_grayscale(data), dcmread(path).pixel_array)  # 8-bit MONOCHROME2, no window


def test_an_rgb_dicom_decodes_to_the_luma_numpy_computes_and_one_without_pixels_is_corrupt():
    from pydicom import dcmread

    rgb = np.random.default_rng(10).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    ds = dcmread(io.BytesIO(dicom_bytes(np.zeros((5, 7), np.uint8))))
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
    ds.PixelData = rgb.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    luma = np.rint(rgb @ np.array([0.299, 0.587, 0.114]))  # ITU-R BT.601
    assert np.abs(decode_grayscale(buffer.getvalue()).astype(int) - luma).max() <= 1
    with pytest.raises(ImageError) as error:
        decode_grayscale(rewritten_dicom(dicom_bytes(np.zeros((5, 7), np.uint8)), PixelData=None))
    assert (error.value.reason, error.value.detail) == ("corrupt_image", "DICOM has no pixel data")


@pytest.mark.parametrize("attributes", [
    {"RescaleSlope": 2, "RescaleIntercept": 10},  # 8-bit data with a modality LUT: stretched, not kept as is
    {"RescaleSlope": 1, "RescaleIntercept": -5},
    {"RescaleSlope": 3},
    {"WindowCenter": 100},  # a centre without a width: no window
    {"PhotometricInterpretation": "MONOCHROME1", "RescaleIntercept": 7},
])
def test_8_bit_dicom_with_a_rescale_or_half_a_window_decodes_as_numpy_computes_it(attributes):
    stored = np.random.default_rng(13).integers(20, 200, (6, 7)).astype(np.uint8)
    data = dicom_bytes(stored, **attributes)
    expected = _expected_dicom(data)
    if "WindowCenter" not in attributes:  # the stretch changes the pixels: the case can tell
        assert not np.array_equal(expected, stored)
    assert np.abs(decode_grayscale(data).astype(int) - expected).max() <= 1


def test_a_16_bit_rgb_dicom_is_scaled_to_8_bits_then_to_luma():
    from pydicom import dcmread

    rgb = np.random.default_rng(14).integers(0, 4096, (5, 6, 3)).astype(np.uint16)
    ds = dcmread(io.BytesIO(dicom_bytes(np.zeros((5, 6), np.uint16), BitsStored=16, HighBit=15)))
    ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration = "RGB", 3, 0
    ds.PixelData = rgb.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    shift = int(rgb.max()).bit_length() - 8  # the highest bit used becomes bit 7
    luma = np.rint((rgb >> shift) @ np.array([0.299, 0.587, 0.114]))
    assert np.abs(decode_grayscale(buffer.getvalue()).astype(int) - luma).max() <= 1


def test_window_and_stretch_map_values_onto_0_255_exactly_as_the_dicom_standard_writes_it():
    from cxr_spark.core.image_codec import minmax_to_8bit, window_to_8bit

    values = np.arange(-5, 16, dtype=np.float64)
    center, width = 5.0, 11.0  # (x - 4.5) / 10 * 255 + 127.5: never half-way between two gray levels
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    expected = [0 if x <= low else 255 if x > high else round(((x - (center - 0.5)) / (width - 1) + 0.5) * 255)
                for x in values]
    windowed = window_to_8bit(values, center, width)
    assert windowed.dtype == np.uint8 and windowed.tolist() == expected
    assert window_to_8bit(np.array([4.0, 5.0]), 5.0, 1.0).tolist() == [0, 255]  # width 1: a threshold
    stretched = minmax_to_8bit(np.arange(3, 21, dtype=np.float64))  # range 17: 255 / 17 = 15 exactly
    assert stretched.dtype == np.uint8 and stretched.tolist() == [15 * i for i in range(18)]
    flat = minmax_to_8bit(np.full((2, 3), 7.0))
    assert flat.dtype == np.uint8 and flat.shape == (2, 3) and not flat.any()


def test_dicom_pixel_data_shorter_than_declared_is_corrupt_and_says_why():
    short = rewritten_dicom(dicom_bytes(np.zeros((4, 5), np.uint16), BitsStored=12, HighBit=11), PixelData=bytes(6))
    with pytest.raises(ImageError) as error:
        decode_grayscale(short)  # 6 bytes where 4 x 5 x 2 are declared
    assert error.value.reason == "corrupt_image" and error.value.detail.startswith("DICOM pixel data: ")
    assert error.value.detail.split(": ")[1] in ("ValueError", "OSError", "error"), error.value.detail


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
            assert refusal(decode_grayscale, data) == ("corrupt_image", detail)


def test_a_transfer_syntax_without_a_decoder_is_unsupported_and_named():
    from pydicom import dcmread
    from pydicom.encaps import encapsulate

    ds = dcmread(io.BytesIO(dicom_bytes(np.zeros((4, 5), np.uint8))))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"  # JPEG-LS lossless: no plugin in our stack
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(20)])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    reason, detail = refusal(decode_grayscale, buffer.getvalue())
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
