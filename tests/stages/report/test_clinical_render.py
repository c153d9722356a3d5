"""The summary and the clinical sections of report.html and report.md, rendered from a hand-built metrics.json:
each figure shown is the one in the dict (worst finding, largest gap, intervals, operating points, worst ECE
found here from the dict's own numbers), and a metrics.json without the clinical keys says "Not computed"."""
from __future__ import annotations

import copy
import io
import math
import re

import pytest
from PIL import Image

from cxr_spark.core.plots import plot_reliability
from cxr_spark.stages.report.render import build_sections, render_html, render_markdown

LABELS = ["Atelectasis", "Effusion", "Hernia"]
AUROC = {"Atelectasis": 0.71, "Effusion": 0.86, "Hernia": None}  # Hernia: no positives
SUBGROUP_AUROC = {  # attribute -> group -> finding -> AUROC
    "sex": {"M": {"Atelectasis": 0.74, "Effusion": 0.80, "Hernia": None},
            "F": {"Atelectasis": 0.69, "Effusion": 0.91, "Hernia": None}},
    "view": {"PA": {"Atelectasis": 0.78, "Effusion": 0.84, "Hernia": None},
             "AP": {"Atelectasis": 0.61, "Effusion": 0.88, "Hernia": None}},
}
CLINICAL_KEYS = ("n_patients", "bootstrap", "subgroups", "subgroup_gaps", "summary")


def _rates(threshold: float) -> dict:
    return {"threshold": threshold, "tp": 8, "fp": 5, "tn": 30, "fn": 7, "accuracy": 0.76, "precision": 0.615,
            "recall": 0.533, "specificity": 0.857, "f1": 0.571}


def _bins(pairs: list[tuple[int, float | None, float | None]]) -> list[dict]:
    return [{"lower": i / 10, "upper": (i + 1) / 10, "n": n, "mean_probability": p, "fraction_positive": f}
            for i, (n, p, f) in enumerate(pairs)]


def _point(threshold, sensitivity, specificity) -> dict:
    return {"threshold": threshold, "sensitivity": sensitivity, "specificity": specificity}


def _group(n_images: int, aurocs: dict) -> dict:
    defined = [a for a in aurocs.values() if a is not None]
    return {"n_images": n_images, "macro_auroc": sum(defined) / len(defined) if defined else None,
            "per_label": {name: {"auroc": auroc, "support": 0 if auroc is None else 9,
                                 "sensitivity": None if auroc is None else 0.5, "specificity": 0.8}
                          for name, auroc in aurocs.items()}}


@pytest.fixture()
def metrics() -> dict:
    """Hand-written numbers; the gaps and the summary are typed in, not derived from the subgroups."""
    per_label = {}
    eces = {"Atelectasis": 0.042, "Effusion": 0.118, "Hernia": 0.007}
    for i, name in enumerate(LABELS):
        points = {f"sensitivity_at_specificity_{t}": _point(0.41 + i / 100, 0.52, 0.91) for t in ("0.90", "0.95")}
        points.update({f"specificity_at_sensitivity_{t}": _point(0.2, 0.93, 0.44) for t in ("0.90", "0.95")})
        if name == "Effusion":
            points["specificity_at_sensitivity_0.95"] = _point(None, 0.0, 1.0)
        if name == "Hernia":
            points = {key: _point(None, None, None) for key in points}
        per_label[name] = {**_rates(0.4 + i / 10), "support": 0 if name == "Hernia" else 15, "auroc": AUROC[name],
                           "average_precision": None if name == "Hernia" else 0.5, "at_0_5": _rates(0.5),
                           "n_distinct_scores": 40,
                           "auroc_ci": None if name == "Hernia" else [AUROC[name] - 0.061, AUROC[name] + 0.052],
                           "operating_points": points,
                           "calibration": {"brier": 0.1 + i / 100, "ece": eces[name],
                                           "bins": _bins([(5, 0.05, 0.0), (0, None, None)] + [(5, 0.1 * k + 0.05,
                                                                                               0.1 * k)
                                                                                              for k in range(2, 10)])}}
    macro = {key: 0.6 for key in ("accuracy", "precision", "recall", "specificity", "f1")}
    return {
        "task": "multilabel", "labels": LABELS, "n_images": 50, "split": "test", "data": "synthetic",
        "per_label": per_label,
        "macro": {**macro, "auroc": 0.785, "average_precision": 0.5, "at_0_5": macro, "auroc_ci": [0.731, 0.832]},
        "micro": {**_rates(None), "auroc": 0.77, "average_precision": 0.49, "at_0_5": _rates(None)},
        "model": {"name": "small_cnn", "version": "m-7", "input_size": 32}, "predictions": "file:///p",
        "n_patients": 21,
        "bootstrap": {"replicates": 1000, "seed": 0, "unit": "patient", "confidence": 0.95, "units": 21},
        "subgroups": {attribute: {group: _group(25, aurocs) for group, aurocs in groups.items()}
                      for attribute, groups in SUBGROUP_AUROC.items()},
        "subgroup_gaps": {"sex": {"Atelectasis": {"gap": 0.05, "highest": "M", "lowest": "F"},
                                  "Effusion": {"gap": 0.11, "highest": "F", "lowest": "M"}, "Hernia": None},
                          "view": {"Atelectasis": {"gap": 0.17, "highest": "PA", "lowest": "AP"},
                                   "Effusion": {"gap": 0.04, "highest": "AP", "lowest": "PA"}, "Hernia": None}},
        "summary": {"model": "small_cnn m-7", "data": "synthetic", "n_images": 50, "n_patients": 21,
                    "macro_auroc": 0.785, "macro_auroc_ci": [0.731, 0.832],
                    "best_finding": {"name": "Effusion", "auroc": 0.86},
                    "worst_finding": {"name": "Atelectasis", "auroc": 0.71},
                    "largest_gap": {"attribute": "view", "finding": "Atelectasis", "gap": 0.17, "highest": "PA",
                                    "lowest": "AP"},
                    "worst_calibrated": {"name": "Effusion", "ece": 0.118}},
    }


def _section(page: str, section_id: str) -> str:
    return page.split(f'<section id="{section_id}">')[1].split("</section>")[0]


def _markdown_row(markdown: str, first_cells: str) -> str:
    return next(line for line in markdown.splitlines() if line.startswith(f"| {first_cells} |"))


def test_the_summary_opens_the_page_after_the_banner_and_names_the_result(metrics):
    page = render_html(metrics, {})
    assert build_sections(metrics)[0].id == "summary"
    assert re.findall(r'<section id="([^"]+)">', page)[0] == "summary"
    assert page.index('id="synthetic"') < page.index('<section id="summary">') < page.index('<section id="dataset">')
    defined = {name: row["auroc"] for name, row in metrics["per_label"].items() if row["auroc"] is not None}
    worst, best = min(defined, key=defined.get), max(defined, key=defined.get)
    summary = _section(page, "summary")
    assert f"<td>worst finding</td><td>{worst} (AUROC {defined[worst]:.3f})</td>" in summary
    assert f"<td>best finding</td><td>{best} (AUROC {defined[best]:.3f})</td>" in summary
    lower, upper = metrics["macro"]["auroc_ci"]
    assert f"<td>macro AUROC, 95% interval</td><td>{lower:.3f} to {upper:.3f}</td>" in summary
    assert f"<td>patients scored</td><td>{metrics['n_patients']}</td>" in summary
    eces = {name: row["calibration"]["ece"] for name, row in metrics["per_label"].items()}
    worst_calibrated = max(eces, key=eces.get)
    assert f"{worst_calibrated} (ECE {eces[worst_calibrated]:.3f})" in summary
    # the largest gap over both attributes, with the two groups' AUROC read from the subgroups
    attribute, finding, high, low = max(
        ((a, f, max(groups, key=lambda g: groups[g][f]), min(groups, key=lambda g: groups[g][f]))
         for a, groups in SUBGROUP_AUROC.items() for f in ("Atelectasis", "Effusion")),
        key=lambda t: SUBGROUP_AUROC[t[0]][t[2]][t[1]] - SUBGROUP_AUROC[t[0]][t[3]][t[1]])
    high_auroc, low_auroc = SUBGROUP_AUROC[attribute][high][finding], SUBGROUP_AUROC[attribute][low][finding]
    assert (f"{finding} by view position: AUROC {high_auroc:.3f} ({high}) vs {low_auroc:.3f} ({low}), "
            f"gap {high_auroc - low_auroc:.3f}") in summary
    nav = page.split("<nav>")[1].split("</nav>")[0]
    assert re.findall(r'href="#([^"]+)"', nav)[:7] == ["summary", "dataset", "metrics", "uncertainty",
                                                       "operating-points", "subgroups", "calibration"]


def test_each_attributes_largest_gap_cell_is_flagged(metrics):
    page = render_html(metrics, {})
    tables = re.findall(r"<table><caption>AUROC by (.*?)</caption>(.*?)</table>", _section(page, "subgroups"))
    assert [title for title, _ in tables] == ["sex", "view position"]
    for (_, table), groups in zip(tables, SUBGROUP_AUROC.values()):
        gaps = {f: max(g[f] for g in groups.values()) - min(g[f] for g in groups.values())
                for f in ("Atelectasis", "Effusion")}
        widest = max(gaps, key=gaps.get)
        flagged = re.findall(r"<tr><td>([^<]*)</td>(?:<td>[^<]*</td>)*<td class=\"largest-gap\">([^<]*)</td>", table)
        assert flagged == [(widest, f"{gaps[widest]:.3f}")]
        other = next(f for f in gaps if f != widest)
        assert f"<td>{gaps[other]:.3f}</td>" in table
    markdown = render_markdown(metrics)
    assert _markdown_row(markdown, "Atelectasis | 0.780 | 0.610").endswith("| **0.170** | PA | AP |")
    assert "| Hernia | n/a | n/a | n/a | n/a | n/a |" in markdown  # no AUROC in any group, so no gap


def test_intervals_operating_points_and_calibration_are_tabulated(metrics):
    markdown = render_markdown(metrics)
    effusion = metrics["per_label"]["Effusion"]
    lower, upper = effusion["auroc_ci"]
    assert f"| Effusion | 15 | {effusion['auroc']:.3f} | {lower:.3f} | {upper:.3f} |" in markdown
    assert "| macro (mean over labels) |  | 0.785 | 0.731 | 0.832 |" in markdown
    assert "| Hernia | 0 | n/a | n/a | n/a |" in markdown
    uncertainty = markdown.split("## Uncertainty")[1].split("\n## ")[0]
    assert "bootstrap over the 21 patients" in uncertainty and "1000 replicates, seed 0" in uncertainty
    assert "2.5th to the 97.5th percentile" in uncertainty
    tables = markdown.split("## Operating points")[1].split("\n## ")[0]
    sensitivity_table = tables.split("**Sensitivity where the specificity reaches 0.90 and 0.95**")[1].split("\n\n")[1]
    point = effusion["operating_points"]["sensitivity_at_specificity_0.95"]
    assert f"| Effusion | 0.420 | 0.520 | 0.910 | {point['threshold']:.3f} |" in sensitivity_table
    specificity_table = tables.split("**Specificity where the sensitivity reaches 0.90 and 0.95**")[1].split("\n\n")[1]
    assert "| Effusion | 0.200 | 0.930 | 0.440 | none | 0.000 | 1.000 |" in specificity_table
    assert "| Hernia |" + " n/a |" * 6 in specificity_table
    eces = {name: row["calibration"]["ece"] for name, row in metrics["per_label"].items()}
    worst = max(eces, key=eces.get)
    page = render_html(metrics, {"reliability": b"\x89PNG fake"})
    calibration = _section(page, "calibration")
    assert f'<td class="worst-calibrated">{eces[worst]:.3f}</td>' in calibration
    assert calibration.count("worst-calibrated") == 1 and 'id="figure-reliability"' in calibration
    brier = metrics["per_label"]["Atelectasis"]["calibration"]["brier"]
    assert f"| Atelectasis | 15 | {brier:.3f} | {eces['Atelectasis']:.3f} |" in markdown


def test_a_metrics_json_without_the_clinical_keys_says_not_computed(metrics):
    older = copy.deepcopy(metrics)
    for key in CLINICAL_KEYS:
        del older[key]
    for row in older["per_label"].values():
        for key in ("auroc_ci", "operating_points", "calibration"):
            del row[key]
    del older["macro"]["auroc_ci"]
    page, markdown = render_html(older, {}), render_markdown(older)
    for section, what in (("summary", "summary"), ("uncertainty", "bootstrap intervals"),
                          ("operating-points", "operating points"), ("subgroups", "subgroups"),
                          ("calibration", "calibration")):
        assert f"<p>Not computed: metrics.json has no {what} (" in _section(page, section), section
        assert "<table>" not in _section(page, section) and "<img" not in _section(page, section)
    assert markdown.count("Not computed: metrics.json has no") == 5
    no_attributes = {**metrics, "subgroups": None, "subgroup_gaps": None}
    assert "No subgroups: sex, view and age are unknown" in _section(render_html(no_attributes, {}), "subgroups")


def test_groups_without_images_are_left_out_of_the_subgroup_tables(metrics):
    metrics["subgroups"]["age_band"] = {band: _group(0, dict.fromkeys(LABELS)) for band in ("0-17", "80+")}
    metrics["subgroups"]["view"]["LL"] = _group(0, dict.fromkeys(LABELS))
    metrics["subgroup_gaps"]["age_band"] = dict.fromkeys(LABELS)
    subgroups = _section(render_html(metrics, {}), "subgroups")
    assert "<p>No table by age band (years): unknown for every image.</p>" in subgroups
    assert "AUROC by age band" not in subgroups and "<th>LL</th>" not in subgroups
    assert "<p>Groups without images, left out: LL (view position).</p>" in subgroups
    view = subgroups.split("<caption>AUROC by view position</caption>")[1].split("</table>")[0]
    assert re.findall(r"<th>([^<]*)</th>", view) == ["finding", "PA", "AP", "gap (highest - lowest)", "highest",
                                                     "lowest"]


def test_the_reliability_figure_is_a_png_of_one_panel_per_calibrated_finding(metrics):
    per_label = copy.deepcopy(metrics["per_label"])
    for i in range(5):  # eight calibrated findings: two rows of four panels
        per_label[f"Extra {i}"] = copy.deepcopy(per_label["Effusion"])
    per_label["Uncalibrated"] = {key: value for key, value in per_label["Hernia"].items() if key != "calibration"}
    panels = sum("calibration" in row for row in per_label.values())
    with Image.open(io.BytesIO(plot_reliability(per_label))) as image:
        assert image.format == "PNG"
        # 3-inch panels at 72 dpi, at most four to a row (the other grids' layout)
        assert image.size == (216 * min(4, panels), 216 * math.ceil(panels / 4)) == (864, 432)
        assert len(set(image.convert("L").getdata())) > 20  # axes, text and the curves, not a flat fill
