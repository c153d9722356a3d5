"""Features: a hand-crafted feature vector per image and a Spark MLlib logistic-regression baseline.

The pure part (no Spark) turns a stack of uint8 images ``(n, size, size)`` into an ``(n, k)`` float64
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

import argparse
import datetime as dt
import hashlib
import logging
import time
from multiprocessing.pool import ThreadPool

import numpy as np
import pandas as pd
from pyspark import inheritable_thread_target
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cxr_spark.config import FeaturesConfig, PipelineConfig, override
from cxr_spark.labels import LABELS
from cxr_spark.manifest import code_version, finish_manifest, input_version
from cxr_spark.metrics import DEFAULT_THRESHOLD, macro_average, tune_thresholds
from cxr_spark.report import label_metrics
from cxr_spark.schemas import decode_column, images_schema
from cxr_spark.score import PREDICTIONS_DDL
from cxr_spark.commit import atomic_output, settle
from cxr_spark.guards import UsageError, check_run
from cxr_spark.storage import read_json, to_url

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------
# Spark: the features dataset and the MLlib baseline

FEATURES_DDL = "image_id string, split string, labels array<smallint>, features array<double>"
BASELINE_MODEL = "mllib_logistic_regression"
MLLIB_FOLDER = "_mllib"  # inside the baseline predictions folder; Spark's readers skip "_" names
TRAIN_SPLIT, THRESHOLD_SPLIT, EVAL_SPLIT = "train", "val", "test"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in", dest="input", required=True, help="images_<size> dataset written by preprocess")
    parser.add_argument("--out", required=True, help="features dataset to write (replaced atomically)")
    parser.add_argument("--baseline-out", help="also train the MLlib baseline (one logistic regression per "
                                               "finding) on train, tune thresholds on val, and write its test "
                                               "predictions here, in score's format, with the fitted "
                                               f"models in {MLLIB_FOLDER}/ (replaced atomically)")
    parser.add_argument("--max-iter", type=int, help="logistic regression iterations (default from conf)")
    parser.add_argument("--reg-param", type=float, help="L2 regularisation of the baseline (default from conf)")
    parser.add_argument("--allow-empty", action="store_true",
                        help="write the output even when the input has no image (by default such a run fails and leaves --out as "
                             "it was)")


def check_args(args: argparse.Namespace) -> None:
    """The run's paths, before Spark starts (:func:`cxr_spark.guards.check_run`)."""
    check_run({"--in": args.input}, {"--out": (args.out, "features"),
                                     "--baseline-out": (args.baseline_out, "features-baseline")}, folders=("--in",))


def main(spark: SparkSession, args: argparse.Namespace, config: PipelineConfig) -> dict:
    settings = override(config.features, max_iter=args.max_iter, reg_param=args.reg_param)
    return features(spark, args.input, args.out, settings, baseline_out=args.baseline_out,
                    allow_empty=args.allow_empty)


def _features_partition(size: int):
    """The mapInPandas function: PNG-encoded images in, one feature array per image out."""
    schema = images_schema(size)

    def compute(batches):
        for frame in batches:
            images = decode_column(schema, "image", frame["image"])
            for image_id, image in zip(frame["image_id"], images):
                if image.shape != (size, size):
                    raise ValueError(f"{image_id}: image is {image.shape}, the dataset declares {size}x{size}")
            matrix = image_features(np.stack(images)) if images else np.zeros((0, len(FEATURE_NAMES)))
            yield pd.DataFrame({
                "image_id": frame["image_id"], "split": frame["split"],
                "labels": [row.astype(np.int16) for row in decode_column(schema, "labels", frame["labels"])],
                "features": list(matrix),
            })

    return compute


def _dataset_size(spark: SparkSession, url: str) -> int:
    try:
        return int(read_json(spark, f"{url}/_manifest.json")["counts"]["size"])
    except Exception as error:  # noqa: BLE001 - any missing or foreign manifest gets the same explanation
        raise ValueError(f"{url} is not an images_<size> dataset written by preprocess: its _manifest.json "
                         f"has no counts.size ({type(error).__name__}: {error})") from error


def features(spark: SparkSession, input_url: str, out: str, settings: FeaturesConfig,
             baseline_out: str | None = None, allow_empty: bool = False) -> dict:
    """Write the ``features`` dataset of ``images_<size>``, and the MLlib baseline when ``baseline_out``
    is given; returns the counts (images per split, number of features, baseline test macro AUROC)."""
    from pyspark.ml.functions import array_to_vector

    started = time.time()
    url, out_url = to_url(input_url), to_url(out)
    settle(spark, url)
    size = _dataset_size(spark, url)
    images = spark.read.parquet(url)
    n_images = images.count()
    if n_images == 0 and not allow_empty:
        raise UsageError(f"{url} has no image: nothing to compute; --out is left as it was "
                         f"(--allow-empty writes an empty features dataset)")
    vectors = (images.select("image_id", "split", "labels", "image")
               .mapInPandas(_features_partition(size), FEATURES_DDL)
               .withColumn("features", array_to_vector("features")))
    with atomic_output(spark, out_url, "features") as tmp:
        vectors.write.parquet(tmp)
        written = spark.read.parquet(tmp)
        by_split = {row["split"]: row["count"] for row in written.groupBy("split").count().collect()}
        counts = {"images": sum(by_split.values()), "splits": dict(sorted(by_split.items())),
                  "n_features": len(FEATURE_NAMES), "size": size}
        if counts["images"] != n_images:
            raise RuntimeError(f"features wrote {counts['images']} rows from {n_images} images in {url}")
        if baseline_out:
            features_input = {"url": out_url, "stage": "features", "code_version": code_version(),
                              "finished_at": "written by the same run"}
            baseline = train_baseline(spark, written, baseline_out, size, settings,
                                      {"features": features_input, "images": input_version(spark, url)})
            counts["baseline_test_macro_auroc"] = baseline["macro_auroc"]
        else:
            baseline = None
            log.info("no --baseline-out: only the features dataset is written")
        finish_manifest(spark, tmp, "features", started, config=settings, inputs={"images": input_version(spark, url)},
                        counts=counts, extra={"feature_names": list(FEATURE_NAMES),
                                              "lung_regions": {"fractions": {"rows": LUNG_ROWS,
                                                                             "columns": LUNG_COLUMNS,
                                                                             "mediastinum_columns": MEDIASTINUM_COLUMNS},
                                                               "pixels": lung_regions(size)}})
    return {**counts, **({"baseline": baseline} if baseline else {})}


def _class_weights(positives: int, total: int, balance: bool) -> tuple[float, float]:
    """(negative, positive) example weights: each class weighs half of the train set when balanced."""
    if not balance or positives in (0, total):
        return 1.0, 1.0
    return total / (2.0 * (total - positives)), total / (2.0 * positives)


def _probabilities(n_labels: int):
    from pyspark.ml.functions import vector_to_array

    return F.array(*[vector_to_array(F.col(f"probability_{i}"))[1] for i in range(n_labels)]).cast("array<float>")


def train_baseline(spark: SparkSession, vectors: DataFrame, out: str, size: int, settings: FeaturesConfig,
                   inputs: dict) -> dict:
    """Fit a standard scaler and one logistic regression per label on the train split of ``vectors``,
    tune thresholds on val, and write test predictions to ``out`` in ``score``'s format; returns counts."""
    from pyspark.ml import PipelineModel
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import StandardScaler

    started = time.time()
    n_labels = len(LABELS)
    train = vectors.where(F.col("split") == TRAIN_SPLIT)
    totals = train.agg(F.count("*").alias("n"),
                       *[F.sum(F.col("labels")[i]).alias(f"pos_{i}") for i in range(n_labels)]).first()
    n_train = int(totals["n"])
    if n_train == 0:
        raise ValueError(f"the baseline needs a {TRAIN_SPLIT!r} split; the features have none")
    positives = [int(totals[f"pos_{i}"] or 0) for i in range(n_labels)]
    scaler = StandardScaler(inputCol="features", outputCol="scaled", withMean=True, withStd=True).fit(train)
    targets = []
    for i, count in enumerate(positives):
        negative_weight, positive_weight = _class_weights(count, n_train, settings.balance_classes)
        targets += [F.col("labels")[i].cast("double").alias(f"y_{i}"),
                    F.when(F.col("labels")[i] == 1, positive_weight).otherwise(negative_weight).alias(f"w_{i}")]
    scaled_train = scaler.transform(train).select("scaled", *targets).cache()

    def fit(i: int):
        regression = LogisticRegression(
            featuresCol="scaled", labelCol=f"y_{i}", weightCol=f"w_{i}", maxIter=settings.max_iter,
            regParam=settings.reg_param, standardization=False, family="binomial",
            probabilityCol=f"probability_{i}", rawPredictionCol=f"raw_{i}", predictionCol=f"prediction_{i}")
        fitted = regression.fit(scaled_train)
        log.info("baseline %s: %d/%d train positives, %d iterations", LABELS[i], positives[i], n_train,
                 fitted.summary.totalIterations if positives[i] not in (0, n_train) else 0)
        return fitted

    try:
        # Each L-BFGS iteration is a tiny Spark job whose cost is mostly scheduling, so a few findings are
        # fitted at once from driver threads (as pyspark's OneVsRest does with its `parallelism`).
        with ThreadPool(max(1, settings.parallelism)) as pool:
            models = pool.map(inheritable_thread_target(fit), range(n_labels))
    finally:
        scaled_train.unpersist()
    model = PipelineModel(stages=[scaler, *models])
    digest = hashlib.sha256()
    for fitted in models:
        digest.update(fitted.coefficients.toArray().tobytes() + np.float64(fitted.intercept).tobytes())
    model_version = f"{BASELINE_MODEL}-{digest.hexdigest()[:12]}"

    scored = model.transform(vectors.where(F.col("split").isin(THRESHOLD_SPLIT, EVAL_SPLIT)))
    scored = scored.select("image_id", "split", "labels", _probabilities(n_labels).alias("probabilities"))
    # Only the validation rows' labels and probabilities (28 small numbers a row) reach the driver.
    val_rows = scored.where(F.col("split") == THRESHOLD_SPLIT).select("labels", "probabilities").collect()
    if val_rows:
        val_labels = np.array([row["labels"] for row in val_rows], np.int16)
        val_scores = np.array([row["probabilities"] for row in val_rows], np.float32)
        thresholds = tune_thresholds(val_labels, val_scores)
    else:
        log.warning("no %r rows: every baseline threshold is %s", THRESHOLD_SPLIT, DEFAULT_THRESHOLD)
        thresholds = [DEFAULT_THRESHOLD] * n_labels
    scored_at = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    predictions = (scored.where(F.col("split") == EVAL_SPLIT)
                   .withColumn("model_version", F.lit(model_version))
                   .withColumn("scored_at", F.lit(scored_at).cast("timestamp")))
    card = {"model_version": model_version, "model": BASELINE_MODEL, "task": "multilabel", "labels": list(LABELS),
            "input_size": size, "thresholds": dict(zip(LABELS, map(float, thresholds))),
            "feature_names": list(FEATURE_NAMES), "mllib_model": MLLIB_FOLDER,
            "train_positives": dict(zip(LABELS, positives))}
    with atomic_output(spark, out, "features-baseline") as tmp:
        predictions.write.parquet(tmp)
        model.write().save(f"{tmp}/{MLLIB_FOLDER}")
        written = spark.read.schema(PREDICTIONS_DDL + ", model_version string, scored_at timestamp").parquet(tmp)
        n_scored = written.count()
        macro_auroc = (macro_average(label_metrics(written, list(LABELS), thresholds)[0].values())["auroc"]
                       if n_scored else None)
        counts = {"scored": n_scored, "split": EVAL_SPLIT, "train": n_train, "val": len(val_rows),
                  "macro_auroc": macro_auroc}
        finish_manifest(spark, tmp, "features-baseline", started, config=settings, inputs=inputs, counts=counts,
                        extra={"model": card, "model_version": model_version})
    if n_scored == 0:
        log.warning("no %r rows: the baseline scored nothing", EVAL_SPLIT)
    return {**counts, "model_version": model_version}
