"""``<store>/_monitor.html``: the store's runs over time, rewritten by each committed run from every
``_runs/*.json`` (refused runs included, shown as such), ordered by when they finished.

Plots (images scored and quarantined, the flagged rate per finding, PSI per finding and of the input against
the drift threshold) and the same numbers as tables, in one self-contained page like ``report.html``: figures
embedded as base64 PNG, no external CSS, scripts or fonts, every piece of text through :func:`html.escape`.
matplotlib (Agg) is imported only when the figures are drawn, or ahead of that by :func:`start_importing_plots`.
"""
from __future__ import annotations

import html
import importlib
import logging
import os
import re
import threading

from pyspark.sql import SparkSession

from cxr_spark.core.drift import DRIFT_THRESHOLD, INPUT, PSI_FLOOR
from cxr_spark.core.html_page import figure, page_head
from cxr_spark.io.storage import FileSystem, local_path, read_json, write_text
from cxr_spark.stages.batch_score.store import RUNS_DIR

log = logging.getLogger("cxr_spark.stages.batch_score.job")  # the stage's messages, wherever they are made

MONITOR_FILE = "_monitor.html"
NOT_AVAILABLE = "n/a"
FIGURES = (("counts", "Images scored and quarantined per run"),
           ("flagged", "Flagged rate per finding (flagged images / images scored)"),
           ("psi", f"PSI against the model's validation split, per finding and of the input "
                   f"(dashed: the drift threshold {DRIFT_THRESHOLD})"))


def read_runs(spark: SparkSession, store: str) -> list[dict]:
    """Every run summary in ``<store>/_runs/``, oldest first (by ``finished_at``, then run id); a file that is
    not a JSON object is logged and left out."""
    folder = f"{store}/{RUNS_DIR}"
    runs = []
    for name in sorted(name for name in FileSystem(spark, folder).names(folder) or [] if name.endswith(".json")):
        try:
            run = read_json(spark, f"{folder}/{name}")
        except (OSError, ValueError) as error:
            log.warning("monitor: skipping %s/%s: %s", folder, name, error)
            continue
        if isinstance(run, dict):
            runs.append({**run, "run_id": run.get("run_id") or name[:-len(".json")]})
    return sorted(runs, key=lambda run: (str(run.get("finished_at") or ""), str(run["run_id"])))


def monitor_rows(runs: list[dict]) -> tuple[list[dict], list[str]]:
    """One plain row per run (what the tables and plots show), and the findings seen, in the models' order."""
    findings: list[str] = []
    rows = []
    for run in runs:
        counts = run.get("counts") or {}
        drift = run.get("drift") if isinstance(run.get("drift"), dict) else {}
        flagged = counts.get("flagged") or {}
        findings += [name for name in flagged if name not in findings]
        scored = counts.get("scored") or 0
        status = counts.get("status") or ("refused" if run.get("error") else "unknown")
        if drift.get("status", "ok") != "ok":
            drift_text = f"not measured: {drift.get('status')}"
        elif drift:
            drift_text = ", ".join(drift.get("drifted") or []) or "none"
        else:
            drift_text = "not measured: refused" if status == "refused" else NOT_AVAILABLE
        rows.append({"run_id": run["run_id"], "finished_at": run.get("finished_at"), "status": status,
                     "exit_code": counts.get("exit_code"), "model_version": run.get("model_version"),
                     "files_listed": counts.get("files_listed"), "scored": counts.get("scored"),
                     "quarantined": counts.get("quarantined"),
                     "flagged_rate": {name: (count / scored if scored else None) for name, count in flagged.items()},
                     "psi": drift.get("psi") or {}, "input_psi": drift.get("input_psi"), "drift": drift_text,
                     "drifted": list(drift.get("drifted") or []),
                     "error": without_paths(run.get("error") or counts.get("error"))})
    return rows, findings


PATH_LIKE = re.compile(r"\S*/\S*")


def without_paths(text: str | None) -> str | None:
    """An error as the page shows it: every path-like word (one holding a ``/``) replaced by ``[path]``, since
    folder and file names may carry patient names; ``_runs/<run_id>.json`` keeps the whole text.

    >>> without_paths("--images /data/in/Doe_J: no such folder")
    '--images [path] no such folder'
    """
    return None if text is None else PATH_LIKE.sub("[path]", text)


def start_importing_plots() -> None:
    """Import matplotlib (about 0.7 s on the driver) in a background thread while a run's Spark jobs keep the
    driver waiting, so that :func:`write_monitor` finds it imported."""
    threading.Thread(target=importlib.import_module, args=("cxr_spark.core.plots",), name="import matplotlib",
                     daemon=True).start()


def monitor_figures(rows: list[dict], findings: list[str]) -> dict[str, bytes]:
    """The page's plots as PNG bytes: runs on the x axis, in order, labelled by their finishing time."""
    import matplotlib.pyplot as plt

    from cxr_spark.core.plots import png_bytes  # matplotlib, Agg backend, on first use only

    positions = list(range(1, len(rows) + 1))
    ticks = [str(row["finished_at"] or row["run_id"])[:19].replace("T", " ") for row in rows]

    def axes(title: str, ylabel: str):
        figure, axis = plt.subplots(figsize=(10, 3.6), dpi=80)
        axis.set_title(title, fontsize=10)
        axis.set_ylabel(ylabel)
        axis.set_xticks(positions, ticks if len(rows) <= 24 else [str(p) for p in positions],
                        rotation=30 if len(rows) <= 24 else 0, ha="right" if len(rows) <= 24 else "center",
                        fontsize=7)
        axis.set_xlim(0.5, len(rows) + 0.5)
        axis.grid(alpha=0.3)
        return figure, axis

    def series(values):  # matplotlib draws nothing for None; NaN leaves a gap
        return [float("nan") if value is None else value for value in values]

    figures = {}
    figure, axis = axes("images per run", "images")
    width = 0.4
    axis.bar([p - width / 2 for p in positions], [row["scored"] or 0 for row in rows], width, label="scored")
    axis.bar([p + width / 2 for p in positions], [row["quarantined"] or 0 for row in rows], width,
             label="quarantined", color="#c60")
    for position, row in zip(positions, rows):
        if row["status"] == "refused":
            axis.annotate("refused", (position, 0), ha="center", va="bottom", fontsize=7, color="#b00")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figures["counts"] = png_bytes(figure)

    figure, axis = axes("flagged rate per finding", "flagged / scored")
    for name in findings:
        axis.plot(positions, series(row["flagged_rate"].get(name) for row in rows), "-o", markersize=3,
                  label=name)
    axis.set_ylim(0, 1.02)
    _legend(axis, findings)
    figure.tight_layout()
    figures["flagged"] = png_bytes(figure)

    figure, axis = axes("population stability index", "PSI")
    for name in findings:
        axis.plot(positions, series(row["psi"].get(name) for row in rows), "-o", markersize=3, label=name)
    axis.plot(positions, series(row["input_psi"] for row in rows), "-s", color="black", linewidth=2,
              markersize=5, label=INPUT)
    axis.axhline(DRIFT_THRESHOLD, linestyle="--", color="#b00", linewidth=1)
    axis.set_ylim(bottom=0)
    _legend(axis, [*findings, INPUT])
    figure.tight_layout()
    figures["psi"] = png_bytes(figure)
    return figures


def _legend(axis, names: list[str]) -> None:
    if names:
        axis.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))


STYLE = """
table { font-size: 0.8em; }
div.scroll { overflow-x: auto; }
tr.refused td { color: #800; background: #fde8e8; }
tr.drifted td { background: #fff3d6; }
"""


def _cell(value) -> str:
    if value is None:
        return NOT_AVAILABLE
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _table(table_id: str, caption: str, header: list[str], rows: list[list], classes: list[str]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "".join(f"<tr class=\"{html.escape(css, quote=True)}\">"
                   + "".join(f"<td>{html.escape(_cell(cell))}</td>" for cell in row) + "</tr>"
                   for row, css in zip(rows, classes))
    return (f"<div class=\"scroll\"><table id=\"{table_id}\"><caption>{html.escape(caption)}</caption>"
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _explanation(n_runs: int) -> str:
    return (f"{n_runs} runs, oldest first. Drift: the population stability index (PSI) of what each run scored "
            f"against the model's validation split, per finding (its probabilities) and of the input (the per-image "
            f"mean intensity), in 10 equal-width bins with shares floored at {PSI_FLOOR}; a PSI over "
            f"{DRIFT_THRESHOLD} is drifted.")


def render_monitor(rows: list[dict], findings: list[str], figures: dict[str, bytes], store: str) -> str:
    """The page, from :func:`monitor_rows` and :func:`monitor_figures`."""
    title = "batch-score monitor"  # no path: folder names of a hospital's dumps and stores may carry names
    classes = ["refused" if row["status"] == "refused" else "drifted" if row["drifted"] else "" for row in rows]
    parts = [page_head(title, STYLE),
             f"<p>{html.escape(_explanation(len(rows)))}</p>"]
    parts.append("<section id=\"plots\"><h2>Over time</h2>")
    for key, caption in FIGURES:
        if key in figures:
            parts.append(figure(key, figures[key], caption))
    parts.append("</section><section id=\"tables\"><h2>Runs</h2>")
    parts.append(_table("runs", "Every run", ["run", "finished (UTC)", "model version", "status", "exit code",
                                              "files listed", "scored", "quarantined", "input PSI", "drifted",
                                              "error"],
                        [[row["run_id"], row["finished_at"], row["model_version"], row["status"], row["exit_code"],
                          row["files_listed"], row["scored"], row["quarantined"], row["input_psi"], row["drift"],
                          row["error"] or ""] for row in rows], classes))
    parts.append(_table("flagged", "Flagged rate per finding", ["run", *findings],
                        [[row["run_id"], *(row["flagged_rate"].get(name) for name in findings)] for row in rows],
                        classes))
    parts.append(_table("psi", "PSI per finding and of the input", ["run", *findings, INPUT],
                        [[row["run_id"], *(row["psi"].get(name) for name in findings), row["input_psi"]]
                         for row in rows], classes))
    parts.append("</section></body></html>\n")
    return "\n".join(parts)


def write_monitor(spark: SparkSession, store: str) -> str:
    """Rewrite ``<store>/_monitor.html`` from the store's run summaries; return its URL. A local page is
    replaced whole (written beside, then renamed), so a browser never loads half of it."""
    rows, findings = monitor_rows(read_runs(spark, store))
    page = render_monitor(rows, findings, monitor_figures(rows, findings) if rows else {}, store)
    url = f"{store}/{MONITOR_FILE}"
    path = local_path(url)
    if path is None:
        write_text(spark, url, page)
    else:
        partial = os.path.join(os.path.dirname(path), f".{MONITOR_FILE}.tmp")
        with open(partial, "w") as handle:
            handle.write(page)
        os.replace(partial, path)
    log.info("monitor: %s shows %d runs", url, len(rows))
    return url

