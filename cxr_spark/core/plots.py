"""Plots people would rather look at than read: training curves, ROC and precision-recall curves,
confusion-matrix heatmaps, reliability diagrams. Files or PNG bytes only (the Agg backend never opens a window)."""
from __future__ import annotations

import io
import math
from typing import BinaryIO

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cxr_spark.core.metrics import curve_rates  # noqa: E402


def plot_training_curves(history: dict[str, list[float]], path: str | BinaryIO, title: str) -> None:
    """Loss and AUROC per epoch, train beside validation, saved as a PNG (to a path or a binary file)."""
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
    figure.savefig(path, format="png")
    plt.close(figure)


def png_bytes(figure) -> bytes:
    """A figure as PNG bytes (closed afterwards): what the HTML report embeds."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _grid(n_panels: int, panel_size: float = 3.0):
    columns = min(4, n_panels)
    rows = math.ceil(n_panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(panel_size * columns, panel_size * rows), dpi=72,
                                squeeze=False)
    for axis in axes.flat[n_panels:]:
        axis.axis("off")
    return figure, list(axes.flat[:n_panels])


def _curve_names(curves: dict[str, dict]) -> list[str]:
    # The pooled (micro) panel only adds something when there is more than one label.
    return [name for name in curves if name != "micro" or len(curves) > 2]


def plot_curves(curves: dict[str, dict], kind: str, baseline: dict[str, dict] | None = None) -> bytes:
    """ROC (``kind="roc"``) or precision-recall (``"pr"``) curves, one panel per label, from the exact
    running counts; the baseline's dashed where given. Undefined curves say why."""
    names = _curve_names(curves)
    figure, axes = _grid(len(names))
    for axis, name in zip(axes, names):
        for source, style, who in ((curves, "-", "model"), (baseline or {}, "--", "baseline")):
            if name not in source:
                continue
            curve = source[name]
            points = curve_rates(curve["tp"], curve["fp"], curve["positives"], curve["negatives"])
            if kind == "roc" and points["fpr"] is not None and points["tpr"] is not None:
                axis.plot(points["fpr"], points["tpr"], style, label=who)
            elif kind == "pr" and points["recall"] is not None:
                # precision holds from the previous recall up to this one: AP is the area under these steps
                axis.plot(points["recall"], points["precision"], style, drawstyle="steps-pre", label=who)
            elif who == "model":
                why = "no positives" if not curve["positives"] else "no negatives"
                axis.text(0.5, 0.5, f"undefined:\n{why}", ha="center", va="center", transform=axis.transAxes)
        if kind == "roc":
            axis.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.02)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("false positive rate" if kind == "roc" else "recall", fontsize=8)
        axis.set_ylabel("true positive rate" if kind == "roc" else "precision", fontsize=8)
        axis.tick_params(labelsize=7)
        if baseline and axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.tight_layout()
    return png_bytes(figure)


def plot_confusion_matrices(per_label: dict[str, dict], at_half: bool) -> bytes:
    """Each label's 2x2 confusion matrix as a heatmap (rows actual 0/1, columns predicted 0/1), counts written in."""
    figure, axes = _grid(len(per_label), panel_size=2.4)
    for axis, (name, row) in zip(axes, per_label.items()):
        cells = row["at_0_5"] if at_half else row
        matrix = np.array([[cells["tn"], cells["fp"]], [cells["fn"], cells["tp"]]])
        # colour by the share of the actual class, so rare findings are as readable as common ones
        shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for (i, j), count in np.ndenumerate(matrix):
            axis.text(j, i, str(count), ha="center", va="center", fontsize=9,
                      color="white" if shares[i, j] > 0.5 else "black")
        axis.set_xticks([0, 1], ["pred 0", "pred 1"], fontsize=7)
        axis.set_yticks([0, 1], ["actual 0", "actual 1"], fontsize=7)
        axis.set_title(f"{name} (t={cells['threshold']:.3g})", fontsize=9)
    figure.tight_layout()
    return png_bytes(figure)


def plot_reliability(per_label: dict[str, dict]) -> bytes:
    """A reliability diagram per label with a ``calibration`` block: each bin's fraction positive against its
    mean predicted probability (the diagonal is perfect calibration), images per bin as grey bars beneath."""
    calibrated = {name: row["calibration"] for name, row in per_label.items() if row.get("calibration")}
    figure, axes = _grid(len(calibrated))
    for axis, (name, calibration) in zip(axes, calibrated.items()):
        bins = calibration["bins"]
        counts = axis.twinx()  # counts on their own scale, drawn first so the curve stays on top
        axis.set_zorder(counts.get_zorder() + 1)
        axis.patch.set_visible(False)
        counts.bar([(b["lower"] + b["upper"]) / 2 for b in bins], [b["n"] for b in bins],
                   width=[0.9 * (b["upper"] - b["lower"]) for b in bins], color="lightgrey")
        most = max([b["n"] for b in bins] + [1])
        counts.set_ylim(0, 4 * most)  # the bars fill at most the lowest quarter of the panel
        counts.set_yticks([0, most])
        counts.set_ylabel("images", fontsize=7, color="grey", loc="bottom")
        counts.tick_params(labelsize=6, colors="grey")
        filled = [b for b in bins if b["n"] and b["mean_probability"] is not None]
        axis.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
        if filled:
            axis.plot([b["mean_probability"] for b in filled], [b["fraction_positive"] for b in filled], "-o",
                      markersize=3)
        else:
            axis.text(0.5, 0.5, "no scored images", ha="center", va="center", transform=axis.transAxes)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.02)
        ece = calibration.get("ece")
        axis.set_title(name if ece is None else f"{name} (ECE {ece:.3f})", fontsize=10)
        axis.set_xlabel("mean predicted probability", fontsize=8)
        axis.set_ylabel("fraction positive", fontsize=8)
        axis.tick_params(labelsize=7)
    figure.tight_layout()
    return png_bytes(figure)


def report_figures(metrics: dict, curves: dict[str, dict], baseline_curves: dict[str, dict] | None,
                   history: dict | None) -> dict[str, bytes]:
    """Every figure of the HTML report as PNG bytes, keyed as :mod:`cxr_spark.stages.report.render` expects."""
    figures = {
        "roc": plot_curves(curves, "roc", baseline_curves),
        "pr": plot_curves(curves, "pr", baseline_curves),
        "confusion_tuned": plot_confusion_matrices(metrics["per_label"], at_half=False),
        "confusion_half": plot_confusion_matrices(metrics["per_label"], at_half=True),
    }
    if any(row.get("calibration") for row in metrics["per_label"].values()):
        figures["reliability"] = plot_reliability(metrics["per_label"])
    if history and history.get("loss"):
        buffer = io.BytesIO()
        plot_training_curves(history, buffer, f"{metrics['model']['version']}: training")
        figures["training"] = buffer.getvalue()
    return figures
