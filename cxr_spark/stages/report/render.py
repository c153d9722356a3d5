"""The report's words and tables, built once from ``metrics.json`` and written two ways: Markdown
(``report.md``) and a self-contained HTML page (``report.html``, figures embedded as base64 PNG, no
external CSS, scripts or fonts). Pure functions: no Spark, no files.

Every piece of text that goes into the HTML passes through :func:`html.escape`. The summary and the
clinical evaluation (uncertainty, operating points, subgroups, calibration) are built in
:mod:`cxr_spark.stages.report.clinical_sections`.
"""
from __future__ import annotations

import html

from cxr_spark.core.html_page import figure, page_head
from cxr_spark.core.metrics import COUNT_NAMES, THRESHOLD_RATE_NAMES
from cxr_spark.stages.report.clinical_sections import clinical_sections, summary_section
from cxr_spark.stages.report.references import (CHEXNET_AUROC, CHEXNET_CITATION, KAGGLE_CITATION, KAGGLE_PNEUMONIA,
                                                REFERENCE_MARK)
from cxr_spark.stages.report.tables import NOT_AVAILABLE, Cell, Section, Table, fmt

UNDEFINED_NOTE = (f"{NOT_AVAILABLE}: undefined (a zero denominator, or no positives or no negatives for AUROC "
                  "and average precision); null in metrics.json.")
RATE_HEADERS = ("accuracy", "precision", "recall", "specificity", "F1")


def _percent(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{100 * value:.2f}%"


def _threshold_table(metrics: dict, caption: str, at_half: bool) -> Table:
    """Per-label confusion counts and rates at the tuned thresholds (with ranking metrics) or at 0.5."""
    ranking = [] if at_half else ["AUROC", "average precision"]
    header = ["finding", "support", "threshold", "TP", "FP", "TN", "FN", *RATE_HEADERS, *ranking]
    rows = []
    for name, row in metrics["per_label"].items():
        cells = row["at_0_5"] if at_half else row
        rows.append([name, row["support"], cells["threshold"], *(cells[k] for k in COUNT_NAMES),
                     *(cells[k] for k in THRESHOLD_RATE_NAMES),
                     *([] if at_half else [row["auroc"], row["average_precision"]])])
    macro = metrics["macro"]["at_0_5"] if at_half else metrics["macro"]
    micro = metrics["micro"]["at_0_5"] if at_half else metrics["micro"]
    rank_cells = (lambda block: []) if at_half else (lambda block: [block["auroc"], block["average_precision"]])
    rows.append(["macro (mean over labels)", "", "", "", "", "", "", *(macro[k] for k in THRESHOLD_RATE_NAMES),
                 *rank_cells(macro)])
    rows.append(["micro (pooled)", "", "", *(micro[k] for k in COUNT_NAMES), *(micro[k] for k in THRESHOLD_RATE_NAMES),
                 *rank_cells(micro)])
    return Table(caption, header, rows)


def _binary_table(metrics: dict) -> Table:
    """The table the seed papers print for the binary task: TN, FP, FN, TP; accuracy, precision, recall, F1."""
    rows = []
    for name, row in metrics["per_label"].items():
        for cells in (row, row["at_0_5"]):
            rows.append([name, cells["threshold"], *(cells[k] for k in ("tn", "fp", "fn", "tp")),
                         *(_percent(cells[k]) for k in ("accuracy", "precision", "recall", "f1"))])
    return Table("Binary task, as the seed papers tabulate it", ["finding", "threshold", "TN", "FP", "FN", "TP",
                                                                 "accuracy", "precision", "recall", "F1"], rows)


def _counts_table(caption: str, key: str, counts: dict, total: int) -> Table:
    return Table(caption, [key, "images", "share"],
                 [[name, n, _percent(n / total if total else None)] for name, n in counts.items()])


def _dataset_section(metrics: dict) -> Section:
    summary = metrics.get("dataset")
    section = Section("dataset", "Dataset")
    n = metrics["n_images"]
    patients = f" of {metrics['n_patients']} patients" if metrics.get("n_patients") is not None else ""
    section.text.append(f"{n} images{patients} scored (split {metrics['split']}); {metrics['task']} task over "
                        f"{len(metrics['labels'])} label(s).")
    if not summary:
        section.text.append("No dataset summary was computed.")
        return section
    whole = summary.get("images_dataset") or {}
    if whole.get("splits"):
        section.tables.append(Table(f"The whole scored images dataset ({whole['url']}), from its manifest",
                                    ["split", "images"], [[k, v] for k, v in whole["splits"].items()]))
    section.tables.append(_counts_table("Scored images by split", "split", summary["by_split"], n))
    section.tables.append(Table("Positives per finding (scored images)", ["finding", "positives", "prevalence"],
                                [[name, count, _percent(count / n if n else None)]
                                 for name, count in summary["positives_by_label"].items()]
                                + [["No Finding (all labels 0)", summary["no_finding"],
                                    _percent(summary["no_finding"] / n if n else None)]]))
    for key, title in (("view", "view position"), ("sex", "sex"), ("age_band", "age band (years)")):
        section.tables.append(_counts_table(f"Scored images by {title}", key, summary[f"by_{key}"], n))
    source = summary.get("demographics_from")
    section.text.append(f"View, sex and age from: {source}." if source else
                        "View, sex and age unknown: neither the predictions nor a readable images dataset hold them.")
    return section


def _metrics_section(metrics: dict) -> Section:
    section = Section("metrics", "Metrics (computed by Spark, exact)")
    section.text.append(f"Model {metrics['model']['name']} ({metrics['model']['version']}), input "
                        f"{metrics['model']['input_size']} px; predictions {metrics['predictions']}. A prediction is "
                        "positive when p >= threshold. AUROC and average precision are exact (ties grouped), "
                        "not binned.")
    if metrics["task"] == "binary":
        section.tables.append(_binary_table(metrics))
    section.tables.append(_threshold_table(metrics, "Per finding at the model's tuned thresholds "
                                                    "(max F1 on validation)", at_half=False))
    section.tables.append(_threshold_table(metrics, "Per finding at threshold 0.5", at_half=True))
    section.text.append(UNDEFINED_NOTE)
    return section


def _curves_section(metrics: dict, max_curve_points: int | None) -> Section:
    section = Section("curves", "ROC and precision-recall curves",
                      figures=[("roc", "ROC curve per finding"), ("pr", "Precision-recall curve per finding")])
    section.text.append("Each curve runs through the exact (threshold, TPR/FPR or precision/recall) points at every "
                        "distinct score, computed by Spark.")
    if max_curve_points is not None:
        thinned = [name for name, row in metrics["per_label"].items() if row["n_distinct_scores"] > max_curve_points]
        if thinned:
            section.text.append(f"Plot only: {', '.join(thinned)} have more than {max_curve_points} distinct scores, "
                                f"so their curves are drawn through {max_curve_points} evenly spaced exact points "
                                "(bucketed for the plot); the metrics use every score.")
    if "baseline" in metrics:
        section.text.append("Dashed: the baseline.")
    return section


def _confusion_section() -> Section:
    return Section("confusion", "Confusion matrices",
                   text=["Rows: actual (0, 1); columns: predicted (0, 1). Cells hold image counts."],
                   figures=[("confusion_tuned", "At the model's tuned thresholds"),
                            ("confusion_half", "At threshold 0.5")])


def _training_section(training: dict | None) -> Section:
    section = Section("training", "Training curves")
    if training:
        section.text.append(f"Model {training.get('model_version')} from {training['model_dir']}: loss and AUROC per "
                            "epoch, train beside validation (from model.json).")
        section.figures.append(("training", "Training curves"))
    else:
        section.text.append("No training history: the predictions' manifest names no readable model folder.")
    return section


def _baseline_section(metrics: dict) -> Section:
    section = Section("baseline", "Baseline beside the model")
    baseline = metrics.get("baseline")
    if not baseline:
        section.text.append("No baseline predictions were given (cxr-spark report --baseline PREDICTIONS_DIR).")
        return section
    ours, theirs = metrics["model"], baseline["model"]
    section.text.append(f"Model: {ours['name']} ({ours['version']}). Baseline: {theirs['name']} ({theirs['version']}), "
                        f"{baseline['n_images']} images from {baseline['predictions']}.")
    overlap = baseline.get("image_overlap") or {}
    if any(overlap.values()):
        section.text.append(f"The two cover different images: {overlap}.")
    keys = ("auroc", "average_precision", "f1")
    header = ["finding"] + [f"{who} {key}" for key in ("AUROC", "AP", "F1") for who in ("model", "baseline")]
    rows = [[name, *(value for key in keys
                     for value in (metrics["per_label"][name][key], baseline["per_label"][name][key]))]
            for name in metrics["labels"]]
    for block in ("macro", "micro"):
        rows.append([block, *(value for key in keys for value in (metrics[block][key], baseline[block][key]))])
    section.tables.append(Table("AUROC, average precision and F1 (F1 at each model's own tuned thresholds)",
                                header, rows))
    section.tables.append(_threshold_table(baseline, "Baseline per finding at its tuned thresholds", at_half=False))
    return section


def _references_section(metrics: dict) -> Section:
    section = Section("references", f"Published reference figures ({REFERENCE_MARK})")
    section.text.append("These figures were measured by other authors on their own splits and models. They are "
                        f"{REFERENCE_MARK}s, printed beside ours for orientation only.")
    shared = [name for name in metrics["labels"] if name in CHEXNET_AUROC]
    if shared:
        section.tables.append(Table(
            f"CheXNet AUROC on ChestX-ray14 ({REFERENCE_MARK}) beside our AUROC. Source: {CHEXNET_CITATION}",
            ["finding", f"CheXNet AUROC ({REFERENCE_MARK})", "our AUROC"],
            [[name, f"{CHEXNET_AUROC[name]:.4f}", metrics["per_label"][name]["auroc"]] for name in shared]))
    ours = next(iter(metrics["per_label"].values())) if metrics["task"] == "binary" else None
    section.tables.append(Table(
        f"Kaggle pneumonia test split, binary ({REFERENCE_MARK}). Source: {KAGGLE_CITATION}",
        ["metric", f"seed papers ({REFERENCE_MARK})", "ours"],
        [[name, _percent(KAGGLE_PNEUMONIA[name]),
          _percent(ours[name]) if ours else "not comparable: our task is not the binary Kaggle task"]
         for name in ("accuracy", "f1")]))
    return section


def _point(point: list | None) -> str:
    return NOT_AVAILABLE if point is None else f"({point[0]:.0f}, {point[1]:.0f})"


def _in_box(value: bool | None) -> str:
    return "no box" if value is None else "yes" if value else "no"


def _gradcam_section(metrics: dict) -> Section:
    section = Section("gradcam", "Grad-CAM heatmaps", figure_files=True)
    gradcam = metrics.get("gradcam") or {"status": "skipped", "reason": "not computed by this version"}
    if gradcam["status"] != "computed":
        section.text.append(f"Not computed: {gradcam['reason']}.")
        return section
    section.text.append(
        f"Where model {gradcam['model_version']} looks: {gradcam['method']} over layer {gradcam['layer']}, for each "
        f"finding's {gradcam['target']}, on the {gradcam['top_k']} highest-scoring images of each finding (from "
        f"{gradcam['images']}). Hot colours mark where the finding's score rises most with that layer's "
        "activations; the white cross is the heatmap's peak, green rectangles are bounding boxes.")
    if gradcam["bbox"]:
        section.text.append(
            f"Boxes from {gradcam['bbox']}. A peak is in the box when the centre of the heatmap's hottest cell, "
            "mapped onto the image as ingested, lies inside that image's box for that finding. Each finding's hit "
            "fraction is over its scored images with a box (at most "
            f"{gradcam['max_boxed_per_finding']} per finding, the highest-scoring first); a heatmap that is zero "
            f"everywhere has no peak and counts as outside. {NOT_AVAILABLE}: no scored image has a box for it.")
    else:
        section.text.append(f"No bounding boxes, so no hit fractions ({NOT_AVAILABLE}): give cxr-spark report "
                            "--bbox BBox_List_2017.csv, or ingest with --bbox.")
    per_label = gradcam["per_label"]
    section.tables.append(Table("Heatmap peaks inside the bounding box, per finding",
                                ["finding", "scored images with a box", "checked", "peaks in box", "hit fraction"],
                                [[name, row["boxed_images_scored"], row["boxed_images"], row["peaks_in_box"],
                                  row["bbox_hit_fraction"]] for name, row in per_label.items()]))
    entries = [(name, entry) for name, row in per_label.items() for entry in row["top"]]
    section.tables.append(Table(
        f"The {gradcam['top_k']} highest-scoring images per finding",
        ["finding", "rank", "image", "probability", "label", "peak (x, y)", "peak in box", "overlay"],
        [[name, entry["rank"], entry["image_id"], entry["probability"], entry["label"], _point(entry["peak"]),
          _in_box(entry["peak_in_box"]), entry["overlay"]] for name, entry in entries]))
    section.figures += [(entry["overlay"], f"{name} #{entry['rank']}: {entry['image_id']}, p = "
                                           f"{entry['probability']:.3f}, label {entry['label']}")
                        for name, entry in entries]
    return section


def _model_card_section(metrics: dict) -> Section:
    """How the scored model was trained and from what: what a reader needs to reproduce or trust it."""
    card = metrics.get("model_card")
    section = Section("model-card", "Model card")
    if not card:
        section.text.append("No model.json was found through the predictions' manifest.")
        return section
    mlflow = card.get("mlflow") or {}
    rows = [["data", card.get("data", "unknown")], ["best epoch", card.get("best_epoch")],
            ["best val_loss", card.get("best_val_loss")], ["how training ended", card.get("ended")],
            ["code version", card.get("code_version")], ["command", card.get("command")],
            ["MLflow run", f"{mlflow['run_id']} in {mlflow['tracking_uri']}" if mlflow else "not tracked"],
            ["registered model", mlflow.get("model_uri", NOT_AVAILABLE)]]
    rows += [[name, version] for name, version in (card.get("libraries") or {}).items()]
    section.tables.append(Table("From model.json", ["", "value"], rows))
    return section


def synthetic_banner(metrics: dict) -> str | None:
    """The warning a report of synthetic data opens with, or None."""
    if metrics.get("data") != "synthetic":
        return None
    return ("SYNTHETIC DATA: these images were generated by cxr-spark synth, not taken of patients; the figures "
            "test the pipeline, not a model's clinical value.")


def build_sections(metrics: dict, training: dict | None = None, max_curve_points: int | None = None) -> list[Section]:
    """The report's sections in order, from ``metrics.json`` (and where the training curves came from): the
    summary first, then the dataset, the metrics and the clinical evaluation of them."""
    return [summary_section(metrics), _dataset_section(metrics), _metrics_section(metrics),
            *clinical_sections(metrics), _curves_section(metrics, max_curve_points), _confusion_section(),
            _training_section(training), _model_card_section(metrics), _baseline_section(metrics),
            _gradcam_section(metrics), _references_section(metrics)]


def _title(metrics: dict) -> str:
    return f"cxr-spark evaluation: {metrics['model']['name']} ({metrics['model']['version']})"


def _markdown_cell(cell) -> str:
    return f"**{fmt(cell)}**" if isinstance(cell, Cell) else fmt(cell)


def render_markdown(metrics: dict) -> str:
    """``report.md``: every table of the report; the figures are in ``report.html``."""
    lines = [f"# {_title(metrics)}", ""]
    if synthetic_banner(metrics):
        lines += [f"> **{synthetic_banner(metrics)}**", ""]
    for section in build_sections(metrics):
        lines += [f"## {section.title}", ""]
        for paragraph in section.text:
            lines += [paragraph, ""]
        if section.figure_files:
            lines += [f"![{caption}]({key})" for key, caption in section.figures] + [""] * bool(section.figures)
        elif section.figures:
            lines += ["Figures: " + ", ".join(caption for _, caption in section.figures) + " (see report.html).", ""]
        for table in section.tables:
            lines += [f"**{table.caption}**", "", "| " + " | ".join(table.header) + " |",
                      "| --- |" + " ---: |" * (len(table.header) - 1)]
            lines += ["| " + " | ".join(_markdown_cell(cell) for cell in row) + " |" for row in table.rows]
            lines.append("")
    return "\n".join(lines)


STYLE = """
section#references { border-left: 4px solid #c60; padding-left: 1em; background: #fff8f0; }
.reference { color: #a40; font-weight: bold; }
p.banner { background: #fde8e8; border: 2px solid #b00; color: #800; font-weight: bold; padding: 0.6em 1em; }
section#gradcam figure { display: inline-block; width: 264px; margin: 0 0.5em 1em 0; vertical-align: top; }
section#gradcam figcaption { font-size: 0.8em; overflow-wrap: anywhere; }
section#summary { border-left: 4px solid #36c; padding-left: 1em; background: #f2f6ff; }
section#summary td { text-align: left; }
td.largest-gap, td.worst-calibrated { background: #ffe08a; font-weight: bold; }
"""


def _html_cell(cell) -> str:
    css = f" class=\"{html.escape(cell.css_class, quote=True)}\"" if isinstance(cell, Cell) else ""
    return f"<td{css}>{html.escape(fmt(cell))}</td>"


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in table.header)
    body = "".join("<tr>" + "".join(_html_cell(cell) for cell in row) + "</tr>" for row in table.rows)
    return f"<table><caption>{html.escape(table.caption)}</caption><tr>{head}</tr>{body}</table>"


def render_html(metrics: dict, figures: dict[str, bytes], training: dict | None = None,
                max_curve_points: int | None = None) -> str:
    """``report.html``: one self-contained page; ``figures`` maps a figure key to PNG bytes."""
    sections = build_sections(metrics, training, max_curve_points)
    parts = [page_head(_title(metrics), STYLE),
             "<nav>" + " | ".join(f"<a href=\"#{section.id}\">{html.escape(section.title)}</a>"
                                  for section in sections) + "</nav>"]
    if synthetic_banner(metrics):
        parts.insert(1, f"<p id=\"synthetic\" class=\"banner\">{html.escape(synthetic_banner(metrics))}</p>")
    for section in sections:
        parts.append(f"<section id=\"{section.id}\"><h2>{html.escape(section.title)}</h2>")
        if section.id == "references":
            parts.append(f"<p class=\"reference\">{html.escape(REFERENCE_MARK.capitalize())}.</p>")
        parts += [f"<p>{html.escape(paragraph)}</p>" for paragraph in section.text]
        for key, caption in section.figures:
            if key in figures:
                parts.append(figure(key, figures[key], caption))
        parts += [_html_table(table) for table in section.tables]
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
