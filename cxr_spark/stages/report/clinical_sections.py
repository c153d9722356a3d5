"""The report's summary and its clinical evaluation, rendered from what :mod:`cxr_spark.stages.report.clinical`
adds to ``metrics.json``: AUROC with bootstrap intervals, operating points at a fixed sensitivity or
specificity, AUROC and rates per subgroup (sex, view, age band) with the largest gap between groups, and
calibration (Brier score, ECE, reliability diagram). Pure functions: no Spark, no files.

A ``metrics.json`` without these keys (written before they existed, or a baseline's) gets one line saying
what was not computed instead of the section's tables.
"""
from __future__ import annotations

import re

from cxr_spark.stages.report.clinical import GAP_MIN_CASES
from cxr_spark.stages.report.tables import NOT_AVAILABLE, Cell, Section, Table, fmt

LARGEST_GAP = "largest-gap"  # CSS class of the gap cell that is its attribute's largest
WORST_CALIBRATED = "worst-calibrated"  # CSS class of the highest ECE
ATTRIBUTE_TITLES = {"sex": "sex", "view": "view position", "age_band": "age band (years)"}
MACRO_ROW = "macro (mean over labels)"
# "sensitivity_at_specificity_0.90": the sensitivity measured where the specificity meets 0.90
OPERATING_POINT = re.compile(r"^(sensitivity|specificity)_at_(sensitivity|specificity)_([0-9.]+)$")


def not_computed(what: str) -> str:
    """The one line a section holds when ``metrics.json`` lacks its key."""
    return f"Not computed: metrics.json has no {what} (written before it was computed, or a baseline's metrics)."


def _interval(interval: list | None) -> str:
    return NOT_AVAILABLE if interval is None else f"{interval[0]:.3f} to {interval[1]:.3f}"


def _level(metrics: dict) -> str:
    """The intervals' confidence as a percentage, e.g. ``95%``."""
    return f"{100 * (metrics.get('bootstrap') or {}).get('confidence', 0.95):g}%"


def _named(entry: dict | None, measure: str, key: str) -> str:
    return NOT_AVAILABLE if entry is None else f"{entry['name']} ({measure} {entry[key]:.3f})"


def _group_auroc(metrics: dict, attribute: str, group: str, finding: str) -> float | None:
    groups = (metrics.get("subgroups") or {}).get(attribute) or {}
    return ((groups.get(group) or {}).get("per_label") or {}).get(finding, {}).get("auroc")


def _gap_text(metrics: dict, gap: dict | None) -> str:
    if gap is None:
        return NOT_AVAILABLE
    high, low = (_group_auroc(metrics, gap["attribute"], gap[end], gap["finding"]) for end in ("highest", "lowest"))
    return (f"{gap['finding']} by {ATTRIBUTE_TITLES.get(gap['attribute'], gap['attribute'])}: AUROC {fmt(high)} "
            f"({gap['highest']}) vs {fmt(low)} ({gap['lowest']}), gap {gap['gap']:.3f}")


def summary_section(metrics: dict) -> Section:
    """What a reader who reads nothing else should know: who was scored on what, and how well."""
    section = Section("summary", "Summary")
    summary = metrics.get("summary")
    if not summary:
        section.text.append(not_computed("summary"))
        return section
    patients = summary.get("n_patients")
    section.tables.append(Table("The result in brief", ["", "value"], [
        ["model", summary.get("model")], ["data scored", summary.get("data", "unknown")],
        ["images scored", summary.get("n_images")], ["patients scored", "unknown" if patients is None else patients],
        ["macro AUROC", fmt(summary.get("macro_auroc"))],
        [f"macro AUROC, {_level(metrics)} interval", _interval(summary.get("macro_auroc_ci"))],
        ["best finding", _named(summary.get("best_finding"), "AUROC", "auroc")],
        ["worst finding", _named(summary.get("worst_finding"), "AUROC", "auroc")],
        ["largest subgroup gap", _gap_text(metrics, summary.get("largest_gap"))],
        ["worst-calibrated finding", _named(summary.get("worst_calibrated"), "ECE", "ece")]]))
    section.text.append("The result in brief; best and worst by AUROC over the findings where it is defined. "
                        "Details below: intervals under Uncertainty, gaps under Subgroups, ECE under Calibration.")
    return section


def _uncertainty_section(metrics: dict) -> Section:
    section = Section("uncertainty", "Uncertainty: AUROC with bootstrap intervals")
    bootstrap = metrics.get("bootstrap")
    if not bootstrap:
        section.text.append(not_computed("bootstrap intervals"))
        return section
    level, confidence = _level(metrics), bootstrap["confidence"]
    units, patients = bootstrap["units"], metrics.get("n_patients")
    if bootstrap["unit"] == "patient":
        over = f"the {units} patients scored" if patients in (None, units) else (
            f"{units} units: the {patients} patients scored, and each image without a patient id on its own")
        weights = "every patient by a Poisson(1) count, all of their images together"
    else:
        over = (f"the {units} images scored (no patient ids: images of one patient are weighed independently, "
                "which can make the interval too narrow)")
        weights = "every image by a Poisson(1) count"
    section.text.append(f"{level} intervals: percentile bootstrap over {over}; {bootstrap['replicates']} replicates, "
                        f"seed {bootstrap['seed']}. Each replicate weighs {weights} (the usual stand-in for drawing "
                        f"them with replacement). An interval runs from the {100 * (1 - confidence) / 2:g}th to the "
                        f"{100 * (1 + confidence) / 2:g}th percentile of the replicates' AUROC (the macro: of their "
                        f"macro AUROC). {NOT_AVAILABLE}: AUROC undefined (no positives or no negatives).")
    rows = [[name, row["support"], row["auroc"], *(row.get("auroc_ci") or (None, None))]
            for name, row in metrics["per_label"].items()]
    rows.append([MACRO_ROW, "", metrics["macro"]["auroc"], *(metrics["macro"].get("auroc_ci") or (None, None))])
    section.tables.append(Table(f"AUROC per finding with its {level} interval",
                                ["finding", "support", "AUROC", f"{level} lower", f"{level} upper"], rows))
    return section


def _point_cells(point: dict | None) -> list:
    """Threshold, the measured rate, the fixed rate; ``none`` where only calling every image negative meets
    the target."""
    if not point or all(value is None for value in point.values()):
        return [None, None, None]
    threshold = "none" if point.get("threshold") is None else point["threshold"]
    return [threshold, *(point.get(key) for key in ("sensitivity", "specificity"))]


def _operating_points_section(metrics: dict) -> Section:
    section = Section("operating-points", "Operating points")
    per_label = metrics["per_label"]
    keys = list(dict.fromkeys(key for row in per_label.values() for key in row.get("operating_points") or {}))
    if not keys:
        section.text.append(not_computed("operating points"))
        return section
    section.text.append("Each point is the best threshold on these images whose fixed rate reaches the target: the "
                        "highest sensitivity at a specificity target, the highest specificity at a sensitivity "
                        "target; ties go to the highest threshold. A prediction is positive when p >= threshold. "
                        "none: calling every image negative is the best point (sensitivity 0, specificity 1). "
                        f"{NOT_AVAILABLE}: the finding has no positives or no negatives.")
    by_fixed: dict[str, list[tuple[str, str]]] = {}
    for key in keys:
        match = OPERATING_POINT.match(key)
        if match:
            by_fixed.setdefault(match.group(2), []).append((match.group(3), key))
    for fixed, points in by_fixed.items():
        measured = "specificity" if fixed == "sensitivity" else "sensitivity"
        header = ["finding"] + [f"{target}: {column}" for target, _ in points
                                for column in ("threshold", "sensitivity", "specificity")]
        rows = [[name, *(cell for _, key in points for cell in _point_cells((row.get("operating_points") or {})
                                                                             .get(key)))]
                for name, row in per_label.items()]
        targets = " and ".join(target for target, _ in points)
        section.tables.append(Table(f"{measured.capitalize()} where the {fixed} reaches {targets}", header, rows))
    return section


def _subgroup_tables(labels: list[str], attribute: str, groups: dict, gaps: dict) -> list[Table]:
    """AUROC per group with the gap between the highest and lowest (the attribute's largest flagged), and
    sensitivity and specificity per group at the model's tuned thresholds."""
    names = list(groups)
    title = ATTRIBUTE_TITLES.get(attribute, attribute)
    largest = max((gap["gap"] for label, gap in gaps.items() if gap and label in labels), default=None)

    def cells(label: str) -> list[dict]:
        return [(groups[name].get("per_label") or {}).get(label) or {} for name in names]

    def gap_cells(gap: dict | None) -> list:
        if gap is None:
            return [None, None, None]
        return [Cell(gap["gap"], LARGEST_GAP) if gap["gap"] == largest else gap["gap"], gap["highest"], gap["lowest"]]

    auroc_rows = [[label, *(cell.get("auroc") for cell in cells(label)), *gap_cells(gaps.get(label))]
                  for label in labels]
    auroc_rows.append([MACRO_ROW, *(groups[name].get("macro_auroc") for name in names), "", "", ""])
    auroc_rows.append(["images", *(groups[name]["n_images"] for name in names), "", "", ""])
    rate_rows = [[label, *(cell.get(key) for cell in cells(label) for key in ("support", "sensitivity", "specificity"))]
                 for label in labels]
    return [Table(f"AUROC by {title}", ["finding", *names, "gap (highest - lowest)", "highest", "lowest"], auroc_rows),
            Table(f"Sensitivity and specificity at the model's tuned thresholds, by {title}",
                  ["finding", *(f"{name} {key}" for name in names for key in ("positives", "sensitivity",
                                                                               "specificity"))], rate_rows)]


def _subgroups_section(metrics: dict) -> Section:
    section = Section("subgroups", "Subgroups: sex, view and age band")
    if "subgroups" not in metrics:
        section.text.append(not_computed("subgroups"))
        return section
    subgroups = metrics["subgroups"]
    if not subgroups:
        section.text.append("No subgroups: sex, view and age are unknown for the scored images.")
        return section
    section.text.append("Each group's AUROC, sensitivity and specificity are over that group's images only. The gap is "
                        "the highest group's AUROC minus the lowest's, over the groups with at least "
                        f"{GAP_MIN_CASES} positives and {GAP_MIN_CASES} negatives for the finding (a smaller group's "
                        "AUROC is shown but says little about a gap); the largest gap of each attribute is "
                        f"highlighted (bold in report.md). {NOT_AVAILABLE}: undefined (no positives or no negatives "
                        "in the group, or fewer than two groups to compare).")
    all_gaps = metrics.get("subgroup_gaps") or {}
    for attribute, groups in subgroups.items():
        seen = {name: group for name, group in (groups or {}).items() if group.get("n_images")}
        if seen:
            section.tables += _subgroup_tables(metrics["labels"], attribute, seen, all_gaps.get(attribute) or {})
        else:
            section.text.append(f"No table by {ATTRIBUTE_TITLES.get(attribute, attribute)}: unknown for every image.")
    unseen = [f"{name} ({ATTRIBUTE_TITLES.get(attribute, attribute)})" for attribute, groups in subgroups.items()
              if any(group.get("n_images") for group in (groups or {}).values())
              for name, group in groups.items() if not group.get("n_images")]
    if unseen:
        section.text.append(f"Groups without images, left out: {', '.join(unseen)}.")
    return section


def _calibration_section(metrics: dict) -> Section:
    section = Section("calibration", "Calibration")
    calibrations = {name: row.get("calibration") for name, row in metrics["per_label"].items()}
    if not any(calibrations.values()):
        section.text.append(not_computed("calibration"))
        return section
    n_bins = max(len(calibration["bins"]) for calibration in calibrations.values() if calibration)
    section.text.append("Brier score: the mean squared difference between the predicted probability and the label (0 "
                        f"is perfect). ECE (expected calibration error): over {n_bins} equal-width bins of predicted "
                        "probability, the mean of |fraction positive - mean predicted probability| weighted by the "
                        "bins' images; the highest is highlighted. In the reliability diagram a well-calibrated "
                        "finding follows the diagonal; grey bars: images per bin.")
    section.figures.append(("reliability", "Reliability diagram per finding: fraction positive against mean "
                                           "predicted probability, per bin"))
    worst = max((calibration["ece"] for calibration in calibrations.values()
                 if calibration and calibration["ece"] is not None), default=None)
    rows = []
    for name, calibration in calibrations.items():
        if calibration is None:
            rows.append([name, metrics["per_label"][name]["support"], None, None])
            continue
        ece = Cell(calibration["ece"], WORST_CALIBRATED) if calibration["ece"] == worst else calibration["ece"]
        rows.append([name, metrics["per_label"][name]["support"], calibration["brier"], ece])
    section.tables.append(Table("Brier score and ECE per finding", ["finding", "support", "Brier", "ECE"], rows))
    return section


def clinical_sections(metrics: dict) -> list[Section]:
    """Uncertainty, operating points, subgroups and calibration, in that order (they follow the metrics)."""
    return [_uncertainty_section(metrics), _operating_points_section(metrics), _subgroups_section(metrics),
            _calibration_section(metrics)]
