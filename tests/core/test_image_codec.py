"""Decoding PNG and JPEG to 8-bit gray, the resize every stored image gets and the PNG bytes the datasets store,
each against Pillow, OpenCV or numpy computed here. No Spark."""
from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest
from films import pillow_bytes
from PIL import Image

from cxr_spark.core.image_codec import decode_grayscale, decode_resized, encode_png, resize_square, scale_to_8bit
from cxr_spark.core.image_formats import PNG_SIGNATURE, PNG_TAIL_BYTES, ImageError, check_png_end, png_header


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


def test_palette_and_colour_pngs_decode_to_the_gray_pillow_computes():
    gray = np.random.default_rng(3).integers(0, 256, (16, 24), dtype=np.uint8)
    for mode in ("P", "RGB", "RGBA"):
        image = Image.fromarray(gray).convert(mode)
        expected = np.asarray(image.convert("L"))  # Pillow's own palette lookup and luma
        decoded = decode_grayscale(pillow_bytes(image))
        assert decoded.shape == gray.shape and np.abs(decoded.astype(int) - expected).max() <= 1, mode


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


def test_the_box_factor_is_the_largest_shrink_that_divides_both_sides():
    from cxr_spark.core.image_codec import _box_factor

    for height, width, size in [(1024, 1024, 224), (1000, 1000, 224), (1023, 1024, 224), (672, 672, 224),
                                (1024, 768, 256), (900, 1200, 100), (224, 224, 224), (100, 100, 224), (30, 45, 5)]:
        brute = max([k for k in range(2, min(height, width) // size + 1) if height % k == 0 and width % k == 0],
                    default=1)
        assert _box_factor(height, width, size) == brute, (height, width, size)


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
