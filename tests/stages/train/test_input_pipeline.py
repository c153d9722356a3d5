"""The training input pipeline on a real Petastorm dataset: the shard contract, augmentation,
normalisation modes, and the weighted loss, each against an independent computation."""
from __future__ import annotations

import os
import tempfile

import cv2
import numpy as np
import pytest
from conftest import read_rows

from cxr_spark.core.labels import LABELS
from cxr_spark.core.normalization import IMAGENET_MEAN, normalization_spec, normalize
from cxr_spark.stages.train.input_pipeline import (Augmentation, InputWorkers, affine_matrix, augment_batch,
                                                   epoch_dataset, iterate_epoch, random_warp, shard_size,
                                                   steps_per_epoch)
from cxr_spark.stages.train.worker import class_weights, weighted_binary_crossentropy

NO_AUGMENT = None


RESCALE = {"mode": "rescale", "mean": 0.0, "std": 255.0, "equalize": False}


def _url(path) -> str:
    return f"file://{path}"


@pytest.fixture(scope="module", params=[1, 2], ids=["C=1", "C=2"])
def input_workers(request):
    """A rank's input workers: the rank's own process (C = 1), or 2 spawned processes."""
    with InputWorkers(request.param) as workers:
        yield workers


@pytest.mark.in_process  # Spark only makes the dataset: the reader under test runs here
@pytest.mark.parametrize("ranks,batch", [(2, 4), (3, 5)])
def test_one_epoch_across_ranks_sees_each_training_image_at_most_once_and_all_but_the_remainder(
        tiny_images, ranks, batch, input_workers):
    images, counts = tiny_images
    n_train = counts["splits"]["train"]
    train_ids = [row.image_id for row in read_rows(images, ["image_id"], filters=[("split", "=", "train")])]
    assert len(train_ids) == n_train == len(set(train_ids))
    # independent shard sizes: petastorm's own sharding, read without our code
    expected_sizes = [len(read_rows(images, ["image_id"], filters=[("split", "=", "train")], cur_shard=r,
                                    shard_count=ranks)) for r in range(ranks)]
    assert sum(expected_sizes) == n_train
    sizes = [shard_size(_url(images), "train", r, ranks) for r in range(ranks)]
    assert sizes == expected_sizes
    for rank in range(ranks):  # the rows themselves: each rank reads petastorm's shard, not just as many rows
        expected_ids = [row.image_id for row in read_rows(images, ["image_id"], filters=[("split", "=", "train")],
                                                           cur_shard=rank, shard_count=ranks)]
        whole_epoch = [i for b in iterate_epoch(_url(images), "train", rank, ranks, batch, None, 0, NO_AUGMENT, RESCALE,
                                                fields=("image_id", "image", "labels"), workers=input_workers)
                       for i in b[2]]
        assert sorted(whole_epoch) == sorted(expected_ids)
    steps = steps_per_epoch(sizes, batch)
    assert steps == min(expected_sizes) // batch > 0

    for epoch in range(2):
        seen = []
        for rank in range(ranks):
            batches = list(iterate_epoch(_url(images), "train", rank, ranks, batch, steps, seed=epoch * 10 + rank,
                                         augmentation=NO_AUGMENT, normalization=RESCALE,
                                         fields=("image_id", "image", "labels"), workers=input_workers))
            assert len(batches) == steps and all(len(b[0]) == batch for b in batches)  # equal steps on every rank
            seen += [image_id for b in batches for image_id in b[2]]
        assert len(seen) == len(set(seen)), "an image was seen twice in one epoch"
        assert set(seen) <= set(train_ids)
        assert len(set(train_ids) - set(seen)) == n_train - steps * batch * ranks  # the documented remainder


def _epoch(images, rank, ranks, seed, workers, augmentation=Augmentation(), buffer=256) -> list[tuple]:
    steps = steps_per_epoch([shard_size(_url(images), "train", r, ranks) for r in range(ranks)], 4) if ranks else None
    return list(iterate_epoch(_url(images), "train", rank, ranks, 4, steps, seed, augmentation, RESCALE,
                              fields=("image_id", "image", "labels"), shuffle_buffer=buffer, workers=workers))


@pytest.mark.in_process  # Spark only makes the dataset: the reader under test runs here
def test_the_same_seed_gives_the_same_augmented_batches_with_one_input_worker_or_two(tiny_images):
    images, _ = tiny_images
    with InputWorkers(1) as one, InputWorkers(2) as two:
        for rank, ranks in ((0, 2), (1, 2), (None, None)):
            by_one, by_two = _epoch(images, rank, ranks, 7, one), _epoch(images, rank, ranks, 7, two)
            assert len(by_one) == len(by_two) > 1
            for (x1, y1, ids1), (x2, y2, ids2) in zip(by_one, by_two):
                assert list(ids1) == list(ids2) and np.array_equal(y1, y2) and np.array_equal(x1, x2)
        other_seed = _epoch(images, None, None, 8, two)
        assert [list(b[2]) for b in other_seed] != [list(b[2]) for b in by_two]  # the seed does change the epoch


def test_images_come_back_through_memory_backed_files_when_dev_shm_has_room_and_the_same_either_way(
        tiny_images, tmp_path, monkeypatch):
    import subprocess
    import sys

    from cxr_spark.stages.train import input_pipeline

    images, _ = tiny_images
    shm = os.statvfs("/dev/shm") if os.path.isdir("/dev/shm") else None
    roomy = shm is not None and shm.f_bavail * shm.f_frsize >= input_pipeline.SHM_MIN_FREE
    monkeypatch.delenv("TMPDIR", raising=False)
    parent = "/dev/shm" if roomy else tempfile.gettempdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left_by_a_killed_rank = os.path.join(parent, f"cxr-input-{int(gone.stdout)}-abc")  # its process is gone
    os.makedirs(left_by_a_killed_rank)
    with InputWorkers(2) as workers:
        assert os.path.dirname(workers._folder) == parent
        assert os.path.basename(workers._folder).startswith(f"cxr-input-{os.getpid()}-")
        by_shm = _epoch(images, None, None, 3, workers)
    assert not os.path.exists(left_by_a_killed_rank) and not os.path.exists(workers._folder)
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # a TMPDIR of the user's is where they go
    monkeypatch.setattr(tempfile, "tempdir", None)
    with InputWorkers(2) as workers:
        assert os.path.dirname(workers._folder) == str(tmp_path)
        by_disk = _epoch(images, None, None, 3, workers)
    assert len(by_shm) == len(by_disk) > 1
    for (x1, y1, ids1), (x2, y2, ids2) in zip(by_shm, by_disk):
        assert list(ids1) == list(ids2) and np.array_equal(y1, y2) and np.array_equal(x1, x2)
    monkeypatch.delenv("TMPDIR")
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(input_pipeline, "SHM_MIN_FREE", 2**62)  # more than any /dev/shm has
    with InputWorkers(2) as workers:
        assert os.path.dirname(workers._folder) == tempfile.gettempdir() != "/dev/shm"


@pytest.mark.in_process  # Spark only makes the dataset: the reader under test runs here
def test_a_killed_input_worker_fails_the_epoch_instead_of_leaving_the_rank_waiting(tiny_images):
    import signal
    from concurrent.futures.process import BrokenProcessPool

    import psutil

    images, _ = tiny_images

    def give_up(*_):
        raise TimeoutError("the epoch waited for a dead worker")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(120)
    try:
        def spawned() -> set:  # this process's spawned children (not the Spark JVM, also a child of the tests)
            return {child for child in psutil.Process().children() if "spawn_main" in " ".join(child.cmdline())}

        others = spawned()  # another test's workers
        with InputWorkers(2) as workers:
            assert len(_epoch(images, None, None, 1, workers)) > 1  # the workers are up
            workers_of_this_process = sorted(spawned() - others, key=lambda child: child.pid)
            assert len(workers_of_this_process) == 2
            workers_of_this_process[0].kill()
            workers_of_this_process[0].wait(30)
            with pytest.raises(BrokenProcessPool):
                _epoch(images, None, None, 2, workers)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.in_process  # Spark only makes the dataset: the reader under test runs here
def test_an_images_augmentation_follows_the_epoch_seed_and_the_image_not_its_batch_or_shard(tiny_images):
    images, _ = tiny_images
    stored = {r.image_id: r.image for r in read_rows(images, ["image_id", "image"], filters=[("split", "=", "train")])}
    flip_only = Augmentation(rotation_deg=0, shift_x=0, shift_y=0, shear_deg=0, zoom=0, horizontal_flip=True)

    def pixels(rank, ranks, seed, buffer):  # image id -> the pixels it was trained on (RESCALE: inputs x 255)
        return {i: np.rint(x[..., 0] * 255) for x, _, ids in _epoch(images, rank, ranks, seed, None, flip_only, buffer)
                for i, x in zip(ids, x)}

    def mirrored(epoch: dict) -> set:  # each image is itself or its mirror: which were mirrored
        assert all(np.array_equal(x, stored[i]) != np.array_equal(x, stored[i][:, ::-1]) for i, x in epoch.items())
        return {i for i, x in epoch.items() if np.array_equal(x, stored[i][:, ::-1])}

    unsharded = pixels(None, None, 3, buffer=256)
    sharded = {**pixels(0, 2, 3, buffer=5), **pixels(1, 2, 3, buffer=5)}  # other batches, other order
    common = set(unsharded) & set(sharded)
    assert len(common) > len(stored) // 2
    assert mirrored({i: unsharded[i] for i in common}) == mirrored({i: sharded[i] for i in common})
    flipped = mirrored(unsharded)
    assert 0.25 < len(flipped) / len(unsharded) < 0.75  # a fair coin per image, not one for all (seeded)
    assert mirrored(pixels(None, None, 4, buffer=256)) != flipped  # and a new coin each epoch


@pytest.mark.in_process  # Spark only makes the dataset: the reader under test runs here
def test_an_unsharded_epoch_without_steps_yields_every_row_once_with_its_own_labels(tiny_images):
    images, counts = tiny_images
    rows = {r.image_id: r for r in read_rows(images, ["image_id", "image", "labels"], filters=[("split", "=", "val")])}
    got = {}
    for inputs, labels, ids in iterate_epoch(_url(images), "val", None, None, 7, None, seed=3, augmentation=None,
                                             normalization=RESCALE, fields=("image_id", "image", "labels")):
        for x, y, image_id in zip(inputs, labels, ids):
            got[image_id] = (x, y)
    assert sorted(got) == sorted(rows) and len(got) == counts["splits"]["val"]
    for image_id, (x, y) in got.items():
        assert np.array_equal(y, rows[image_id].labels.astype(np.float32))
        assert np.allclose(x[..., 0], rows[image_id].image / 255.0)  # validation is never augmented


@pytest.mark.in_process  # Spark only makes the dataset: the reader under test runs here
def test_binary_task_takes_one_label_column(tiny_images):
    images, _ = tiny_images
    index = LABELS.index("Pneumonia")
    rows = {r.image_id: r for r in read_rows(images, ["image_id", "labels"], filters=[("split", "=", "val")])}
    for _, labels, ids in iterate_epoch(_url(images), "val", None, None, 8, None, 0, None, RESCALE,
                                        fields=("image_id", "image", "labels"), label_index=index):
        assert labels.shape[1] == 1
        assert [int(v) for v in labels[:, 0]] == [int(rows[i].labels[index]) for i in ids]


def test_augmentation_shift_matches_a_shifted_copy():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 40), dtype=np.uint8)
    matrix = affine_matrix(40, rotation_deg=0, shift_x=0.25, shift_y=-0.1, shear_deg=0, zoom=1.0, flip=False)
    moved = cv2.warpAffine(image, matrix[:2], (40, 40), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    expected = np.zeros_like(image)
    expected[:36, 10:] = image[4:, :30]  # right by 10 px (0.25 × 40), up by 4 px (0.1 × 40), black fill
    assert np.array_equal(moved, expected)


@pytest.mark.parametrize("fill_mode", ["nearest", "constant"])
def test_augment_batch_fills_shifted_in_borders_by_fill_mode(fill_mode):
    image = np.random.default_rng(3).integers(1, 256, (40, 40), dtype=np.uint8)  # no zeros of its own
    pure_shift = Augmentation(rotation_deg=0, shift_x=0.25, shift_y=0.1, shear_deg=0, zoom=0, fill_mode=fill_mode)

    class Extremes:  # every uniform draw at its upper bound: right by 10 px, down by 4 px
        def uniform(self, low, high):
            return high

    moved = augment_batch(image[None], Extremes(), pure_shift)[0]
    expected = np.zeros_like(image)
    expected[4:, 10:] = image[:36, :30]
    if fill_mode == "nearest":  # the edge rows and columns repeated outwards, as Keras' fill_mode="nearest"
        expected[:4, 10:] = image[0, :30]
        expected[4:, :10] = image[:36, :1]
        expected[:4, :10] = image[0, 0]
    assert np.array_equal(moved, expected)


def test_identity_and_flip_matrices():
    assert np.allclose(affine_matrix(9, 0, 0, 0, 0, 1.0, False), np.eye(3))
    flip = affine_matrix(9, 0, 0, 0, 0, 1.0, True)
    assert np.allclose(flip @ [0, 3, 1], [8, 3, 1])  # x mirrors about the centre column


def test_a_quarter_turn_is_a_rotation_and_zoom_magnifies_both_axes_about_the_centre():
    image = np.arange(81, dtype=np.uint8).reshape(9, 9)
    turned = cv2.warpAffine(image, affine_matrix(9, 90, 0, 0, 0, 1.0, False)[:2], (9, 9),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
    assert any(np.array_equal(turned, np.rot90(image, k)) for k in (1, 3))  # either way round, not a mirror
    zoom_in = affine_matrix(9, 0, 0, 0, 0, 2.0, False)  # output (x, y) samples the input half as far from (4, 4)
    assert np.allclose(zoom_in @ [4 + 4, 4 - 2, 1], [4 + 2, 4 - 1, 1])


def test_random_warps_fill_each_range_both_ways_and_flip_half_the_time_only_when_allowed():
    params = Augmentation(rotation_deg=10, shift_x=0.1, shift_y=0.3, shear_deg=4, zoom=0.2, horizontal_flip=True)
    rng = np.random.default_rng(11)
    draws = [random_warp(rng, params) for _ in range(2000)]
    for name, low, high in [("rotation_deg", -10, 10), ("shift_x", -0.1, 0.1), ("shift_y", -0.3, 0.3),
                            ("shear_deg", -4, 4), ("zoom", 0.8, 1.2)]:
        values = np.array([draw[name] for draw in draws])
        margin = 0.02 * (high - low)  # 2000 uniform draws come within 2% of each end (p of missing < 1e-17)
        assert low <= values.min() < low + margin and high - margin < values.max() <= high, name
    assert 0.45 < np.mean([draw["flip"] for draw in draws]) < 0.55
    assert not any(random_warp(rng, Augmentation())["flip"] for _ in range(200))  # no flips by default
    with pytest.raises(ValueError, match=r"^fill_mode 'mirror': expected one of \['constant', 'nearest'\]$"):
        augment_batch(np.zeros((1, 16, 16), np.uint8), rng, Augmentation(fill_mode="mirror"))


def test_epoch_dataset_starts_a_fresh_epoch_each_time_keras_iterates_it():
    import tensorflow as tf

    calls = []

    def make_epoch(epoch):
        calls.append(epoch)
        for step in range(2):
            yield np.full((3, 8, 8, 1), 10 * epoch + step, np.float32), np.full((3, 2), epoch, np.float32)

    dataset = epoch_dataset(make_epoch, 8, 2)
    assert dataset.element_spec == (tf.TensorSpec((None, 8, 8, 1), tf.float32), tf.TensorSpec((None, 2), tf.float32))
    passes = [[(x.numpy(), y.numpy()) for x, y in dataset] for _ in range(2)]
    assert calls == [0, 1]
    for epoch, batches in enumerate(passes):
        assert [float(x[0, 0, 0, 0]) for x, _ in batches] == [10 * epoch, 10 * epoch + 1]
        assert all(x.shape == (3, 8, 8, 1) and y.shape == (3, 2) and (y == epoch).all() for x, y in batches)


def test_augment_batch_changes_train_images_within_bounds_and_is_seeded():
    rng = np.random.default_rng(1)
    batch = rng.integers(1, 256, (6, 32, 32), dtype=np.uint8)
    params = Augmentation()
    first = augment_batch(batch, np.random.default_rng(5), params)
    again = augment_batch(batch, np.random.default_rng(5), params)
    assert np.array_equal(first, again) and first.dtype == np.uint8 and first.shape == batch.shape
    assert all(not np.array_equal(a, b) for a, b in zip(first, batch))
    # a shift of at most 15% / 20% with small rotation, shear and zoom leaves the centre of the film in view
    assert all((a[12:20, 12:20] > 0).all() for a in first)
    assert np.array_equal(augment_batch(batch, rng, Augmentation(enabled=False)), batch)


def test_normalisation_modes():
    pixels = np.array([[0, 128, 255]], np.uint8)
    assert np.allclose(normalize(pixels, normalization_spec("rescale", {})), pixels / 255.0)
    spec = normalization_spec("train_mean_std", {"mean": 100.0, "std": 50.0})
    assert np.allclose(normalize(pixels, spec), (pixels - 100.0) / 50.0)
    imagenet = normalization_spec("imagenet", {})
    # ImageNet's published RGB means (0.485, 0.456, 0.406) as ITU-R 601 luma, on the 0-255 scale
    assert imagenet["mean"] == pytest.approx(255 * np.dot([0.299, 0.587, 0.114], [0.485, 0.456, 0.406]))
    assert np.allclose(normalize(pixels, imagenet), (pixels - IMAGENET_MEAN) / imagenet["std"])
    ramp = np.tile(np.arange(0, 64, dtype=np.uint8) * 2, (64, 1))
    equalized = normalize(ramp, normalization_spec("rescale", {}, equalize=True))
    assert np.allclose(equalized, cv2.equalizeHist(ramp) / 255.0) and equalized.max() == 1.0
    with pytest.raises(ValueError, match="needs the train split"):
        normalization_spec("train_mean_std", {})
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalization_spec("zscore", {})


def test_class_weights_and_weighted_loss_equal_a_numpy_computation():
    labels = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 1], [0, 0, 1]], np.float32)
    positive, negative = class_weights(len(labels), labels.sum(axis=0))
    assert positive == [0.5, 1.0, 0.25] and negative == [0.5, 1.0, 0.75]  # label 2: no positives -> unweighted
    scores = np.array([[0.9, 0.2, 0.3], [0.4, 0.1, 0.8], [0.6, 0.5, 0.7], [0.2, 0.3, 0.1]], np.float32)
    loss = weighted_binary_crossentropy(positive, negative)(labels, scores).numpy()
    expected = -(np.array(positive) * labels * np.log(scores)
                 + np.array(negative) * (1 - labels) * np.log(1 - scores)).mean(axis=1)
    assert np.allclose(loss, expected, rtol=1e-5)
    unweighted = weighted_binary_crossentropy([1.0] * 3, [1.0] * 3)(labels, scores).numpy()
    import tensorflow as tf
    assert np.allclose(unweighted, tf.keras.losses.binary_crossentropy(labels, scores).numpy(), rtol=1e-4)


@pytest.mark.parametrize("n_images, positives, expected", [
    (4, [4], ([1.0], [1.0])),  # positive in every image: no negatives to weigh against, unweighted
    (4, [0], ([1.0], [1.0])),  # never positive: unweighted
    (1, [1], ([1.0], [1.0])),  # one image
    (1, [0], ([1.0], [1.0])),
    (10, [3, 9, 1], ([0.7, 0.1, 0.9], [0.3, 0.9, 0.1])),  # |N|/n for positives, |P|/n for negatives
])
def test_class_weights_at_the_edges(n_images, positives, expected):
    positive, negative = class_weights(n_images, np.array(positives))
    assert positive == pytest.approx(expected[0]) and negative == pytest.approx(expected[1])
    assert all(0 < weight <= 1 for weight in positive + negative)  # a zero weight would silence a label


def test_normalization_specs_and_their_refusals_name_the_way_out():
    assert normalization_spec("rescale", {}) == {"mode": "rescale", "mean": 0.0, "std": 255.0, "equalize": False}
    assert normalization_spec("train_mean_std", {"mean": 101.5, "std": 60}) == {
        "mode": "train_mean_std", "mean": 101.5, "std": 60.0, "equalize": False}
    assert normalization_spec("imagenet", {}, equalize=1) == {"mode": "imagenet", "mean": IMAGENET_MEAN,
                                                              "std": pytest.approx(0.226 * 255, rel=0.01),
                                                              "equalize": True}
    with pytest.raises(ValueError) as error:
        normalization_spec("train_mean_std", {})
    assert str(error.value) == ("normalisation 'train_mean_std' needs the train split's statistics, and the dataset "
                                "has none (no train rows?); use --normalization rescale or imagenet")
    with pytest.raises(ValueError) as error:
        normalization_spec("zscore", {})
    assert str(error.value) == "unknown normalisation 'zscore'; known: rescale, train_mean_std, imagenet"
    with pytest.raises(ValueError) as error:
        normalization_spec("train_mean_std", {"mean": 1.0, "std": 2.0}, equalize=True)
    assert str(error.value) == ("histogram equalisation changes the pixel statistics the train mean/std describe; "
                                "combine it with 'rescale' or 'imagenet'")


def test_histogram_equalisation_is_opencvs_on_each_image_of_a_stack():
    from cxr_spark.core.normalization import equalize_histogram

    rng = np.random.default_rng(17)
    stack = (rng.random((3, 16, 12)) ** 3 * 200).astype(np.int64)  # ints, skewed dark: equalising changes them
    equalised = equalize_histogram(stack)
    assert equalised.dtype == np.uint8 and equalised.shape == (3, 16, 12)
    for image, result in zip(stack, equalised):
        np.testing.assert_array_equal(result, cv2.equalizeHist(image.astype(np.uint8)))
    assert not np.array_equal(equalised, stack)
    assert equalize_histogram(np.zeros((0, 4, 4), np.uint8)).shape == (0, 4, 4)


def test_model_inputs_are_the_standardised_pixels_with_a_channel_axis_and_steps_take_full_batches():
    from cxr_spark.core.normalization import model_inputs
    from cxr_spark.stages.train.input_pipeline import steps_per_epoch

    images = np.random.default_rng(3).integers(0, 256, (3, 5, 4)).astype(np.uint8)
    inputs = model_inputs(images, {"mean": 100.0, "std": 40.0})
    assert inputs.shape == (3, 5, 4, 1) and inputs.dtype == np.float32
    np.testing.assert_allclose(inputs[..., 0], (images.astype(np.float64) - 100) / 40, rtol=1e-6)
    assert [steps_per_epoch(sizes, 8) for sizes in ([53, 47], [8], [7, 100], [64, 64])] == [5, 1, 0, 8]
