"""The model zoo, by name. Every model maps a (size, size, 1) float image to one sigmoid per output.

ImageNet-pretrained backbones take their weights only from a local file (``weights=PATH``): nothing is
downloaded at run time. Grayscale films are repeated into the three channels those backbones expect.
"""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

L = tf.keras.layers


# Keras' default moving-average momentum (0.99) leaves 80% of the initial statistics in place after 22 steps,
# one demo epoch; validation then sees the layer's start-up scale, not the trained one. PyTorch's 0.9
# settles within tens of steps.
BN_MOMENTUM = 0.9


def _head(x, num_outputs: int, seed: int):
    return L.Dense(num_outputs, activation="sigmoid", kernel_initializer=tf.keras.initializers.GlorotUniform(seed=seed),
                   name="probabilities", dtype="float32")(x)  # float32 even under mixed precision


def small_cnn(size: int, num_outputs: int, seed: int, weights: str | None = None) -> tf.keras.Model:
    """The seed papers' CNN: stacked 3×3 Conv2D + MaxPooling from 32 filters, batch norm, global pooling."""
    init = tf.keras.initializers.HeNormal(seed=seed)
    inputs = tf.keras.Input((size, size, 1), name="image")
    x = inputs
    for block, filters in enumerate((32, 64, 128, 128)):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer=init, name=f"conv{block + 1}")(x)
        x = L.BatchNormalization(momentum=BN_MOMENTUM, name=f"bn{block + 1}")(x)
        x = L.ReLU(name=f"relu{block + 1}")(x)
        x = L.MaxPooling2D(2, name=f"pool{block + 1}")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dropout(0.2, seed=seed, name="dropout")(x)
    return _finish(tf.keras.Model(inputs, _head(x, num_outputs, seed), name="small_cnn"), weights)


def alexnet(size: int, num_outputs: int, seed: int, weights: str | None = None) -> tf.keras.Model:
    """The seed paper's modified AlexNet: conv 96@11×11/4, 256@5×5/2, 384@3×3/2, 256@3×3/2, fc 4096, no dropout."""
    init = tf.keras.initializers.HeNormal(seed=seed)
    inputs = tf.keras.Input((size, size, 1), name="image")
    x = inputs
    for block, (filters, kernel, stride) in enumerate(((96, 11, 4), (256, 5, 2), (384, 3, 2), (256, 3, 2))):
        x = L.Conv2D(filters, kernel, strides=stride, padding="same", activation="relu", kernel_initializer=init,
                     name=f"conv{block + 1}")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(4096, activation="relu", kernel_initializer=init, name="fc")(x)
    return _finish(tf.keras.Model(inputs, _head(x, num_outputs, seed), name="alexnet"), weights)


def _application(builder: Callable, name: str):
    def build(size: int, num_outputs: int, seed: int, weights: str | None = None) -> tf.keras.Model:
        inputs = tf.keras.Input((size, size, 1), name="image")
        rgb = L.Concatenate(name="gray_to_rgb")([inputs, inputs, inputs])
        backbone = builder(include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg")
        if weights:  # ImageNet weights from a local file only (a notop .h5 from keras-applications)
            backbone.load_weights(weights)
        return tf.keras.Model(inputs, _head(backbone(rgb), num_outputs, seed), name=name)

    return build


def _finish(model: tf.keras.Model, weights: str | None) -> tf.keras.Model:
    if weights:
        model.load_weights(weights)
    return model


MODELS: dict[str, Callable[..., tf.keras.Model]] = {
    "small_cnn": small_cnn,
    "alexnet": alexnet,
    "densenet121": _application(tf.keras.applications.DenseNet121, "densenet121"),  # CheXNet
    "resnet50v2": _application(tf.keras.applications.ResNet50V2, "resnet50v2"),
}


def build_model(name: str, size: int, num_outputs: int, seed: int, weights: str | None = None) -> tf.keras.Model:
    """Build a model from the zoo by name; unknown names list the known ones."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name](size, num_outputs, seed, weights)
