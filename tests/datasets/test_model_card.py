"""A model loaded ahead in a worker's background thread (batch-score starts it while hashing the dump) is the
model the scoring then gets: loaded once, with the saved weights, and a load that failed is raised."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_spark.core.labels import LABELS
from cxr_spark.datasets.model_card import MODEL_FILE, loaded_model, start_loading


def test_a_model_loaded_ahead_is_the_one_scoring_gets_read_and_loaded_once(tmp_path):
    from cxr_spark.stages.train.models import build_model

    saved = build_model("small_cnn", 32, len(LABELS), seed=5)
    saved.save(tmp_path / MODEL_FILE)
    data = (tmp_path / MODEL_FILE).read_bytes()
    reads = []

    def model_bytes() -> bytes:
        reads.append(1)
        return data

    start_loading("ahead-1", model_bytes)
    start_loading("ahead-1", model_bytes)  # under way (or done): not read again
    model = loaded_model("ahead-1", b"not read: the load ahead has them")
    assert reads == [1]
    assert loaded_model("ahead-1", b"") is model
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(model.predict_on_batch(images), saved.predict_on_batch(images), rtol=1e-5, atol=1e-6)


def test_a_load_ahead_that_fails_leaves_loaded_model_to_raise_the_error():
    start_loading("ahead-broken", lambda: b"not a Keras file")
    with pytest.raises(Exception) as raised:
        loaded_model("ahead-broken", b"not a Keras file")
    assert not isinstance(raised.value, KeyError)  # the model's own error, not a missing entry
