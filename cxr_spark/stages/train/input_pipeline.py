"""The training input pipeline: augmentation and per-rank Petastorm epochs, normalised on the way into
the model by :mod:`cxr_spark.core.normalization` (what scoring applies too).

The shard contract (tested): rank ``r`` of ``n`` reads only Petastorm's shard ``r`` of the split (whole
row groups, ``index % n == r``), so across ranks every row is in exactly one shard. Each epoch opens a
fresh one-pass reader over the shard and stops after ``steps`` full batches; ``steps`` is the same on every
rank (the smallest shard decides), so every training image is seen at most once per epoch and the images
not seen are the documented remainder ``n_train - steps * batch * n``, a different random set each epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from cxr_spark.core.normalization import model_inputs


@dataclass(frozen=True)
class Augmentation:
    """Random affine augmentation for chest films, applied to the train split only.

    The defaults follow the seed paper's table (horizontal shift 0.15, vertical shift 0.2, rotation,
    shear, zoom, crop-and-pad) with anatomy-safe bounds: rotations and shears of a few degrees (films are
    taken upright), zoom within 10% and **no flips by default**: a left-right flip turns a normal heart
    into dextrocardia and moves findings to the other lung, so it is opt-in. Pixels shifted in from
    outside the film are black, as on a cropped-and-padded film.
    """

    rotation_deg: float = 7.0
    shift_x: float = 0.15
    shift_y: float = 0.2
    shear_deg: float = 5.0
    zoom: float = 0.1
    horizontal_flip: bool = False
    enabled: bool = True
    fill_mode: str = "nearest"  # what is shifted in: "nearest" edge pixels (Keras' default) or "constant" black


def affine_matrix(size: int, rotation_deg: float, shift_x: float, shift_y: float, shear_deg: float,
                  zoom: float, flip: bool) -> np.ndarray:
    """The 3×3 matrix mapping OUTPUT pixel (x, y, 1) to the INPUT pixel it samples (about the centre).

    Shifts are fractions of the side; ``zoom`` > 1 magnifies. Used by :func:`augment_batch` and tests.
    """
    centre = (size - 1) / 2.0
    theta, shear = math.radians(rotation_deg), math.radians(shear_deg)
    to_centre = np.array([[1, 0, -centre], [0, 1, -centre], [0, 0, 1]], np.float64)
    back = np.array([[1, 0, centre], [0, 1, centre], [0, 0, 1]], np.float64)
    rotate = np.array([[math.cos(theta), -math.sin(theta), 0], [math.sin(theta), math.cos(theta), 0], [0, 0, 1]])
    skew = np.array([[1, -math.sin(shear), 0], [0, math.cos(shear), 0], [0, 0, 1]])
    scale = np.diag([1 / zoom, 1 / zoom, 1.0])
    mirror = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    shift = np.array([[1, 0, -shift_x * size], [0, 1, -shift_y * size], [0, 0, 1]], np.float64)
    return back @ mirror @ scale @ skew @ rotate @ to_centre @ shift


def random_warp(rng: np.random.Generator, params: Augmentation) -> dict:
    """One image's warp, the keyword arguments of :func:`affine_matrix`: each parameter uniform in
    ``[-bound, bound]`` (zoom in ``[1 - zoom, 1 + zoom]``), a flip with probability 1/2 when allowed."""
    return {"rotation_deg": rng.uniform(-params.rotation_deg, params.rotation_deg),
            "shift_x": rng.uniform(-params.shift_x, params.shift_x),
            "shift_y": rng.uniform(-params.shift_y, params.shift_y),
            "shear_deg": rng.uniform(-params.shear_deg, params.shear_deg),
            "zoom": rng.uniform(1 - params.zoom, 1 + params.zoom),
            "flip": bool(params.horizontal_flip and rng.random() < 0.5)}


# Keras' ImageDataGenerator (the seed papers) fills with "nearest" by default. Black ("constant") borders
# shift the train images' pixel statistics away from the unaugmented validation films (measured on the
# demo: 16% of pixels black, mean 103 -> 93), which batch normalisation then carries into evaluation.
FILL_MODES = {"nearest": 1, "constant": 0}  # cv2.BORDER_REPLICATE, cv2.BORDER_CONSTANT


def augment_batch(images: np.ndarray, rng: np.random.Generator, params: Augmentation) -> np.ndarray:
    """Augment a (N, H, W) uint8 batch: one random affine warp per image (bilinear; borders filled by
    ``params.fill_mode``)."""
    import cv2

    if not params.enabled or len(images) == 0:
        return images
    if params.fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode {params.fill_mode!r}: expected one of {sorted(FILL_MODES)}")
    border = FILL_MODES[params.fill_mode]
    size = images.shape[1]
    out = np.empty_like(images)
    for i, image in enumerate(images):
        matrix = affine_matrix(size, **random_warp(rng, params))
        out[i] = cv2.warpAffine(image, matrix[:2], (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=border, borderValue=0)
    return out


# ---------------------------------------------------------------------------------------------
# Petastorm epochs per rank


def _reader(url: str, fields: list[str], split: str, rank: int | None, size: int | None, seed: int | None):
    from petastorm import make_reader

    # One pass, single-threaded pool: petastorm 0.13.1's thread pool can end a one-epoch read early
    # (uber/petastorm#71). Decoding small stored PNGs is not the bottleneck.
    return make_reader(url, schema_fields=fields, filters=[("split", "=", split)], cur_shard=rank,
                       shard_count=size, num_epochs=1, shuffle_row_groups=seed is not None, seed=seed,
                       reader_pool_type="dummy")


def shard_size(url: str, split: str, rank: int, size: int) -> int:
    """Rows in rank ``rank``'s shard of ``split`` (reads only the ``image_id`` column)."""
    with _reader(url, ["image_id"], split, rank, size, None) as reader:
        return sum(1 for _ in reader)


def steps_per_epoch(shard_sizes: list[int], batch_size: int) -> int:
    """Full batches every rank can take from its shard in one pass: the smallest shard decides.

    >>> steps_per_epoch([53, 47], 8)
    5
    """
    return min(shard_sizes) // batch_size


def iterate_epoch(url: str, split: str, rank: int | None, size: int | None, batch_size: int, steps: int | None,
                  seed: int, augmentation: Augmentation | None, normalization: dict,
                  fields: tuple[str, ...] = ("image", "labels"), label_index: int | None = None,
                  shuffle_buffer: int = 256) -> Iterator[tuple]:
    """One epoch of ``(inputs, labels[, image_ids])`` batches from this rank's shard.

    Rows come from a one-pass reader over the shard (row groups in a ``seed``-dependent order), are
    shuffled through a buffer, augmented (when ``augmentation`` is given) and normalised. With ``steps``
    it yields exactly ``steps`` full batches (fewer only if the shard is too small, which
    :func:`steps_per_epoch` prevents); without, every row once, the last batch possibly short.
    ``label_index`` selects one label column for a binary task.
    """
    rng = np.random.default_rng(seed)
    with_ids = "image_id" in fields
    buffer: list = []
    emitted = 0

    def batches() -> Iterator[list]:
        with _reader(url, list(fields), split, rank, size, seed) as reader:
            for row in reader:
                buffer.append(row)
                if len(buffer) >= shuffle_buffer + batch_size:
                    yield [buffer.pop(int(i)) for i in sorted(rng.choice(len(buffer), batch_size, replace=False),
                                                              reverse=True)]
        order = rng.permutation(len(buffer))
        rest = [buffer[i] for i in order]
        for start in range(0, len(rest), batch_size):
            yield rest[start:start + batch_size]

    for rows in batches():
        if steps is not None and (emitted >= steps or len(rows) < batch_size):
            return
        images = np.stack([row.image for row in rows])
        if augmentation is not None:
            images = augment_batch(images, rng, augmentation)
        labels = np.stack([row.labels for row in rows]).astype(np.float32)
        if label_index is not None:
            labels = labels[:, label_index:label_index + 1]
        out = (model_inputs(images, normalization), labels)
        yield out + ((np.array([row.image_id for row in rows]),) if with_ids else ())
        emitted += 1


def epoch_dataset(make_epoch: Callable[[int], Iterator[tuple]], image_size: int, n_outputs: int):
    """A ``tf.data.Dataset`` that calls ``make_epoch(epoch)`` afresh each time Keras iterates it."""
    import tensorflow as tf

    epochs = iter(range(1_000_000))

    def generate():
        yield from make_epoch(next(epochs))

    return tf.data.Dataset.from_generator(generate, output_signature=(
        tf.TensorSpec((None, image_size, image_size, 1), tf.float32),
        tf.TensorSpec((None, n_outputs), tf.float32))).prefetch(2)
