"""The training input pipeline: augmentation and per-rank Petastorm epochs, normalised on the way into
the model by :mod:`cxr_spark.core.normalization` (what scoring applies too).

The shard contract (tested): rank ``r`` of ``n`` reads only Petastorm's shard ``r`` of the split (whole
row groups, ``index % n == r``, :mod:`cxr_spark.datasets.row_groups`), so across ranks every row is in
exactly one shard. Each epoch reads the shard's row groups once, in a seeded order, and stops after
``steps`` full batches; ``steps`` is the same on every rank (the smallest shard decides), so every training
image is seen at most once per epoch and the images not seen are the documented remainder
``n_train - steps * batch * n``, a different random set each epoch.

A rank's row groups are loaded (decoded and augmented) by ``C`` input worker processes
(:class:`InputWorkers`); the order they are read in, the shuffle and each image's augmentation come from
the seed alone, so the batches are the same for every ``C`` (tested).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from cxr_spark.core.guards import process_alive
from cxr_spark.core.normalization import model_inputs
from cxr_spark.datasets.row_groups import read_row_group, row_counts, shard, split_row_groups


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
    if not params.enabled or len(images) == 0:
        return images
    out = np.empty_like(images)
    for i, image in enumerate(images):
        out[i] = augment_image(image, rng, params)
    return out


def augment_image(image: np.ndarray, rng: np.random.Generator, params: Augmentation) -> np.ndarray:
    """One (H, W) uint8 image under one random affine warp drawn from ``rng`` (see :func:`augment_batch`)."""
    import cv2

    if params.fill_mode not in FILL_MODES:
        raise ValueError(f"fill_mode {params.fill_mode!r}: expected one of {sorted(FILL_MODES)}")
    size = image.shape[0]
    matrix = affine_matrix(size, **random_warp(rng, params))
    return cv2.warpAffine(image, matrix[:2], (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=FILL_MODES[params.fill_mode], borderValue=0)


# ---------------------------------------------------------------------------------------------
# Epochs per rank: whole row groups, loaded by the rank's input workers in an order the seed fixes


def image_rng(seed: int, image_id: str) -> np.random.Generator:
    """One image's augmentation draws in the epoch whose seed is ``seed``: they depend on the epoch and the
    image, not on which process loads it or when, so batches do not depend on the number of workers."""
    return np.random.default_rng([seed % 2**63, zlib.crc32(image_id.encode())])


def load_row_group(task: tuple) -> dict[str, np.ndarray]:
    """``(url, row_group, fields, augmentation, seed)``: the row group's ``image_id``, ``labels`` and
    ``image`` (augmented per image by :func:`image_rng` when ``augmentation`` is given) as arrays, in stored
    row order. What an input worker runs; module-level, so it can be sent to another process."""
    url, group, fields, augmentation, seed = task
    columns = read_row_group(url, group, tuple(dict.fromkeys(("image_id",) + tuple(fields))))
    ids = columns["image_id"]
    out = {"image_id": np.array(ids, dtype=object)}
    if "labels" in columns:
        out["labels"] = (np.stack(columns["labels"]).astype(np.float32) if ids else np.empty((0, 0), np.float32))
    if "image" in columns:
        images = columns["image"]
        if augmentation is not None and augmentation.enabled:
            images = [augment_image(image, image_rng(seed, image_id), augmentation)
                      for image, image_id in zip(images, ids)]
        out["image"] = np.stack(images) if images else np.empty((0, 0, 0), np.uint8)
    return out


def _start_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one worker, one core


def _load_to_file(task: tuple, folder: str) -> dict:
    """:func:`load_row_group` in a worker, its images handed back in a file of ``folder``, not through the
    pool's pipe, which cost the rank's process more CPU per image (docs/benchmarks.md)."""
    loaded = load_row_group(task)
    if "image" in loaded:
        handle = tempfile.NamedTemporaryFile(dir=folder, suffix=".u8", delete=False)
        with handle:
            handle.write(np.ascontiguousarray(loaded["image"]).data)
        loaded["image"] = (handle.name, loaded["image"].shape)
    return loaded


#: Memory-backed files (/dev/shm) hand images back when it has this much room and no TMPDIR is set: the row
#: groups in flight, 2 per worker, take at most a few hundred MB of memory. Files on a disk-backed TMPDIR cost
#: the workers more CPU per image (docs/benchmarks.md); a small /dev/shm (Docker's default is 64 MB) is left alone.
SHM_FOLDER, SHM_MIN_FREE = "/dev/shm", 2**30
_HAND_BACK_PREFIX = "cxr-input-"


def _hand_back_folder() -> str:
    """A new folder for the input workers' hand-back files, ``cxr-input-<pid>-*`` in :data:`SHM_FOLDER` when it
    has :data:`SHM_MIN_FREE` bytes free and ``TMPDIR`` is not set, else in the temporary folder. Folders left
    there by ranks that were killed (their process is gone) are removed first: in /dev/shm they hold memory."""
    parent = None
    if "TMPDIR" not in os.environ:
        try:
            usage = os.statvfs(SHM_FOLDER)
        except OSError:  # no /dev/shm (macOS, some containers)
            usage = None
        if usage is not None and usage.f_bavail * usage.f_frsize >= SHM_MIN_FREE and os.access(SHM_FOLDER, os.W_OK):
            parent = SHM_FOLDER
    for left in Path(parent or tempfile.gettempdir()).glob(f"{_HAND_BACK_PREFIX}*"):
        pid = left.name[len(_HAND_BACK_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_HAND_BACK_PREFIX}{os.getpid()}-", dir=parent)


def _from_file(loaded: dict) -> dict:
    if "image" in loaded:
        path, shape = loaded["image"]
        loaded["image"] = np.fromfile(path, np.uint8).reshape(shape)
        os.remove(path)
    return loaded


class InputWorkers:
    """The processes that load one rank's row groups (:func:`load_row_group`): ``count`` of them, or with
    ``count`` 1 the rank's own process. Results come back in the order asked for, at most ``2 * count``
    row groups ahead of the reader, so what a rank trains on does not depend on ``count`` (tested).

    Spawned, not forked: the rank's process runs TensorFlow, whose threads a fork would copy mid-state.
    A worker that dies (killed, out of memory) fails the epoch with ``BrokenProcessPool`` rather than
    leaving the rank waiting. Open once per training run (the processes start in about a second) and close
    it after, or use ``with``: closing stops the processes and removes the folder their images pass through.
    """

    def __init__(self, count: int):
        if count < 1:
            raise ValueError(f"input workers: {count}; expected at least 1")
        self.count = count
        self._pool = self._folder = None
        if count > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._folder = _hand_back_folder()
            self._pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker)

    def load(self, tasks: list[tuple]) -> Iterator[dict]:
        """:func:`load_row_group` of each task, in order."""
        if self._pool is None:
            yield from map(load_row_group, tasks)
            return
        pending: deque = deque()
        try:
            for task in tasks:
                pending.append(self._pool.submit(_load_to_file, task, self._folder))
                if len(pending) >= 2 * self.count:
                    yield _from_file(pending.popleft().result())
            while pending:
                yield _from_file(pending.popleft().result())
        finally:  # an epoch that stops early (``steps``) or fails: the row groups loaded ahead are not needed
            for future in pending:
                if not future.cancel() and self._pool is not None:
                    with contextlib.suppress(Exception):  # a broken or closed pool raises at once
                        _from_file(future.result())

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> "InputWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_size(url: str, split: str, rank: int | None, size: int | None) -> int:
    """Rows in rank ``rank``'s shard of ``split``, from the Parquet footers (no row is read)."""
    return sum(row_counts(url, shard(split_row_groups(url, split), rank, size)))


def steps_per_epoch(shard_sizes: list[int], batch_size: int) -> int:
    """Full batches every rank can take from its shard in one pass: the smallest shard decides.

    >>> steps_per_epoch([53, 47], 8)
    5
    """
    return min(shard_sizes) // batch_size


def iterate_epoch(url: str, split: str, rank: int | None, size: int | None, batch_size: int, steps: int | None,
                  seed: int, augmentation: Augmentation | None, normalization: dict,
                  fields: tuple[str, ...] = ("image", "labels"), label_index: int | None = None,
                  shuffle_buffer: int = 256, workers: InputWorkers | None = None) -> Iterator[tuple]:
    """One epoch of ``(inputs, labels[, image_ids])`` batches from this rank's shard.

    The shard's row groups are loaded in a ``seed``-dependent order by ``workers`` (default: in this
    process), their rows shuffled through a buffer, augmented per image (when ``augmentation`` is given)
    and normalised. With ``steps`` it yields exactly ``steps`` full batches (fewer only if the shard is too
    small, which :func:`steps_per_epoch` prevents); without, every row once, the last batch possibly short.
    ``label_index`` selects one label column for a binary task.
    """
    rng = np.random.default_rng(seed)
    groups = shard(split_row_groups(url, split), rank, size)
    tasks = [(url, groups[i], fields, augmentation, seed) for i in rng.permutation(len(groups))]
    with_ids = "image_id" in fields
    buffer: list = []
    emitted = 0

    def batches() -> Iterator[list]:
        for loaded in (workers or InputWorkers(1)).load(tasks):
            buffer.extend((loaded, i) for i in range(len(loaded["image_id"])))
            while len(buffer) >= shuffle_buffer + batch_size:
                yield [buffer.pop(int(i)) for i in sorted(rng.choice(len(buffer), batch_size, replace=False),
                                                          reverse=True)]
        order = rng.permutation(len(buffer))
        rest = [buffer[i] for i in order]
        for start in range(0, len(rest), batch_size):
            yield rest[start:start + batch_size]

    for rows in batches():
        if steps is not None and (emitted >= steps or len(rows) < batch_size):
            return
        images = np.stack([loaded["image"][i] for loaded, i in rows])
        labels = np.stack([loaded["labels"][i] for loaded, i in rows])
        if label_index is not None:
            labels = labels[:, label_index:label_index + 1]
        out = (model_inputs(images, normalization), labels)
        yield out + ((np.array([loaded["image_id"][i] for loaded, i in rows]),) if with_ids else ())
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
