"""Each pure feature family against an independent numpy/scipy computation. No Spark."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage, stats

from cxr_spark.core import image_features as fx


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
    """Six 24-pixel images: uniform noise, a smooth ramp with noise, dark, bright, constant and a step."""
    rng = np.random.default_rng(5)
    ramp = np.add.outer(np.arange(24), np.arange(24)) * 5
    images = [rng.integers(0, 256, (24, 24)), np.clip(ramp + rng.integers(-20, 20, (24, 24)), 0, 255),
              rng.integers(0, 40, (24, 24)), rng.integers(200, 256, (24, 24)), np.full((24, 24), 77),
              np.where(np.arange(24)[None, :] < 12, 30, 220).repeat(24, axis=0)]
    return np.stack(images).astype(np.uint8)


def test_histogram_equals_numpy_histogram(stack):
    got = fx.intensity_histogram(stack)
    for image, row in zip(stack, got):
        counts, _ = np.histogram(image, bins=32, range=(0, 256))
        np.testing.assert_allclose(row, counts / image.size, rtol=0, atol=1e-15)


def test_moments_equal_scipy(stack):
    got = fx.intensity_moments(stack)
    for image, (mean, std, skewness, kurtosis, entropy) in zip(stack, got):
        x = image.ravel() / 255.0
        assert mean == pytest.approx(np.mean(x), abs=1e-12) and std == pytest.approx(np.std(x), abs=1e-12)
        if np.ptp(x) == 0:
            assert skewness == 0 and kurtosis == 0  # undefined for a constant image: kept finite
        else:
            assert skewness == pytest.approx(stats.skew(x), abs=1e-9)
            assert kurtosis == pytest.approx(stats.kurtosis(x, fisher=True, bias=True), abs=1e-9)
        assert entropy == pytest.approx(stats.entropy(np.bincount(image.ravel(), minlength=256), base=2), abs=1e-9)


def test_percentiles_equal_scipy(stack):
    got = fx.intensity_percentiles(stack)
    for image, row in zip(stack, got):
        expected = [stats.scoreatpercentile(image.ravel() / 255.0, q) for q in (5, 25, 50, 75, 95)]
        np.testing.assert_allclose(row, expected, atol=1e-12)


def test_gradient_statistics_equal_scipy_sobel_on_the_interior(stack):
    got = fx.gradient_statistics(stack)
    for image, row in zip(stack, got):
        x = image / 255.0
        d_x = ndimage.sobel(x, axis=1)[1:-1, 1:-1]  # the border depends on a padding rule; the interior does not
        d_y = ndimage.sobel(x, axis=0)[1:-1, 1:-1]
        magnitude = np.sqrt(d_x ** 2 + d_y ** 2)
        expected = [magnitude.mean(), magnitude.std(), stats.scoreatpercentile(magnitude.ravel(), 90),
                    np.count_nonzero(magnitude > fx.EDGE_THRESHOLD) / magnitude.size,
                    np.abs(d_x).mean(), np.abs(d_y).mean()]
        np.testing.assert_allclose(row, expected, atol=1e-12)
    assert got[5, 4] > 0 and got[5, 5] == 0  # a vertical edge: horizontal derivative only


def _naive_glcm(image: np.ndarray) -> np.ndarray:
    levels = image // 16
    counts = np.zeros((16, 16))
    rows, cols = levels.shape
    for r in range(rows):
        for c in range(cols):
            for dr, dc in ((0, 1), (1, 0)):
                if r + dr < rows and c + dc < cols:
                    a, b = levels[r, c], levels[r + dr, c + dc]
                    counts[a, b] += 1
                    counts[b, a] += 1
    return counts / counts.sum()


def test_glcm_statistics_equal_a_pixel_loop(stack):
    got = fx.glcm_statistics(stack)
    for image, (contrast, homogeneity, energy, correlation, entropy) in zip(stack, got):
        glcm = _naive_glcm(image)
        np.testing.assert_allclose(fx.cooccurrence(image)[0], glcm, atol=1e-15)
        i, j = np.indices(glcm.shape)
        assert contrast == pytest.approx((glcm * (i - j) ** 2).sum(), abs=1e-12)
        assert homogeneity == pytest.approx((glcm / (1 + (i - j) ** 2)).sum(), abs=1e-12)
        assert energy == pytest.approx(np.sqrt((glcm ** 2).sum()), abs=1e-12)
        nonzero = glcm[glcm > 0]
        assert entropy == pytest.approx(-(nonzero * np.log2(nonzero)).sum(), abs=1e-12)
        rows, cols = i.ravel(), j.ravel()
        weights = glcm.ravel()
        if np.count_nonzero(np.bincount(rows, weights=weights)) > 1:
            expected = np.cov(rows, cols, aweights=weights, bias=True)
            assert correlation == pytest.approx(expected[0, 1] / np.sqrt(expected[0, 0] * expected[1, 1]), abs=1e-9)
        else:
            assert correlation == 1.0


def test_lung_regions_tile_the_lung_box_as_documented():
    for size in (16, 32, 100, 224):
        regions = fx.lung_regions(size)
        covered = np.zeros((size, size), int)
        for r0, r1, c0, c1 in regions.values():
            assert r1 > r0 and c1 > c0
            covered[r0:r1, c0:c1] += 1
        box = np.zeros((size, size), int)
        box[round(0.12 * size):round(0.78 * size), round(0.12 * size):round(0.88 * size)] = 1
        np.testing.assert_array_equal(covered, box)  # disjoint, and exactly the documented lung box
        strip = regions["mediastinum"]
        assert (strip[2], strip[3]) == (round(0.43 * size), round(0.57 * size))
    with pytest.raises(ValueError, match="at least 16px"):
        fx.lung_regions(8)


def test_region_statistics_equal_numpy_slices_and_see_one_bright_region():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 60, (64, 64)).astype(np.uint8)
    regions = fx.lung_regions(64)
    r0, r1, c0, c1 = regions["image_right_lower"]
    image[r0:r1, c0:c1] = 250
    row = fx.region_statistics(image)[0]
    values = dict(zip(fx.FAMILY_NAMES["regions"], row))
    for name, (a, b, c, d) in regions.items():
        patch = image[a:b, c:d] / 255.0
        assert values[f"{name}_mean"] == pytest.approx(patch.mean(), abs=1e-12)
        assert values[f"{name}_std"] == pytest.approx(patch.std(), abs=1e-12)
    brightest = max(fx.REGION_NAMES, key=lambda name: values[f"{name}_mean"])
    assert brightest == "image_right_lower"
    assert values["asym_lower"] == pytest.approx(abs(values["image_left_lower_mean"] - values["image_right_lower_mean"]))
    assert values["asym_lower"] > 0.5 > max(values["asym_upper"], values["asym_middle"])


def test_feature_vector_is_the_families_in_the_named_order(stack):
    matrix = fx.image_features(stack)
    assert matrix.shape == (len(stack), len(fx.FEATURE_NAMES)) and np.isfinite(matrix).all()
    assert len(set(fx.FEATURE_NAMES)) == len(fx.FEATURE_NAMES)
    np.testing.assert_array_equal(fx.image_features(stack[1]), matrix[1])  # a batch changes nothing
    index = fx.FEATURE_NAMES.index
    image = stack[0] / 255.0
    assert matrix[0, index("mean")] == pytest.approx(image.mean())
    assert matrix[0, index("p50")] == pytest.approx(np.median(image))
    assert matrix[0, index("hist_31")] == pytest.approx(np.count_nonzero(stack[0] >= 248) / stack[0].size)


def test_the_smallest_documented_size_has_features_and_one_pixel_less_is_refused():
    rng = np.random.default_rng(16)
    matrix = fx.image_features(rng.integers(0, 256, (2, 16, 16)).astype(np.uint8))  # "at least 16px"
    assert matrix.shape == (2, len(fx.FEATURE_NAMES)) and np.isfinite(matrix).all()
    with pytest.raises(ValueError, match="got 15px"):
        fx.image_features(np.zeros((15, 15), np.uint8))


@pytest.mark.parametrize("bad, message", [(np.zeros((8, 8), np.uint8), "at least 16px"),
                                          (np.zeros((20, 24), np.uint8), "square"),
                                          (np.zeros((20, 20), np.float32), "uint8")])
def test_bad_images_are_refused_with_the_reason(bad, message):
    with pytest.raises(ValueError, match=message):
        fx.image_features(bad)
