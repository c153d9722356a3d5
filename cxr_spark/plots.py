"""Plots people would rather look at than read: training curves."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_training_curves(history: dict[str, list[float]], path: str, title: str) -> None:
    """Loss and AUROC per epoch, train beside validation, saved as a PNG."""
    epochs = range(1, len(history["loss"]) + 1)
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for axis, metric, label in ((axes[0], "loss", "binary cross-entropy"), (axes[1], "auroc", "macro AUROC")):
        for prefix, style in (("", "-o"), ("val_", "-s")):
            if prefix + metric in history:
                axis.plot(epochs, history[prefix + metric], style, markersize=3,
                          label="validation" if prefix else "train")
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
