"""What a demo run produced, without its times and paths: compare two runs (e.g. before and after a
refactoring) with ``diff``.

    .venv/bin/python scripts/demo_fingerprint.py runs/demo > before.json

For each dataset: its rows, and a SHA-256 over its rows sorted by ``image_id`` of the columns that
hold what a run computed (image bytes, labels, splits, feature vectors, probabilities). From the report:
metrics.json less the keys that name a time, a duration, a path or a model version (a hash that differs
when the training's floating point does). Reads Parquet with pyarrow only: no Spark.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq

#: Dataset folders of a demo run and the columns fingerprinted in each (those present are used).
DATASETS = {
    "raw": ["image_id", "patient_id", "split", "labels", "content_sha256", "png"],
    "raw/_quarantine": ["source_path", "reason", "detail"],
    "raw/_bbox": ["image_id", "finding", "x", "y", "w", "h"],
    "images_128": ["image_id", "split", "labels", "image"],
    "features": ["image_id", "split", "labels", "features"],
    "baseline": ["image_id", "labels", "probabilities"],
    "predictions": ["image_id", "labels", "probabilities"],
}
#: Keys of metrics.json that change from run to run whatever the code computes.
VOLATILE = ("_at", "seconds", "duration", "path", "url", "version", "dir", "started", "finished", "elapsed")


def _rows(folder: Path, wanted: list[str]) -> list[dict] | None:
    files = sorted(p for p in folder.rglob("*.parquet")
                   if not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts))
    if not files:
        return None
    tables = [pq.read_table(p) for p in files]
    columns = [c for c in wanted if c in tables[0].column_names]
    rows = [row for table in tables for row in table.select(columns).to_pylist()]
    return sorted(rows, key=lambda row: json.dumps(row, sort_keys=True, default=repr))


def _digest(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, default=lambda v: v.hex() if isinstance(v, bytes) else repr(v))
                      .encode())
    return digest.hexdigest()


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in sorted(value.items()) if not any(word in k.lower() for word in VOLATILE)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


def fingerprint(run: Path) -> dict:
    out = {"datasets": {}}
    for name, columns in DATASETS.items():
        rows = _rows(run / name, columns) if (run / name).is_dir() else None
        if rows is not None:
            out["datasets"][name] = {"rows": len(rows), "sha256": _digest(rows)}
    metrics = run / "report" / "metrics.json"
    if metrics.exists():
        report = json.loads(metrics.read_text())
        out["test_auroc"] = {name: row["auroc"] for name, row in report["per_label"].items()}
        out["test_macro_auroc"] = report["macro"]["auroc"]
        out["metrics"] = _stable(report)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a demo's --run-dir (e.g. runs/demo)")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(f"demo_fingerprint: {args.run_dir}: no such folder", file=sys.stderr)
        return 2
    json.dump(fingerprint(args.run_dir), sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
