"""Grad-CAM heatmaps (Selvaraju et al., ICCV 2017) for the highest-scoring images of each finding, and
how often their peaks fall inside NIH's hand-drawn boxes.

For one image and one finding the heatmap is ``ReLU(sum_c alpha_c A_c)`` over the feature maps ``A`` of
one layer, where ``alpha_c`` is the spatial mean of ``d score / d A_c``. The score is the finding's logit:
the model's output with its sigmoid taken off (the sigmoid only rescales every gradient of an image by
the same factor, and that factor is zero for a probability that rounds to 1). The layer, unless one is
named, is the deepest spatial feature map: the last layer with a 4-D output, pooling layers aside, at or
after the last convolution, nested backbones included (``relu4`` in small_cnn, ``conv4`` in alexnet,
``relu`` in densenet121, ``post_relu`` in resnet50v2).

The peak is the heatmap's hottest cell (the first in row-major order on ties) and its position is the
centre of that cell mapped onto the image as ingested: ``width`` × ``height`` pixels as the images dataset
records them, which for NIH's download are the 1024-pixel PNGs its ``BBox_List_2017.csv`` is drawn on. A
peak is in a box ``[x, y, w, h]`` when ``x <= px <= x + w`` and ``y <= py <= y + h``. A heatmap that is zero
everywhere has no peak and counts as outside.

Selection and reading are Spark jobs that bring few rows to the driver: the top-k images of each finding
by probability (a window over the exploded probabilities), the scored images with a box for a finding
the model predicts (a join with the small bbox table), then only those images from the images dataset (a
filter on ``image_id``). The heatmaps are computed on the driver with ``tf.GradientTape``, in batches.
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import wraps
from typing import Iterator, Sequence

import numpy as np
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from cxr_spark.core.normalization import model_inputs
from cxr_spark.datasets.bbox import BBOX_DIR, read_bbox
from cxr_spark.datasets.fields import decode_column
from cxr_spark.datasets.images import images_schema
from cxr_spark.datasets.model_card import MODEL_FILE, load_model_bytes, load_model_card
from cxr_spark.datasets.predictions import long_form
from cxr_spark.io.storage import FileSystem, read_bytes, read_json, to_url
from cxr_spark.stages.report.overlays import hit_fraction, in_boxes, overlay_path, overlay_png, peak_point

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 3
DEFAULT_MAX_BOXED = 100  # boxed images per finding whose peaks are checked (the highest-scoring first)
BATCH_SIZE = 16


@dataclass(frozen=True)
class GradcamRequest:
    """What ``cxr-spark report`` was asked for. ``images`` and ``model`` default to what the predictions
    were scored from (their manifest); ``bbox`` to ``<raw>/_bbox`` of the raw dataset behind ``images``."""

    images: str | None = None
    model: str | None = None
    bbox: str | None = None
    top_k: int = DEFAULT_TOP_K
    layer: str | None = None
    max_boxed: int = DEFAULT_MAX_BOXED


@dataclass
class GradcamResult:
    summary: dict  # metrics.json's "gradcam"
    overlays: dict[str, bytes] = field(default_factory=dict)  # path inside the report folder -> PNG bytes
    inputs: dict[str, str] = field(default_factory=dict)  # what was read, for the report's manifest


# ---------------------------------------------------------------------------------------------
# Grad-CAM for a Keras model


_POOLING = ("MaxPooling2D", "AveragePooling2D", "GlobalMaxPooling2D", "GlobalAveragePooling2D")
_CONVOLUTIONS = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D")


def _layers(model) -> Iterator:
    """Every layer, nested models' layers in their place (depth first), the nested models themselves left out."""
    import tensorflow as tf

    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            yield from _layers(layer)
        else:
            yield layer


def _is_spatial(layer) -> bool:
    try:
        shape = layer.output_shape
    except (AttributeError, RuntimeError, ValueError):
        return False
    return isinstance(shape, tuple) and len(shape) == 4


def _is_a(layer, names: tuple[str, ...]) -> bool:
    import tensorflow as tf

    return isinstance(layer, tuple(getattr(tf.keras.layers, name) for name in names))


def feature_layer(model, name: str | None = None):
    """The layer Grad-CAM differentiates: ``name``, else the deepest spatial feature map (module doc)."""
    layers = list(_layers(model))
    spatial = [layer for layer in layers if _is_spatial(layer)]
    if name is not None:
        found = [layer for layer in spatial if layer.name == name]
        if not found:
            raise ValueError(f"model {model.name} has no layer {name!r} with a 4-D (batch, height, width, channels) "
                             f"output; its spatial layers: {', '.join(layer.name for layer in spatial)}")
        return found[0]
    convolutions = [i for i, layer in enumerate(layers) if _is_a(layer, _CONVOLUTIONS)]
    if not convolutions:
        raise ValueError(f"model {model.name} has no convolution layer to take Grad-CAM heatmaps from")
    return [layer for layer in layers[convolutions[-1]:] if _is_spatial(layer) and not _is_a(layer, _POOLING)][-1]


@contextmanager
def _recording(layer, head):
    """While open, ``layer``'s outputs are appended to the list yielded, and ``head`` (the output layer)
    has its sigmoid taken off when it has one; both are put back on leaving.

    Keras calls ``layer.call`` on each eager forward pass, nested models included, so overriding it on
    the instance reaches a layer inside a nested backbone, which ``Model(inputs, layer.output)`` cannot
    (the layer's output belongs to the backbone's own graph, disconnected from the outer inputs).
    """
    seen: list = []
    original = layer.call

    @wraps(original)
    def recording_call(*args, **kwargs):
        outputs = original(*args, **kwargs)
        seen.append(outputs)
        return outputs

    sigmoid = getattr(head, "activation", None)
    logits = getattr(sigmoid, "__name__", None) == "sigmoid"
    layer.call = recording_call
    if logits:
        import tensorflow as tf

        head.activation = tf.keras.activations.linear
    try:
        yield seen, logits
    finally:
        del layer.call
        if logits:
            head.activation = sigmoid


class GradCam:
    """Grad-CAM heatmaps of one Keras model (``(N, H, W, 1)`` inputs, one output per finding)."""

    def __init__(self, model, layer: str | None = None):
        self.model = model
        self.layer = feature_layer(model, layer)
        self.head = model.get_layer(model.output_names[0])
        self.target = "logit" if getattr(getattr(self.head, "activation", None), "__name__", None) == "sigmoid" \
            else "output"

    def __call__(self, inputs: np.ndarray, outputs: Sequence[int], batch_size: int = BATCH_SIZE) -> np.ndarray:
        """``(N, h, w)`` heatmaps (not rescaled): row ``i`` for image ``inputs[i]`` and output ``outputs[i]``."""
        import tensorflow as tf

        maps = []
        with _recording(self.layer, self.head) as (seen, _):
            for start in range(0, len(inputs), batch_size):
                images = tf.convert_to_tensor(inputs[start:start + batch_size], tf.float32)
                index = tf.constant(list(outputs[start:start + batch_size]), tf.int32)
                seen.clear()
                with tf.GradientTape() as tape:
                    tape.watch(images)  # the whole forward pass is recorded, whatever holds variables
                    scores = tf.gather(self.model(images, training=False), index[:, None], axis=1, batch_dims=1)
                if len(seen) != 1:
                    raise ValueError(f"layer {self.layer.name} ran {len(seen)} times in one forward pass; "
                                     "name a layer that runs once (--gradcam-layer)")
                # in inference mode the images of a batch do not interact: the gradient of the sum is each
                # image's own gradient
                features = seen[0]
                gradients = tape.gradient(scores, features)
                weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
                maps.append(tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy())
        return np.concatenate(maps) if maps else np.zeros((0, 0, 0), np.float32)


# ---------------------------------------------------------------------------------------------
# peaks, boxes and overlays (pure)


# ---------------------------------------------------------------------------------------------
# selection and reading (Spark)


def top_scored(predictions: DataFrame, k: int) -> list:
    """The ``k`` highest-scoring images of each label index (ties by image id): image_id, split, label, y, p, rank."""
    ranked = long_form(predictions, "image_id", "split").withColumn("rank", F.row_number().over(
        Window.partitionBy("label").orderBy(F.col("p").desc(), "image_id")))
    return ranked.where(F.col("rank") <= k).select(
        "image_id", "split", "label", "y", F.col("p").cast("double").alias("p"), "rank").collect()


def bbox_table(spark: SparkSession, source: str) -> DataFrame:
    """``image_id, finding, x, y, w, h`` from ``BBox_List_2017.csv[.gz]`` (parsed as ingest parses it, its
    unusable rows left out), or from the Parquet table ingest writes (``<raw>/_bbox``, or the raw dataset)."""
    url = to_url(source)
    if re.search(r"(?i)\.csv(\.gz)?$", url):
        table = read_bbox(spark, url).where("reason IS NULL")
    else:
        table = spark.read.parquet(f"{url}/{BBOX_DIR}" if FileSystem(spark, url).exists(f"{url}/{BBOX_DIR}") else url)
    return table.select("image_id", "finding", *(F.col(c).cast("double").alias(c) for c in "xywh"))


def default_bbox(spark: SparkSession, images_url: str) -> str | None:
    """``<raw>/_bbox`` of the raw dataset ``images_url`` was preprocessed from, when ingest wrote one."""
    try:
        raw = read_json(spark, f"{images_url}/_manifest.json")["inputs"]["raw"]["url"]
    except (OSError, ValueError, KeyError, TypeError, AnalysisException):
        return None
    candidate = f"{raw}/{BBOX_DIR}"
    return candidate if FileSystem(spark, candidate).exists(candidate) else None


def boxed_scored(predictions: DataFrame, boxes: DataFrame, labels: list[str], limit: int) -> tuple[list, dict]:
    """The scored images with a box for a finding the model predicts, at most ``limit`` per finding (the
    highest-scoring first): image_id, split, label, p, boxes (a list of [x, y, w, h]); and how many such
    images each finding has in all."""
    per_image = boxes.groupBy("image_id", "finding").agg(F.collect_list(F.array("x", "y", "w", "h")).alias("boxes"))
    index = F.create_map(*[F.lit(value) for i, name in enumerate(labels) for value in (name, i)])
    joined = (predictions.select("image_id", "split", "probabilities").join(F.broadcast(per_image), "image_id")
              .withColumn("label", index[F.col("finding")]).where(F.col("label").isNotNull())
              .withColumn("p", F.element_at("probabilities", F.col("label") + 1).cast("double")))
    ranked = joined.select(
        "image_id", "split", "label", "p", "boxes",
        F.row_number().over(Window.partitionBy("label").orderBy(F.col("p").desc(), "image_id")).alias("rank"),
        F.count("*").over(Window.partitionBy("label")).alias("n_boxed"))
    rows = ranked.where(F.col("rank") <= max(limit, 1)).collect()  # rank 1 carries the count even for limit 0
    return [row for row in rows if row["rank"] <= limit], {labels[row["label"]]: int(row["n_boxed"]) for row in rows}


def read_films(spark: SparkSession, images_url: str, wanted: dict[str, str], size: int) -> dict[str, tuple]:
    """``image_id -> (pixels, width, height)`` for the ids in ``wanted`` (id -> split), read with a filter."""
    rows = (spark.read.parquet(images_url)
            .where(F.col("split").isin(sorted(set(wanted.values()))) & F.col("image_id").isin(sorted(wanted)))
            .select("image_id", "image", "width", "height").collect())
    missing = sorted(set(wanted) - {row["image_id"] for row in rows})
    if missing:
        raise ValueError(f"the images dataset {images_url} lacks {len(missing)} scored image(s), e.g. {missing[:3]}; "
                         "give the images dataset the predictions were scored from (--images-dataset)")
    pixels = decode_column(images_schema(size), "image", [row["image"] for row in rows])
    shapes = {film.shape for film in pixels} - {(size, size)}
    if shapes:
        raise ValueError(f"the model takes {size}px images but {images_url} holds images of shape {shapes.pop()}")
    return {row["image_id"]: (film, row["width"], row["height"]) for row, film in zip(rows, pixels)}


# ---------------------------------------------------------------------------------------------
# the report's Grad-CAM part


def _skipped(reason: str) -> GradcamResult:
    log.info("Grad-CAM skipped: %s", reason)
    return GradcamResult({"status": "skipped", "reason": reason})


def run(spark: SparkSession, predictions_url: str, manifest: dict, request: GradcamRequest | None) -> GradcamResult:
    """Grad-CAM for the report, or the reason it was skipped (nothing asked for, or nothing to read)."""
    if request is None or not (request.images or request.model):
        return _skipped("not requested (cxr-spark report --images-dataset IMAGES_DIR and/or --model MODEL_DIR; the other "
                        "is taken from the predictions' manifest)")
    inputs = manifest.get("inputs") or {}
    images = request.images or (inputs.get("images") or {}).get("url")
    model = request.model or (inputs.get("model") or {}).get("url")
    if not images or not model:
        return _skipped(f"the predictions' manifest names no {'images dataset' if not images else 'model'}; "
                        f"give {'--images-dataset' if not images else '--model'}")
    if request.top_k < 0 or request.max_boxed < 0:
        raise ValueError(f"--gradcam-top-k and --gradcam-max-boxed must be >= 0 (got {request.top_k}, "
                         f"{request.max_boxed})")
    return explain(spark, predictions_url, manifest, to_url(images), to_url(model), request)


def explain(spark: SparkSession, predictions_url: str, manifest: dict, images_url: str, model_url: str,
            request: GradcamRequest) -> GradcamResult:
    """Heatmaps, overlays and per-finding bbox hit fractions for one predictions dataset (module doc)."""
    card = load_model_card(spark, model_url)
    labels, size = card["labels"], card["input_size"]
    scored = manifest.get("model") or {}
    if scored.get("labels", labels) != labels:
        raise ValueError(f"model {model_url} predicts {labels} but the predictions score {scored['labels']}")
    if scored.get("model_version", card["model_version"]) != card["model_version"]:
        log.warning("Grad-CAM explains model %s, but the predictions were scored by %s", card["model_version"],
                    scored["model_version"])
    predictions = spark.read.parquet(to_url(predictions_url))
    top = top_scored(predictions, request.top_k) if request.top_k else []
    bbox_source = to_url(request.bbox) if request.bbox else default_bbox(spark, images_url)
    boxed, boxed_counts = ([], {})
    if bbox_source:
        boxed, boxed_counts = boxed_scored(predictions, bbox_table(spark, bbox_source), labels, request.max_boxed)
    else:
        log.info("Grad-CAM: no bounding boxes (give --bbox, or ingest --bbox into the raw dataset behind %s); "
                 "hit fractions are n/a", images_url)
    pairs = sorted({(row["image_id"], row["label"]) for row in [*top, *boxed]})
    films = read_films(spark, images_url, {row["image_id"]: row["split"] for row in [*top, *boxed]}, size) \
        if pairs else {}
    # the driver's own copy, on all its cores (score's cached loader pins a worker's TensorFlow to one)
    cam = GradCam(load_model_bytes(read_bytes(f"{model_url}/{MODEL_FILE}")), request.layer)
    inputs = model_inputs(np.stack([films[image_id][0] for image_id, _ in pairs]), card["normalization"]) \
        if pairs else np.zeros((0, size, size, 1), np.float32)
    heatmaps = dict(zip(pairs, cam(inputs, [label for _, label in pairs])))
    log.info("Grad-CAM: %d heatmaps from layer %s of %s (%d images)", len(pairs), cam.layer.name,
             card["model_version"], len(films))

    def peak(image_id: str, label: int):
        _, width, height = films[image_id]
        return peak_point(heatmaps[(image_id, label)], width, height)

    boxes_of = {(row["image_id"], row["label"]): [list(box) for box in row["boxes"]] for row in boxed}
    overlays: dict[str, bytes] = {}
    per_label = {}
    for index, name in enumerate(labels):
        entries = []
        for row in sorted((row for row in top if row["label"] == index), key=lambda row: row["rank"]):
            image_id = row["image_id"]
            film, width, height = films[image_id]
            point, boxes = peak(image_id, index), boxes_of.get((image_id, index), [])
            path = overlay_path(name, image_id, set(overlays))
            overlays[path] = overlay_png(film, heatmaps[(image_id, index)], width=width, height=height, boxes=boxes,
                                         point=point)
            entries.append({"rank": row["rank"], "image_id": image_id, "probability": row["p"], "label": row["y"],
                            "peak": list(point) if point else None,
                            "peak_in_box": in_boxes(point, boxes) if boxes else None, "overlay": path})
        hits = [in_boxes(peak(row["image_id"], index), row["boxes"]) for row in boxed if row["label"] == index]
        per_label[name] = {"top": entries, "boxed_images_scored": boxed_counts.get(name, 0), **hit_fraction(hits)}
    summary = {"status": "computed", "method": "Grad-CAM (Selvaraju et al., ICCV 2017)", "model": model_url,
               "model_version": card["model_version"], "images": images_url, "layer": cam.layer.name,
               "target": cam.target, "top_k": request.top_k, "max_boxed_per_finding": request.max_boxed,
               "bbox": bbox_source, "per_label": per_label}
    return GradcamResult(summary, overlays, {"images": images_url, "model": model_url,
                                             **({"bbox": bbox_source} if bbox_source else {})})
