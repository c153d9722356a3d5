"""The model zoo builds, trains a step, loads weights only from local files; thresholds maximise F1."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import f1_score

from cxr_spark.core.metrics import DEFAULT_THRESHOLD, tune_threshold, tune_thresholds
from cxr_spark.stages.train.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_and_trains_a_step(name):
    model = build_model(name, 32, 14, seed=1)
    model.compile(optimizer=tf.keras.optimizers.legacy.Adam(1e-3), loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    images, labels = rng.normal(size=(4, 32, 32, 1)).astype(np.float32), (rng.random((4, 14)) < 0.3).astype(np.float32)
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(images, labels)
    outputs = model.predict(images, verbose=0)
    assert np.isfinite(loss) and outputs.shape == (4, 14) and ((outputs >= 0) & (outputs <= 1)).all()
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights())), "the step changed nothing"


@pytest.mark.parametrize("name,builder,published", [
    ("densenet121", tf.keras.applications.DenseNet121, 8_062_504),  # Keras Applications table: 8.1M
    ("resnet50v2", tf.keras.applications.ResNet50V2, 25_613_800),  # Keras Applications table: 25.6M
])
def test_backbone_parameter_counts_match_the_keras_reference(name, builder, published):
    reference = builder(weights=None, include_top=True, classes=1000, input_shape=(224, 224, 3))
    assert reference.count_params() == published
    features = reference.get_layer("avg_pool").output_shape[-1]
    ours = build_model(name, 224, 14, seed=0)
    # ours = the reference with its 1000-way classifier swapped for a 14-way sigmoid head
    assert ours.count_params() == published - (features * 1000 + 1000) + (features * 14 + 14)


def test_weights_come_from_a_local_file(tmp_path):
    trained = build_model("small_cnn", 32, 14, seed=1)
    trained.set_weights([w + 0.5 for w in trained.get_weights()])
    path = str(tmp_path / "weights.h5")
    trained.save_weights(path)
    loaded = build_model("small_cnn", 32, 14, seed=2, weights=path)
    assert all(np.array_equal(a, b) for a, b in zip(trained.get_weights(), loaded.get_weights()))
    with pytest.raises(ValueError, match="known models: alexnet, densenet121"):
        build_model("vgg", 32, 14, seed=0)


def test_tuned_threshold_maximises_f1_like_a_brute_force_search():
    rng = np.random.default_rng(3)
    for trial in range(25):
        labels = (rng.random(60) < rng.uniform(0.1, 0.6)).astype(int)
        scores = np.round(np.clip(labels * 0.25 + rng.random(60) * 0.75, 0, 1), 1)  # coarse: many ties
        if labels.sum() in (0, len(labels)):
            continue
        candidates = np.unique(scores)
        f1s = [f1_score(labels, scores >= t) for t in candidates]
        best = max(f1s)
        expected = max(t for t, f in zip(candidates, f1s) if f == pytest.approx(best, abs=1e-12))
        assert tune_threshold(labels, scores) == pytest.approx(expected), trial


def test_tuning_without_both_classes_keeps_the_default():
    scores = np.array([[0.2, 0.9], [0.4, 0.1]])
    assert tune_thresholds(np.array([[0, 1], [0, 1]]), scores) == [DEFAULT_THRESHOLD, DEFAULT_THRESHOLD]
