"""The model folder ``train`` writes and ``score``, ``report`` (Grad-CAM) and ``batch-score`` read: its file
names, its card (``model.json``: labels, input size, normalisation, thresholds, version) and the Keras
model, loaded at most once per Python worker and applied in batches.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
from typing import Callable

import numpy as np
from pyspark.sql import SparkSession

from cxr_spark.io.storage import read_json, to_url

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
MODEL_CARD = "model.json"


def load_model_card(spark: SparkSession, model_dir: str) -> dict:
    """Read ``model.json``: the labels, input size, normalisation and thresholds a model scores with."""
    return read_json(spark, f"{to_url(model_dir)}/{MODEL_CARD}")


_LOADED_MODELS: dict[str, object] = {}  # per Python worker: model_version -> Keras model


def load_model_bytes(model_bytes: bytes):
    """A Keras model from the bytes of a ``model.keras`` file (not compiled: inference only)."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, MODEL_FILE)
        with open(path, "wb") as handle:
            handle.write(model_bytes)
        return tf.keras.models.load_model(path, compile=False)


def loaded_model(version: str, model_bytes: bytes):
    """Deserialise a model at most once per Python worker process (waiting for :func:`start_loading`'s load of
    it when one is under way)."""
    loading = _LOADING.pop(version, None)
    if loading is not None:
        loading.join()
    if version not in _LOADED_MODELS:
        _load(version, model_bytes)
    return _LOADED_MODELS[version]


def _load(version: str, model_bytes: bytes) -> None:
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)  # one Spark task slot, one core
    except RuntimeError:  # TensorFlow already ran in this process, with the threads it was given then
        pass
    _LOADED_MODELS[version] = load_model_bytes(model_bytes)
    log.info("worker %d loaded model %s", os.getpid(), version)


_LOADING: dict[str, threading.Thread] = {}  # per Python worker: model_version -> its load under way


def start_loading(version: str, model_bytes: Callable[[], bytes]) -> None:
    """Begin :func:`loaded_model`'s load in a background thread of this worker, so that its TensorFlow import
    (about 2 s of CPU) overlaps the job's other work. ``model_bytes`` (e.g. a broadcast's ``.value``, which only
    a task's own thread may read) is called here, and only when the model is neither loaded nor loading. A
    load that fails leaves it to :func:`loaded_model`, which tries again and raises."""
    if version in _LOADED_MODELS or version in _LOADING:
        return
    model_bytes = model_bytes()

    def load() -> None:
        try:
            _load(version, model_bytes)
        except Exception:  # noqa: BLE001 - loaded_model, called for the scoring, raises it
            log.warning("worker %d: loading model %s ahead of scoring failed", os.getpid(), version, exc_info=True)

    _LOADING[version] = thread = threading.Thread(target=load, name=f"load {version}", daemon=True)
    thread.start()


def predict_probabilities(model, inputs: np.ndarray, batch_size: int, n_outputs: int) -> np.ndarray:
    """The model's float32 outputs for ``inputs``, ``batch_size`` images per call.

    ``predict_on_batch`` runs Keras's compiled predict function: graph mode, where TensorFlow fuses each
    convolution with its batch norm and ReLU. Calling the model eagerly runs every layer as separate ops
    and cost about 1.8x the CPU time per image (the demo model at 128 px, one thread).
    """
    outputs = [model.predict_on_batch(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return np.concatenate(outputs).astype(np.float32) if outputs else np.zeros((0, n_outputs), np.float32)
