"""The tables of docs/scale.md from the ``scale.json`` of runs of ``make scale`` at several sizes.

    PYTHONPATH=. .venv/bin/python -m benchmarks.scale_table /work/scale1000 /work/scale10000 /work/scale

Per stage and size: wall and CPU seconds, images per second, CPU milliseconds per image, peak resident
memory of the JVM and of the Python workers, and the median load average; then, for the largest size
against the one below it, the ratio of wall seconds per image (the linear-cost goal: at most 1.2) and of
the JVM's peak memory (the bounded-memory goal: at most 1.5), and each stage's fixed cost: the intercept of
the straight line through its (images, seconds) at the smallest and the largest size.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(folders: list[str]) -> list[dict]:
    runs = [json.loads((Path(folder) / "scale.json").read_text()) for folder in folders]
    return sorted(runs, key=lambda run: run["n_images"])


def _per_image(stage: dict) -> float | None:
    return stage["seconds"] / stage["images"] if stage.get("images") else None


def stage_table(runs: list[dict]) -> str:
    lines = ["| stage | images | seconds | CPU s | images/s | CPU ms/image | peak MB: JVM, workers | load |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in runs[-1]["stages"]:
        for run in runs:
            stage = run["stages"].get(name)
            if stage is None:
                continue
            images = stage.get("images")
            cpu_ms = f"{1000 * stage['cpu_seconds'] / images:.1f}" if images else "–"
            rss = stage["peak_rss_mb"]
            lines.append(f"| {name} ({run['n_images']:,}) | {images if images is not None else 'reused'} | "
                         f"{stage['seconds']:.1f} | {stage['cpu_seconds']:.1f} | "
                         f"{stage.get('images_per_s') or '–'} | "
                         f"{cpu_ms} | {rss['driver']:,}, {rss['workers']:,} | "
                         f"{(stage.get('load_average') or {}).get('median', '–')} |")
    return "\n".join(lines)


def _fixed_seconds(first: dict | None, last: dict) -> str:
    """The intercept of the line through (images, seconds) of ``first`` and ``last``."""
    if not first or not first.get("images") or not last.get("images") or first["images"] == last["images"]:
        return "–"
    slope = (last["seconds"] - first["seconds"]) / (last["images"] - first["images"])
    return f"{first['seconds'] - slope * first['images']:.1f}"


def goal_table(runs: list[dict]) -> str:
    small, large, smallest = runs[-2], runs[-1], runs[0]
    lines = [f"| stage | wall ms/image at {small['n_images']:,} | at {large['n_images']:,} | ratio (goal <= 1.2) | "
             f"JVM peak MB at {small['n_images']:,} | at {large['n_images']:,} | ratio (goal <= 1.5) | fixed s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, stage in large["stages"].items():
        before = small["stages"].get(name)
        if before is None or not _per_image(stage) or not _per_image(before):
            continue
        ratio = _per_image(stage) / _per_image(before)
        jvm, jvm_before = stage["peak_rss_mb"]["driver"], before["peak_rss_mb"]["driver"]
        memory = f"{jvm / jvm_before:.2f}" if jvm_before else "–"
        lines.append(f"| {name} | {_per_image(before) * 1000:.2f} | {_per_image(stage) * 1000:.2f} | {ratio:.2f} | "
                     f"{jvm_before:,} | {jvm:,} | {memory} | "
                     f"{_fixed_seconds(smallest['stages'].get(name), stage)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="SCALE_DIRs of finished runs (each holds scale.json)")
    args = parser.parse_args(argv)
    missing = [folder for folder in args.folders if not (Path(folder) / "scale.json").is_file()]
    if missing:
        parser.exit(2, f"{parser.prog}: error: no scale.json in {', '.join(missing)}\n")
    runs = load(args.folders)
    print(stage_table(runs))
    if len(runs) > 1:
        print()
        print(goal_table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
