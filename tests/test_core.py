"""Pure functions: labels, ages, PNG headers and ends, decoding (PNG, JPEG, DICOM) and resizing, metric rates. No Spark."""
from __future__ import annotations

import csv
import gzip
import io
from collections import Counter

import numpy as np
import pytest
from conftest import dicom_bytes
from PIL import Image

from cxr_spark.core.image_codec import decode_grayscale, decode_resized, encode_png, resize_square
from cxr_spark.core.image_formats import MAX_PIXELS, PNG_TAIL_BYTES, ImageError, check_png_end, image_header, png_header
from cxr_spark.core.labels import LABELS, UnknownFindingError, format_finding_labels, parse_finding_labels
from cxr_spark.core.metadata import COLUMN_NAMES, age_problem, parse_age
from cxr_spark.core.metrics import macro_average, rates
from cxr_spark.synth import read_data_entry_csv

#: The published order (Wang et al. 2017, Table 1 order as CheXNet uses it), typed here independently of
#: cxr_spark.core.labels: a model's outputs are read by position, so every position matters.
PUBLISHED_ORDER = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
                   "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
#: Images per finding in the real metadata file, as ../shared/data/README.md states them.
PUBLISHED_COUNTS = {"Infiltration": 19_894, "Effusion": 13_317, "Atelectasis": 11_559, "Nodule": 6_331,
                    "Mass": 5_782, "Pneumothorax": 5_302, "Consolidation": 4_667, "Pleural_Thickening": 3_385,
                    "Cardiomegaly": 2_776, "Emphysema": 2_516, "Edema": 2_303, "Fibrosis": 1_686,
                    "Pneumonia": 1_431, "Hernia": 227}


def test_label_order_is_the_published_order_position_by_position():
    assert LABELS == PUBLISHED_ORDER
    for position, name in enumerate(PUBLISHED_ORDER):  # each finding parses onto its published position
        assert np.flatnonzero(parse_finding_labels(name)).tolist() == [position], name


def test_parse_and_format_round_trip():
    vector = parse_finding_labels("Hernia|Atelectasis|Effusion")
    assert vector.dtype == np.uint8
    assert np.flatnonzero(vector).tolist() == [0, 2, 13]  # published positions of the three
    assert format_finding_labels(vector) == "Atelectasis|Effusion|Hernia"
    assert parse_finding_labels("No Finding").sum() == 0
    assert format_finding_labels(np.zeros(14, np.uint8)) == "No Finding"
    assert format_finding_labels(parse_finding_labels("No Finding")) == "No Finding"
    assert format_finding_labels([0] * 4 + [1, 1] + [0] * 8) == "Mass|Nodule"
    assert parse_finding_labels("Infiltrate")[3] == 1  # BBox file spelling of Infiltration


def test_unknown_finding_names_the_value_and_the_findings_expected():
    with pytest.raises(UnknownFindingError) as error:
        parse_finding_labels("Effusion|Covid")
    assert str(error.value) == ("unknown finding 'Covid'; expected one of " + ", ".join(PUBLISHED_ORDER)
                                + " or 'No Finding'")
    with pytest.raises(UnknownFindingError, match="^missing Finding Labels value$"):
        parse_finding_labels(None)


def test_no_finding_beside_a_finding_keeps_the_finding():
    # not in NIH's file, but a hand-edited one: "No Finding" sets nothing, the findings around it still count
    assert np.flatnonzero(parse_finding_labels("No Finding|Effusion|Mass")).tolist() == [2, 4]
    assert np.flatnonzero(parse_finding_labels(" Mass | No Finding ")).tolist() == [4]


def test_real_metadata_label_counts_match_a_plain_csv_count(shared_data):
    """Our parser over the real file agrees with counting the '|'-separated names with the csv module."""
    path = shared_data / "nih" / "Data_Entry_2017_v2020.csv.gz"
    plain = Counter()
    with gzip.open(path, "rt", newline="") as handle:
        rows = csv.reader(handle)
        next(rows)
        for row in rows:
            plain.update(row[1].split("|"))
    table = read_data_entry_csv(str(path))
    assert len(table) == 112_120 and list(table.columns) == list(COLUMN_NAMES)
    totals = np.sum([parse_finding_labels(text) for text in table["finding_labels"]], axis=0)
    assert {name: int(totals[i]) for i, name in enumerate(LABELS)} == {name: plain[name] for name in LABELS}
    assert dict(zip(PUBLISHED_ORDER, totals.tolist())) == PUBLISHED_COUNTS == {name: plain[name] for name in LABELS}
    assert plain["No Finding"] == 60_361  # the figure stated in shared/data/README.md
    assert table["patient_id"].nunique() == 30_805


@pytest.mark.parametrize("text,years", [("58", 58), ("058Y", 58), ("006M", 0), ("024M", 2), ("", None),
                                        ("abc", None), ("414", None), (None, None)])
def test_parse_age(text, years):
    assert parse_age(text) == years


@pytest.mark.parametrize("text,bad", [("58Y?", True), ("abc", True), ("414", True), ("058Y", False), ("61", False),
                                      ("", False), (None, False)])
def test_age_problem_flags_text_parse_age_cannot_read(text, bad):
    assert (age_problem(text) is not None) == bad
    assert bad == (text is not None and text.strip() != "" and parse_age(text) is None)


def test_png_header_matches_pillow_and_rejects_non_images(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (37, 53), dtype=np.uint8)
    data = encode_png(pixels)
    assert png_header(data)[:2] == Image.open(__import__("io").BytesIO(data)).size
    assert np.array_equal(decode_grayscale(data), pixels)
    for bad, reason in ((b"", "empty_file"), (b"GIF89a" + b"\0" * 40, "not_an_image"), (data[:20], "corrupt_image")):
        with pytest.raises(ImageError) as error:
            png_header(bad)
        assert error.value.reason == reason


def test_decode_converts_rgb_and_16_bit_to_8_bit_gray():
    import cv2

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 200  # pure green: luma 0.587 * 200
    gray = decode_grayscale(cv2.imencode(".png", rgb)[1].tobytes())
    assert gray.shape == (8, 8) and abs(int(gray[0, 0]) - round(0.587 * 200)) <= 1
    deep = np.full((4, 4), 51400, np.uint16)
    assert decode_grayscale(cv2.imencode(".png", deep)[1].tobytes())[0, 0] == 51400 >> 8
    twelve_bit = np.random.default_rng(1).integers(0, 4096, (6, 6)).astype(np.uint16)
    twelve_bit[0, 0] = 4095  # a 12-bit detector in a 16-bit PNG keeps its contrast: >> 4, not >> 8
    assert np.array_equal(decode_grayscale(cv2.imencode(".png", twelve_bit)[1].tobytes()), twelve_bit >> 4)


def test_resize_square_averages_areas():
    image = np.zeros((8, 8), np.uint8)
    image[:4, :4] = 200
    small = resize_square(image, 2)
    assert small.tolist() == [[200, 0], [0, 0]]


def test_resize_square_takes_an_integer_box_average_first_and_stays_near_one_area_step():
    import cv2

    smooth = cv2.GaussianBlur(np.random.default_rng(4).integers(0, 256, (1024, 1024)).astype(np.uint8), (0, 0), 3)
    for side, size in ((1024, 224), (512, 224), (1024, 256), (1000, 224), (1024, 1024)):
        image = smooth[:side, :side]
        small, one_step = resize_square(image, size), cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        assert small.shape == (size, size) and small.dtype == np.uint8
        assert np.abs(small.astype(int) - one_step).mean() < 1.0, (side, size)  # 0.5 on real radiographs
    # 1024 -> 256 is two 2x2 averages, each rounded: within one gray level of the exact 4x4 box mean
    exact = np.round(smooth.reshape(256, 4, 256, 4).mean(axis=(1, 3)))
    assert np.abs(resize_square(smooth, 256).astype(int) - exact).max() <= 1
    # an odd factor is one box step: 672 -> 224 is OpenCV's 3x3 area average itself
    assert np.array_equal(resize_square(smooth[:672, :672], 224),
                          cv2.resize(smooth[:672, :672], (224, 224), interpolation=cv2.INTER_AREA))


def _assert_decode_resized_is_decode_then_resize(images: list[bytes]) -> None:
    for data in images:
        for size in (224, 256, 300, 512):
            expected = resize_square(decode_grayscale(data), size)
            assert np.array_equal(decode_resized(data, size), expected), (png_header(data) if data[:4] == b"\x89PNG"
                                                                           else "jpeg", size)


def _film(seed: int, side: int = 1024) -> np.ndarray:
    """A textured 8-bit image: smooth structure plus pixel noise, so any wrong average shows."""
    import cv2

    rng = np.random.default_rng(seed)
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (side, side)).astype(np.uint8), (0, 0), 3).astype(int)
    return np.clip(smooth + rng.integers(-40, 41, (side, side)), 0, 255).astype(np.uint8)


def test_decode_resized_of_self_made_files_is_a_full_decode_then_resize_square():
    import cv2

    film = _film(5)
    _assert_decode_resized_is_decode_then_resize(
        [encode_png(film), encode_png(film[:1000, :1000]), encode_png(film[:672, :672]), encode_png(film[:1023, :1024]),
         cv2.imencode(".png", film.astype(np.uint16) * 200)[1].tobytes(),
         cv2.imencode(".png", np.dstack([film, film // 2, film // 3]))[1].tobytes(), cv2.imencode(".jpg", film)[1].tobytes()])
    truncated = encode_png(film)[:-20_000]
    with pytest.raises(ImageError) as error:
        decode_resized(truncated, 224)
    assert error.value.reason == "corrupt_image"


@pytest.mark.parametrize("side, size, box", [(1024, 512, 2), (1024, 256, 4), (512, 128, 4), (1024, 128, 8)])
def test_resize_of_a_png_is_the_box_average_numpy_computes(side, size, box):
    film = _film(6, side)
    blocks = film.reshape(size, box, size, box).astype(np.int64)
    exact = blocks.mean(axis=(1, 3))  # the box average, unrounded
    for resized in (decode_resized(encode_png(film), size), resize_square(film, size)):
        assert resized.shape == (size, size) and resized.dtype == np.uint8
        error = np.abs(resized - exact)
        # each 2x2 step rounds, by at most half a gray level; the steps' errors add at worst
        assert error.max() <= 0.5 * np.log2(box) and error.mean() < 0.5, (error.max(), error.mean())
    if box == 2:  # one 2x2 step: rounded half up, exactly
        assert np.array_equal(decode_resized(encode_png(film), size), (blocks.sum(axis=(1, 3)) + 2) // 4)


def test_decode_resized_of_the_real_films_is_a_full_decode_then_resize_square(shared_data):
    real = [path.read_bytes() for path in sorted((shared_data / "samples").glob("*.png"))]
    assert real and all(png_header(data)[2:] == (8, 0) for data in real)  # the NIH films: 8-bit gray
    _assert_decode_resized_is_decode_then_resize(real)


def test_encode_png_is_lossless_for_other_decoders_and_keeps_opencvs_writer_on_request():
    import cv2

    rng = np.random.default_rng(8)
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (224, 224)).astype(np.uint8), (0, 0), 2)
    for image in (smooth, rng.integers(0, 256, (5, 7), dtype=np.uint8), np.full((1, 1), 255, np.uint8)):
        data = encode_png(image)
        assert np.array_equal(np.asarray(Image.open(__import__("io").BytesIO(data))), image)  # Pillow checks CRCs
        assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).reshape(image.shape),
                              image)
        assert png_header(data)[:2] == (image.shape[1], image.shape[0])
        check_png_end(data[-PNG_TAIL_BYTES:])
    assert len(encode_png(smooth)) < 0.75 * smooth.size  # compressed, not stored
    assert encode_png(smooth, compression=3) == cv2.imencode(".png", smooth, [cv2.IMWRITE_PNG_COMPRESSION, 3])[1].tobytes()


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


def test_rates_and_undefined_values():
    r = rates(tp=8, fp=2, tn=85, fn=5)
    assert r["precision"] == 0.8 and r["recall"] == 8 / 13 and r["specificity"] == 85 / 87
    assert r["f1"] == pytest.approx(2 * 0.8 * (8 / 13) / (0.8 + 8 / 13)) and r["accuracy"] == 0.93
    empty = rates(tp=0, fp=0, tn=10, fn=0)
    assert empty["precision"] is None and empty["recall"] is None and empty["f1"] is None
    macro = macro_average([{**r, "auroc": 0.9}, {**empty, "auroc": None}])
    assert macro["precision"] == 0.8 and macro["auroc"] == 0.9 and macro["labels_with_auroc"] == 1


def test_model_files_on_a_remote_filesystem_get_a_clear_error(tmp_path):
    from cxr_spark.io.storage import read_bytes, write_bytes

    write_bytes(f"file://{tmp_path}/model/model.keras", b"weights")
    assert read_bytes(str(tmp_path / "model" / "model.keras")) == b"weights"
    with pytest.raises(NotImplementedError, match="hdfs://nn/m/model.keras needs a local or mounted path"):
        read_bytes("hdfs://nn/m/model.keras")


def _pillow_bytes(image, fmt="PNG", **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_image_header_reads_mode_and_size_of_png_and_jpeg():
    gray = np.random.default_rng(2).integers(0, 256, (20, 30), dtype=np.uint8)
    l_image = Image.fromarray(gray)
    cases = {
        "L": (_pillow_bytes(l_image), None),
        "RGB": (_pillow_bytes(l_image.convert("RGB")), "rgb"),
        "RGBA": (_pillow_bytes(l_image.convert("RGBA")), "rgba"),
        "P": (_pillow_bytes(l_image.convert("P")), "palette"),
        "I;16": (_pillow_bytes(Image.fromarray(gray.astype(np.uint16) * 257)), "16bit"),
        "JPEG L": (_pillow_bytes(l_image, "JPEG"), None),
        "JPEG RGB": (_pillow_bytes(l_image.convert("RGB"), "JPEG", progressive=True), "rgb"),
    }
    for name, (data, conversion) in cases.items():
        header = image_header(data)
        assert (header.width, header.height, header.conversion) == (30, 20, conversion), name
        assert header.format == ("jpeg" if name.startswith("JPEG") else "png")
    for data in (_pillow_bytes(l_image.convert("LA")), _pillow_bytes(l_image.convert("CMYK"), "JPEG")):
        with pytest.raises(ImageError) as error:
            image_header(data)
        assert error.value.reason == "unsupported_format"


def test_palette_and_colour_pngs_decode_to_the_gray_pillow_computes():
    gray = np.random.default_rng(3).integers(0, 256, (16, 24), dtype=np.uint8)
    for mode in ("P", "RGB", "RGBA"):
        image = Image.fromarray(gray).convert(mode)
        expected = np.asarray(image.convert("L"))  # Pillow's own palette lookup and luma
        decoded = decode_grayscale(_pillow_bytes(image))
        assert decoded.shape == gray.shape and np.abs(decoded.astype(int) - expected).max() <= 1, mode


def big_png_header(width: int, height: int) -> bytes:
    """A PNG whose (valid-CRC) IHDR claims ``width`` x ``height`` but whose pixel data is tiny."""
    import struct
    import zlib

    data = bytearray(encode_png(np.zeros((2, 2), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bomb_is_refused_from_the_header():
    side = int(MAX_PIXELS ** 0.5) + 1
    bomb = big_png_header(side, side)
    assert Image.open(__import__("io").BytesIO(bomb)).size == (side, side)  # Pillow agrees on the header
    for check in (image_header, decode_grayscale):
        with pytest.raises(ImageError) as error:
            check(bomb)
        assert error.value.reason == "image_too_large" and f"{side}x{side}" in error.value.detail


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


def test_dicom_metadata_keeps_view_sex_and_age_text_only_and_blanks_are_none():
    from pydicom.dataset import Dataset

    from cxr_spark.core.metadata import dicom_metadata

    ds = Dataset()
    ds.ViewPosition, ds.PatientSex, ds.PatientName, ds.PatientID = " PA ", "", "DOE^JOHN", "MRN1"
    assert dicom_metadata(ds) == {"view": "PA", "sex": None, "age_text": None}
    ds.PatientAge, ds.PatientSex = "045Y", "F"
    assert dicom_metadata(ds) == {"view": "PA", "sex": "F", "age_text": "045Y"}


def test_model_inputs_are_the_standardised_pixels_with_a_channel_axis_and_steps_take_full_batches():
    from cxr_spark.core.normalization import model_inputs
    from cxr_spark.stages.train.input_pipeline import steps_per_epoch

    images = np.random.default_rng(3).integers(0, 256, (3, 5, 4)).astype(np.uint8)
    inputs = model_inputs(images, {"mean": 100.0, "std": 40.0})
    assert inputs.shape == (3, 5, 4, 1) and inputs.dtype == np.float32
    np.testing.assert_allclose(inputs[..., 0], (images.astype(np.float64) - 100) / 40, rtol=1e-6)
    assert [steps_per_epoch(sizes, 8) for sizes in ([53, 47], [8], [7, 100], [64, 64])] == [5, 1, 0, 8]


def _rewritten_dicom(data: bytes, **changes) -> bytes:
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


def test_dicom_headers_say_their_size_and_conversion_and_refuse_what_cannot_be_one_radiograph():
    gray8 = dicom_bytes(np.zeros((6, 9), np.uint8))
    header = image_header(gray8)
    assert (header.format, header.width, header.height, header.conversion) == ("dicom", 9, 6, None)  # Columns, Rows
    assert image_header(dicom_bytes(np.zeros((6, 9), np.uint16), BitsStored=12, HighBit=11)).conversion == "16bit"
    assert image_header(_rewritten_dicom(gray8, PhotometricInterpretation="PALETTE COLOR")).conversion == "palette"
    for photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        rewritten = _rewritten_dicom(gray8, PhotometricInterpretation=photometric, SamplesPerPixel=3,
                                     PlanarConfiguration=0)
        assert image_header(rewritten).conversion == "rgb", photometric
    refusals = {"NumberOfFrames": (2, "DICOM with 2 frames"), "PhotometricInterpretation": ("CMYK", "'CMYK'")}
    for keyword, (value, detail) in refusals.items():
        with pytest.raises(ImageError) as error:
            image_header(_rewritten_dicom(gray8, **{keyword: value}))
        assert error.value.reason == "unsupported_format" and detail in error.value.detail, keyword
    with pytest.raises(ImageError) as error:
        image_header(_rewritten_dicom(gray8, PhotometricInterpretation=None))
    assert error.value.reason == "unsupported_format" and "'missing'" in error.value.detail
    with pytest.raises(ImageError) as error:
        image_header(_rewritten_dicom(gray8, Rows=0))
    assert error.value.reason == "corrupt_image" and "9x0" in error.value.detail


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
        decode_grayscale(_rewritten_dicom(dicom_bytes(np.zeros((5, 7), np.uint8)), PixelData=None))
    assert (error.value.reason, error.value.detail) == ("corrupt_image", "DICOM has no pixel data")


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


@pytest.mark.parametrize("changes, conversion", [
    ({"BitsStored": None}, "16bit"),  # BitsAllocated (16) stands in for BitsStored
    ({"BitsStored": None, "BitsAllocated": None}, None),  # neither: 8 bits
    ({"BitsStored": 8}, None),
    ({"NumberOfFrames": 1}, "16bit"),
    ({"NumberOfFrames": None}, "16bit"),
])
def test_dicom_header_defaults(changes, conversion):
    data = _rewritten_dicom(dicom_bytes(np.zeros((4, 5), np.uint16), BitsStored=12, HighBit=11), **changes)
    header = image_header(data)
    assert (header.width, header.height, header.conversion) == (5, 4, conversion)


@pytest.mark.parametrize("changes, reason, detail", [
    ({"Rows": None}, "corrupt_image", "dicom header says 5x0"),
    ({"Columns": None}, "corrupt_image", "dicom header says 0x4"),
])
def test_dicom_headers_that_cannot_be_a_radiograph_are_refused_with_their_reason(changes, reason, detail):
    data = _rewritten_dicom(dicom_bytes(np.zeros((4, 5), np.uint16), BitsStored=12, HighBit=11), **changes)
    for check in (image_header, decode_grayscale):
        with pytest.raises(ImageError) as error:
            check(data)
        assert (error.value.reason, error.value.detail) == (reason, detail)


@pytest.mark.parametrize("keyword, itemsize", [("FloatPixelData", 4), ("DoubleFloatPixelData", 8)])
def test_a_float_dicom_is_unsupported_not_corrupt(keyword, itemsize):
    # it was quarantined as corrupt_image "no pixel data": the header is read without the pixel elements
    data = _rewritten_dicom(dicom_bytes(np.zeros((4, 5), np.uint16), BitsStored=12, HighBit=11), PixelData=None,
                            BitsAllocated=8 * itemsize, **{keyword: bytes(20 * itemsize)})
    with pytest.raises(ImageError) as error:
        decode_grayscale(data)
    assert (error.value.reason, error.value.detail) == ("unsupported_format", "DICOM float pixel data")


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


def test_a_png_whose_pixels_do_not_decode_is_corrupt_with_its_size_and_rgba_drops_alpha():
    import cv2

    film = _film(15, 448)
    data = encode_png(film)
    broken = data[:60] + bytes(len(data) - 72) + data[-12:]  # header and IEND kept, the pixels zeroed
    for decode in (decode_grayscale, lambda d: decode_resized(d, 224), lambda d: decode_resized(d, 100)):
        with pytest.raises(ImageError) as error:
            decode(broken)
        assert (error.value.reason, error.value.detail) == ("corrupt_image", f"decoder could not read {len(data)} bytes")
    rgba = np.dstack([film, film[::-1], film[:, ::-1], np.full_like(film, 7)])  # R, G, B, a faint alpha
    png = cv2.imencode(".png", rgba[..., [2, 1, 0, 3]])[1].tobytes()  # OpenCV writes BGRA
    luma = np.rint(rgba[..., :3] @ np.array([0.299, 0.587, 0.114]))
    assert np.abs(decode_grayscale(png).astype(int) - luma).max() <= 1


def test_the_default_png_writer_filters_every_row_with_up_as_documented():
    import struct
    import zlib

    import cv2

    film = _film(16, 64)
    for data, expect_up in ((encode_png(film), True), (encode_png(film, compression=6), False)):
        assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), film)
        position, idat = 8, b""
        while position < len(data):  # the chunks, as the PNG standard lays them out
            (length,), kind = struct.unpack(">I", data[position:position + 4]), data[position + 4:position + 8]
            idat += data[position + 8:position + 8 + length] if kind == b"IDAT" else b""
            position += 12 + length
        rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(64, 65)
        assert (set(rows[:, 0]) == {2}) == expect_up  # OpenCV's writer picks filters per row


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


def test_the_box_factor_is_the_largest_shrink_that_divides_both_sides():
    from cxr_spark.core.image_codec import _box_factor

    for height, width, size in [(1024, 1024, 224), (1000, 1000, 224), (1023, 1024, 224), (672, 672, 224),
                                (1024, 768, 256), (900, 1200, 100), (224, 224, 224), (100, 100, 224), (30, 45, 5)]:
        brute = max([k for k in range(2, min(height, width) // size + 1) if height % k == 0 and width % k == 0],
                    default=1)
        assert _box_factor(height, width, size) == brute, (height, width, size)


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


def test_dicom_pixel_data_shorter_than_declared_is_corrupt_and_says_why():
    short = _rewritten_dicom(dicom_bytes(np.zeros((4, 5), np.uint16), BitsStored=12, HighBit=11), PixelData=bytes(6))
    with pytest.raises(ImageError) as error:
        decode_grayscale(short)  # 6 bytes where 4 x 5 x 2 are declared
    assert error.value.reason == "corrupt_image" and error.value.detail.startswith("DICOM pixel data: ")
    assert error.value.detail.split(": ")[1] in ("ValueError", "OSError", "error"), error.value.detail


@pytest.mark.parametrize("text, years", [("120", 120), ("121", None), ("120Y", 120), ("365D", 1), ("364D", 0),
                                         ("730D", 2), ("030D", 0), ("011M", 0), ("012M", 1), ("999M", 83)])
def test_ages_in_days_months_and_years_up_to_120(text, years):
    age = parse_age(text)
    assert age == years and (age is None or type(age) is int)


def test_the_quarantine_vocabulary_is_the_one_the_readme_documents_and_nothing_else_is_written():
    import re
    from pathlib import Path

    from cxr_spark.datasets.quarantine import REASONS, check_reasons

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("| reason | meaning |"):].split("\n\n")[0]
    assert tuple(re.findall(r"^\| `(\w+)` \|", table, re.M)) == REASONS
    check_reasons({"corrupt_image": 3, "no_metadata": 1}, "raw")
    with pytest.raises(RuntimeError, match="raw quarantine has rows with reasons outside .*: None, bad_pixels"):
        check_reasons({"bad_pixels": 1, None: 2, "empty_file": 1}, "raw")
