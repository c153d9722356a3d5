"""Image features: the hand-crafted feature vector of a chest film, in numpy only (no Spark).

:func:`image_features` turns a stack of uint8 images ``(n, size, size)`` into an ``(n, k)`` float64
matrix, one family of features at a time, vectorised over the stack so that one Arrow batch is one
numpy call per family. :data:`FEATURE_NAMES` is the single list of names, in vector order; it is saved
in the ``features`` dataset's manifest.

Families (pixel values are scaled to [0, 1] first, so features do not depend on the storage type):

``hist_00`` … ``hist_31``
    The intensity histogram: 32 equal bins of 8 grey levels each, normalised to sum to 1.
``mean``, ``std``, ``skewness``, ``kurtosis``, ``entropy``
    Moments of the pixel values (population std; skewness and Fisher's excess kurtosis from the
    biased central moments, as ``scipy.stats``; both 0 for a constant image) and the Shannon
    entropy, in bits, of the 256-level histogram.
``p05``, ``p25``, ``p50``, ``p75``, ``p95``
    Percentiles of the pixel values (linear interpolation, as ``numpy.percentile``).
``grad_mean``, ``grad_std``, ``grad_p90``, ``edge_fraction``, ``grad_x_mean``, ``grad_y_mean``
    Sobel gradient magnitude over the interior pixels (the one-pixel border has no full 3×3
    neighbourhood, so no border rule is invented): its mean, std and 90th percentile, the fraction of
    pixels above :data:`EDGE_THRESHOLD`, and the mean absolute horizontal and vertical derivatives.
``glcm_contrast``, ``glcm_homogeneity``, ``glcm_energy``, ``glcm_correlation``, ``glcm_entropy``
    Texture from a grey-level co-occurrence matrix: 16 levels, distance 1, the horizontal and
    vertical neighbour pairs pooled into one symmetric, normalised matrix. Definitions as
    scikit-image's ``graycoprops`` (energy is the square root of the angular second moment; the
    correlation of a constant image is 1).
``<region>_mean``, ``<region>_std`` and ``asym_<third>``
    Regional statistics of the lung fields, see :func:`lung_regions`.
"""
from __future__ import annotations

import numpy as np

MIN_SIZE = 16  # below this the lung-field thirds shrink to one or two pixel rows
HISTOGRAM_BINS = 32
PERCENTILES = (5, 25, 50, 75, 95)
EDGE_THRESHOLD = 0.5  # Sobel magnitude of a one-pixel step of 1/8 of the grey range (32 levels)
GLCM_LEVELS = 16

# Lung-field geometry, as fractions of the image side, for frontal films as NIH stores them (patient
# facing the viewer: the patient's right lung on the image's left). Chosen on the two real samples in
# shared/data: the lungs span rows ~12-78 % and columns ~12-88 %, the mediastinum columns ~43-57 %.
LUNG_ROWS = (0.12, 0.78)
LUNG_COLUMNS = (0.12, 0.88)
MEDIASTINUM_COLUMNS = (0.43, 0.57)
THIRDS = ("upper", "middle", "lower")
SIDES = ("image_left", "image_right")


def _edges(start: float, stop: float, size: int) -> tuple[int, int]:
    return round(start * size), round(stop * size)


def lung_regions(size: int) -> dict[str, tuple[int, int, int, int]]:
    """Fixed anatomical regions of a ``size``×``size`` frontal film: name -> (row0, row1, col0, col1).

    The lung box (rows :data:`LUNG_ROWS`, columns :data:`LUNG_COLUMNS`) is cut into the mediastinum
    strip (columns :data:`MEDIASTINUM_COLUMNS`) and the two lung fields on either side of it; each lung
    field is cut into upper, middle and lower thirds of the box's rows. The seven regions tile the lung
    box exactly (half-open pixel ranges).

    >>> lung_regions(100)["image_left_upper"]
    (12, 34, 12, 43)
    """
    if size < MIN_SIZE:
        raise ValueError(f"lung regions need images of at least {MIN_SIZE}px, got {size}px")
    top, bottom = _edges(*LUNG_ROWS, size)
    left, right = _edges(*LUNG_COLUMNS, size)
    strip_left, strip_right = _edges(*MEDIASTINUM_COLUMNS, size)
    cuts = [top + round((bottom - top) * k / 3) for k in range(4)]
    columns = {"image_left": (left, strip_left), "image_right": (strip_right, right)}
    regions = {f"{side}_{third}": (cuts[k], cuts[k + 1], *columns[side])
               for side in SIDES for k, third in enumerate(THIRDS)}
    regions["mediastinum"] = (top, bottom, strip_left, strip_right)
    return regions


REGION_NAMES = tuple(f"{side}_{third}" for side in SIDES for third in THIRDS) + ("mediastinum",)

FAMILY_NAMES: dict[str, tuple[str, ...]] = {
    "histogram": tuple(f"hist_{i:02d}" for i in range(HISTOGRAM_BINS)),
    "moments": ("mean", "std", "skewness", "kurtosis", "entropy"),
    "percentiles": tuple(f"p{q:02d}" for q in PERCENTILES),
    "gradient": ("grad_mean", "grad_std", "grad_p90", "edge_fraction", "grad_x_mean", "grad_y_mean"),
    "glcm": ("glcm_contrast", "glcm_homogeneity", "glcm_energy", "glcm_correlation", "glcm_entropy"),
    "regions": tuple(f"{name}_{stat}" for name in REGION_NAMES for stat in ("mean", "std"))
               + tuple(f"asym_{third}" for third in THIRDS),
}
#: Every feature name, in the order of the feature vector.
FEATURE_NAMES: tuple[str, ...] = tuple(name for names in FAMILY_NAMES.values() for name in names)


def as_stack(images: np.ndarray) -> np.ndarray:
    """A uint8 ``(size, size)`` image or ``(n, size, size)`` stack as a stack; anything else is an error."""
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[np.newaxis]
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"expected square images shaped (size, size) or (n, size, size), got {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {images.dtype}")
    if images.shape[1] < MIN_SIZE:
        raise ValueError(f"features need images of at least {MIN_SIZE}px, got {images.shape[1]}px")
    return images


def _unit(stack: np.ndarray) -> np.ndarray:
    return stack.astype(np.float64) / 255.0


def _per_image_counts(codes: np.ndarray, levels: int) -> np.ndarray:
    """Counts of each code 0..levels-1 per image of an ``(n, ...)`` integer array, in one bincount."""
    n = codes.shape[0]
    offsets = (np.arange(n, dtype=np.int64) * levels).reshape((n,) + (1,) * (codes.ndim - 1))
    return np.bincount((codes.astype(np.int64) + offsets).ravel(), minlength=n * levels).reshape(n, levels)


def _entropy_bits(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits of each row of probabilities (0·log 0 = 0)."""
    logs = np.log2(probabilities, out=np.zeros_like(probabilities), where=probabilities > 0)
    return -(probabilities * logs).sum(axis=1)


def intensity_histogram(stack: np.ndarray) -> np.ndarray:
    """``(n, 32)``: the fraction of each image's pixels in each band of 8 grey levels."""
    stack = as_stack(stack)
    counts = _per_image_counts(stack >> 3, HISTOGRAM_BINS)  # 256 levels / 32 bins = 8 levels a bin
    return counts / float(stack.shape[1] * stack.shape[2])


def intensity_moments(stack: np.ndarray) -> np.ndarray:
    """``(n, 5)``: mean, std, skewness, excess kurtosis of the [0, 1] pixels and entropy (bits)."""
    stack = as_stack(stack)
    pixels = _unit(stack).reshape(len(stack), -1)
    mean = pixels.mean(axis=1)
    centred = pixels - mean[:, None]
    m2, m3, m4 = ((centred ** k).mean(axis=1) for k in (2, 3, 4))
    flat = m2 <= 0  # a constant image: shape moments are undefined; 0 keeps the vector finite
    safe = np.where(flat, 1.0, m2)
    skewness = np.where(flat, 0.0, m3 / safe ** 1.5)
    kurtosis = np.where(flat, 0.0, m4 / safe ** 2 - 3.0)
    levels = _per_image_counts(stack, 256) / float(pixels.shape[1])
    return np.column_stack([mean, np.sqrt(m2), skewness, kurtosis, _entropy_bits(levels)])


def intensity_percentiles(stack: np.ndarray) -> np.ndarray:
    """``(n, 5)``: the 5th, 25th, 50th, 75th and 95th percentiles of the [0, 1] pixels."""
    stack = as_stack(stack)
    return np.percentile(_unit(stack).reshape(len(stack), -1), PERCENTILES, axis=1).T


def sobel_gradients(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal and vertical Sobel derivatives of the [0, 1] pixels, interior only: ``(n, s-2, s-2)``."""
    x = _unit(as_stack(stack))
    smooth_rows = x[:, :-2, :] + 2 * x[:, 1:-1, :] + x[:, 2:, :]  # [1 2 1] down the columns
    smooth_cols = x[:, :, :-2] + 2 * x[:, :, 1:-1] + x[:, :, 2:]  # [1 2 1] along the rows
    d_x = smooth_rows[:, :, 2:] - smooth_rows[:, :, :-2]
    d_y = smooth_cols[:, 2:, :] - smooth_cols[:, :-2, :]
    return d_x, d_y


def gradient_statistics(stack: np.ndarray) -> np.ndarray:
    """``(n, 6)``: Sobel magnitude mean, std, 90th percentile, edge fraction; mean |d/dx| and |d/dy|."""
    d_x, d_y = sobel_gradients(stack)
    n = len(d_x)
    magnitude = np.hypot(d_x, d_y).reshape(n, -1)
    return np.column_stack([
        magnitude.mean(axis=1), magnitude.std(axis=1), np.percentile(magnitude, 90, axis=1),
        (magnitude > EDGE_THRESHOLD).mean(axis=1),
        np.abs(d_x).reshape(n, -1).mean(axis=1), np.abs(d_y).reshape(n, -1).mean(axis=1),
    ])


def cooccurrence(stack: np.ndarray) -> np.ndarray:
    """``(n, 16, 16)``: symmetric, normalised grey-level co-occurrence at distance 1 (right and down)."""
    levels = as_stack(stack) >> 4  # 256 grey levels to 16
    n = len(levels)
    pairs = [(levels[:, :, :-1], levels[:, :, 1:]), (levels[:, :-1, :], levels[:, 1:, :])]
    codes = np.concatenate([(a.astype(np.int64) * GLCM_LEVELS + b).reshape(n, -1) for a, b in pairs], axis=1)
    counts = _per_image_counts(codes, GLCM_LEVELS ** 2).reshape(n, GLCM_LEVELS, GLCM_LEVELS).astype(np.float64)
    counts += counts.transpose(0, 2, 1)  # each pair counted in both orders: direction does not matter
    return counts / counts.sum(axis=(1, 2), keepdims=True)


def glcm_statistics(stack: np.ndarray) -> np.ndarray:
    """``(n, 5)``: contrast, homogeneity, energy, correlation and entropy (bits) of :func:`cooccurrence`."""
    glcm = cooccurrence(stack)
    i, j = np.meshgrid(np.arange(GLCM_LEVELS, dtype=np.float64), np.arange(GLCM_LEVELS, dtype=np.float64),
                       indexing="ij")
    contrast = (glcm * (i - j) ** 2).sum(axis=(1, 2))
    homogeneity = (glcm / (1.0 + (i - j) ** 2)).sum(axis=(1, 2))
    energy = np.sqrt((glcm ** 2).sum(axis=(1, 2)))
    mu = (glcm * i).sum(axis=(1, 2))  # the matrix is symmetric: row and column means are equal
    variance = (glcm * (i - mu[:, None, None]) ** 2).sum(axis=(1, 2))
    covariance = (glcm * (i - mu[:, None, None]) * (j - mu[:, None, None])).sum(axis=(1, 2))
    flat = variance <= 1e-15
    correlation = np.where(flat, 1.0, covariance / np.where(flat, 1.0, variance))
    return np.column_stack([contrast, homogeneity, energy, correlation,
                            _entropy_bits(glcm.reshape(len(glcm), -1))])


def region_statistics(stack: np.ndarray) -> np.ndarray:
    """``(n, 17)``: mean and std of the [0, 1] pixels in each of :func:`lung_regions`, in
    :data:`REGION_NAMES` order, then |image-left mean - image-right mean| for each third."""
    x = _unit(as_stack(stack))
    regions = lung_regions(x.shape[1])
    columns, means = [], {}
    for name in REGION_NAMES:
        r0, r1, c0, c1 = regions[name]
        patch = x[:, r0:r1, c0:c1].reshape(len(x), -1)
        means[name] = patch.mean(axis=1)
        columns += [means[name], patch.std(axis=1)]
    columns += [np.abs(means[f"image_left_{third}"] - means[f"image_right_{third}"]) for third in THIRDS]
    return np.column_stack(columns)


FAMILIES = {
    "histogram": intensity_histogram,
    "moments": intensity_moments,
    "percentiles": intensity_percentiles,
    "gradient": gradient_statistics,
    "glcm": glcm_statistics,
    "regions": region_statistics,
}


def image_features(images: np.ndarray) -> np.ndarray:
    """The feature matrix ``(n, len(FEATURE_NAMES))`` of a stack (or ``(k,)`` of a single image).

    >>> image_features(np.zeros((32, 32), np.uint8)).shape == (len(FEATURE_NAMES),)
    True
    """
    single = np.asarray(images).ndim == 2
    stack = as_stack(images)
    matrix = np.concatenate([FAMILIES[family](stack) for family in FAMILY_NAMES], axis=1)
    return matrix[0] if single else matrix
