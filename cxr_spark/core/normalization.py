"""Normalisation: how uint8 films become a model's float input, the same in training, scoring and Grad-CAM.

Stored images stay uint8; the mode and its offset and scale are recorded in ``model.json``
(:func:`normalization_spec`), so scoring applies exactly what training applied.
"""
from __future__ import annotations

import numpy as np

#: ImageNet channel statistics (Keras applications, torchvision) expressed on the 0-255 scale, for
#: grayscale films: the mean and standard deviation of the luma of the RGB statistics.
IMAGENET_MEAN = 255 * (0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406)
IMAGENET_STD = 255 * (0.299 * 0.229 + 0.587 * 0.224 + 0.114 * 0.225)
NORMALIZATION_MODES = ("rescale", "train_mean_std", "imagenet")


def normalization_spec(mode: str, train_stats: dict, equalize: bool = False) -> dict:
    """The normalisation a model records in ``model.json``: mode, the offset and scale it applies.

    >>> normalization_spec("rescale", {})["std"]
    255.0
    """
    if mode == "rescale":  # the seed papers: pixels / 255
        mean, std = 0.0, 255.0
    elif mode == "train_mean_std":
        if "mean" not in train_stats:
            raise ValueError("normalisation 'train_mean_std' needs the train split's statistics, and the "
                             "dataset has none (no train rows?); use --normalization rescale or imagenet")
        mean, std = float(train_stats["mean"]), float(train_stats["std"])
    elif mode == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        raise ValueError(f"unknown normalisation {mode!r}; known: {', '.join(NORMALIZATION_MODES)}")
    if equalize and mode == "train_mean_std":
        raise ValueError("histogram equalisation changes the pixel statistics the train mean/std describe; "
                         "combine it with 'rescale' or 'imagenet'")
    return {"mode": mode, "mean": mean, "std": std, "equalize": bool(equalize)}


def equalize_histogram(images: np.ndarray) -> np.ndarray:
    """Global histogram equalisation of each uint8 image in a (N, H, W) or (H, W) array."""
    import cv2

    images = np.asarray(images, np.uint8)
    if images.ndim == 2:
        return cv2.equalizeHist(images)
    return np.stack([cv2.equalizeHist(image) for image in images]) if len(images) else images


def normalize(images, spec: dict):
    """uint8 images to the float32 model input ``(x - mean) / std`` (numpy arrays or TF tensors).

    ``spec`` is :func:`normalization_spec`'s dict (or an older card's ``{"mean", "std"}``).
    """
    if spec.get("equalize"):
        images = equalize_histogram(images)
    return (np.asarray(images, np.float32) - spec["mean"]) / spec["std"]


def model_inputs(images: np.ndarray, spec: dict) -> np.ndarray:
    """A stack of uint8 (N, H, W) images as the model's (N, H, W, 1) float32 input."""
    return normalize(images, spec)[..., np.newaxis].astype(np.float32)
