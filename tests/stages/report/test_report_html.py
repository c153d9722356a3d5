"""report.html as a person sees it: rendered by headless Chromium (Debian's ``chromium``), whose DOM must
hold every section and the figures of metrics.json, and whose screenshot must not be blank."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from browser import assert_screenshot_not_blank, chromium, needs_chromium
from test_report import write_predictions

from cxr_spark.stages.report.job import report

SECTIONS = ("summary", "dataset", "metrics", "uncertainty", "operating-points", "subgroups", "calibration", "curves",
            "confusion", "training", "baseline", "gradcam", "references")
pytestmark = needs_chromium


@pytest.fixture(scope="module")
def written_report(spark, tmp_path_factory):
    rng = np.random.default_rng(21)
    names = ["Atelectasis", "Effusion", "Pneumonia", "Hernia"]
    labels = (rng.random((120, 4)) < [0.3, 0.4, 0.2, 0.0]).astype(int)
    scores = np.clip(labels * 0.35 + rng.random((120, 4)) * 0.65, 0, 1).round(2).astype(np.float32)
    folder = tmp_path_factory.mktemp("html")
    url = write_predictions(spark, folder / "predictions", labels, scores, names, [0.4, 0.5, 0.45, 0.5])
    baseline = write_predictions(spark, folder / "baseline", labels, rng.random((120, 4)).astype(np.float32), names,
                                 [0.5] * 4, model="logistic_regression", version="lr-1")
    report(spark, str(url), str(folder / "report"), baseline_url=str(baseline))
    return folder / "report"


def test_chromium_renders_every_section_and_our_figures(written_report, tmp_path):
    metrics = json.loads((written_report / "metrics.json").read_text())
    dom = chromium(tmp_path, "--dump-dom", f"file://{written_report / 'report.html'}").stdout
    for section in SECTIONS:
        assert re.search(rf'<section id="{section}">\s*<h2>', dom), section
    assert re.findall(r'<section id="([^"]+)">', dom)[0] == "summary"
    calibrated = any("calibration" in row for row in metrics["per_label"].values())
    # ROC, PR, two confusion grids, and the reliability diagrams when metrics.json holds calibration
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', dom)) == 4 + calibrated
    assert "published reference, not our result" in dom and "0.8094" in dom  # CheXNet Atelectasis, as a reference
    metrics_section = dom.split('<section id="metrics">')[1].split("</section>")[0]
    effusion = metrics["per_label"]["Effusion"]
    row = re.search(r"<tr><td>Effusion</td>(.*?)</tr>", metrics_section).group(1)
    cells = re.findall(r"<td>(.*?)</td>", row)
    assert cells[:6] == [str(effusion[k]) for k in ("support",)] + [f"{effusion['threshold']:.3f}"] + [
        str(effusion[k]) for k in ("tp", "fp", "tn", "fn")]
    assert cells[-2:] == [f"{effusion['auroc']:.3f}", f"{effusion['average_precision']:.3f}"]
    hernia = re.search(r"<tr><td>Hernia</td>(.*?)</tr>", metrics_section).group(1)
    assert metrics["per_label"]["Hernia"]["auroc"] is None and hernia.endswith("<td>n/a</td><td>n/a</td>")
    gradcam_section = dom.split('<section id="gradcam">')[1].split("</section>")[0]
    assert metrics["gradcam"]["status"] == "skipped" and "Not computed: not requested" in gradcam_section
    baseline_section = dom.split('<section id="baseline">')[1].split("</section>")[0]
    assert "logistic_regression" in baseline_section
    assert f"{metrics['baseline']['macro']['auroc']:.3f}" in baseline_section


def test_chromium_screenshot_is_not_blank(written_report, tmp_path):
    assert_screenshot_not_blank(tmp_path, f"file://{written_report / 'report.html'}", 1280, 2400)
