"""``<store>/_monitor.html`` as a person sees it: rendered by headless Chromium after a refused run and two
scored runs (one drifted), its DOM holds one table row per run in time order, with the numbers of each run's
``_runs/<run_id>.json``, the plots embedded, its text escaped, and its screenshot is not blank."""
from __future__ import annotations

import base64
import json
import re

import pytest
from browser import assert_screenshot_not_blank, chromium, needs_chromium
from test_drift import _inverted, _write_films, referenced_model  # noqa: F401 - the module's model fixture

from cxr_spark.core.guards import UsageError
from cxr_spark.stages.batch_score.job import RUNS_DIR, batch_score, check_args

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def monitored_store(spark, referenced_model, tmp_path_factory):  # noqa: F811 - pytest's fixture by name
    from cxr_spark.cli import args_parser

    model_dir, _ = referenced_model
    folder = tmp_path_factory.mktemp("monitor")
    store = folder / "store"
    # refused: its inbox is missing (a name with markup, which the page must show as text)
    args = args_parser().parse_args(["batch-score", "--images", str(folder / "no<b>such</b>inbox"),
                                     "--model", str(model_dir), "--out", str(store)])
    with pytest.raises(UsageError):
        check_args(args)
    files = _write_films(folder / "dump", 40, seed=22)  # as in test_drift: not input-drifted
    runs = [batch_score(spark, str(folder / "dump"), str(model_dir), str(store))]
    _inverted(files, folder / "inverted")
    runs.append(batch_score(spark, str(folder / "inverted"), str(model_dir), str(store)))
    return store, runs


def _cells(row: str) -> list[str]:
    return re.findall(r"<td>(.*?)</td>", row)


def test_chromium_renders_one_row_per_run_in_time_order_and_the_plots(monitored_store, tmp_path):
    store, (same, inverted) = monitored_store
    records = [json.loads(path.read_text()) for path in (store / RUNS_DIR).glob("*.json")]
    assert len(records) == 3
    refused = next(record for record in records if record["counts"]["status"] == "refused")
    dom = chromium(tmp_path, "--dump-dom", f"file://{store / '_monitor.html'}").stdout
    table = dom.split('<table id="runs">')[1].split("</table>")[0]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", table.split("<tbody>")[1])
    assert [_cells(row)[0] for row in rows] == [refused["run_id"], same["run_id"], inverted["run_id"]]
    assert [_cells(row)[3] for row in rows] == ["refused", "scored", "scored"]
    assert [_cells(row)[6] for row in rows] == ["0", str(same["scored"]), str(inverted["scored"])]
    by_id = {record["run_id"]: record for record in records}
    for row, run in zip(rows[1:], (same, inverted)):
        assert _cells(row)[8] == f"{by_id[run['run_id']]['drift']['input_psi']:.3f}"
    assert "input" in _cells(rows[2])[9] and "input" not in _cells(rows[1])[9]
    assert re.search(r'<tr class="refused">', table) and re.search(r'<tr class="drifted">', table)
    # the refused run's error without its paths (folder names may carry patient names), the store's neither
    assert "[path]" in _cells(rows[0])[10] and "inbox" not in dom and "<b>such" not in dom
    assert str(store) not in dom
    for table_id, extra in (("flagged", 0), ("psi", 1)):  # one column per finding (and the input's PSI)
        section = dom.split(f'<table id="{table_id}">')[1].split("</table>")[0]
        body = re.findall(r"<tr[^>]*>(.*?)</tr>", section.split("<tbody>")[1])
        assert len(body) == 3 and all(len(_cells(row)) == 1 + 14 + extra for row in body)
    flagged_row = re.findall(r"<tr[^>]*>(.*?)</tr>", dom.split('<table id="flagged">')[1].split("<tbody>")[1])[1]
    first = next(iter(same["flagged"]))
    assert _cells(flagged_row)[1] == f"{same['flagged'][first] / same['scored']:.3f}"
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', dom)
    assert len(images) == 3 and all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    assert not re.search(r'<(script|link)\b|src="https?:|url\(', dom)  # self-contained


def test_chromium_screenshot_of_the_monitor_is_not_blank(monitored_store, tmp_path):
    store, _ = monitored_store
    assert_screenshot_not_blank(tmp_path, f"file://{store / '_monitor.html'}", 1280, 1600)
