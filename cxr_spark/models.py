"""The model zoo, by name. Every model maps a (size, size, 1) float image to one sigmoid per label."""
from __future__ import annotations

from typing import Callable

import tensorflow as tf


def small_cnn(size: int, num_outputs: int, seed: int) -> tf.keras.Model:
    """The seed papers' CNN: stacked 3×3 Conv2D + MaxPooling from 32 filters, batch norm, global pooling."""
    init = tf.keras.initializers.HeNormal(seed=seed)
    inputs = tf.keras.Input((size, size, 1), name="image")
    x = inputs
    for block, filters in enumerate((32, 64, 128, 128)):
        x = tf.keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=init,
                                   name=f"conv{block + 1}")(x)
        x = tf.keras.layers.BatchNormalization(name=f"bn{block + 1}")(x)
        x = tf.keras.layers.ReLU(name=f"relu{block + 1}")(x)
        x = tf.keras.layers.MaxPooling2D(2, name=f"pool{block + 1}")(x)
    x = tf.keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = tf.keras.layers.Dropout(0.2, seed=seed, name="dropout")(x)
    outputs = tf.keras.layers.Dense(num_outputs, activation="sigmoid",
                                    kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed),
                                    name="probabilities")(x)
    return tf.keras.Model(inputs, outputs, name="small_cnn")


MODELS: dict[str, Callable[[int, int, int], tf.keras.Model]] = {"small_cnn": small_cnn}


def build_model(name: str, size: int, num_outputs: int, seed: int) -> tf.keras.Model:
    """Build a model from the zoo by name; unknown names list the known ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](size, num_outputs, seed)
