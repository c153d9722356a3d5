"""``make scale`` (issue #19): the whole pipeline on a synthetic dump the size of NIH's, each stage run as
its own ``cxr-spark <stage>`` command as a user chains them, with the driver's heap at 2 GB.

Per stage: wall seconds, CPU seconds of its whole process tree, images per second, the peak resident
memory of the driver JVM and of the Python workers, and the bytes and files of each output; then counts
from the outputs that must reconcile. It ends by printing one JSON line (also saved as ``scale.json``).
How each figure is measured: docs/scale.md.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.process_tree import TreeSampler, become_subreaper, children_cpu, reap_descendants
from cxr_spark.io.session import CONF_DIR, read_properties

ROOT = Path(__file__).resolve().parents[1]
NIH_IMAGES = 112_120
REAL_METADATA = ROOT.parent / "shared" / "data" / "nih" / "Data_Entry_2017_v2020.csv.gz"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def args_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n-images", type=int, default=NIH_IMAGES,
                        help="synthetic images; at the metadata's row count, every row of it")
    parser.add_argument("--size", type=int, default=512, help="side of the synthetic PNGs in pixels")
    parser.add_argument("--dir", default="runs/scale", help="where the dump, every output and the logs go")
    parser.add_argument("--metadata", default=str(REAL_METADATA),
                        help="real Data_Entry CSV the dump takes its rows from")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dump")
    parser.add_argument("--ingest-size", type=int, default=224, help="ingest --images-out --size")
    parser.add_argument("--train-size", type=int, default=128,
                        help="preprocess --size: the images features, train, score and report use (no preprocess "
                             "stage when it equals --ingest-size)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (small_cnn)")
    parser.add_argument("--num-proc", type=int, default=2, help="Horovod processes")
    parser.add_argument("--batch-files", type=int, default=1000,
                        help="files in the batch-score dump (a copy of the dump's first ones; at most --n-images)")
    parser.add_argument("--driver-memory", default="2g", help="spark.driver.memory (local mode: the whole JVM heap)")
    parser.add_argument("--spark-conf", default=str(CONF_DIR / "spark" / "local.conf"),
                        help="Spark properties every other setting is copied from")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples of the process tree")
    parser.add_argument("--resume", action="store_true",
                        help="keep the figures of stages a killed run of the same commands already finished "
                             "(logs/<stage>.json) and run only the others")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = args_parser()
    args = parser.parse_args(argv)
    for flag in ("n_images", "size", "ingest_size", "train_size", "epochs", "num_proc", "batch_files"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    if args.interval <= 0:
        parser.error(f"--interval must be positive (got {args.interval})")
    if not re.fullmatch(r"\d+[kmgt]", args.driver_memory.lower()):
        parser.error(f"--driver-memory {args.driver_memory}: expected a size such as 2g or 1536m")
    for flag in ("metadata", "spark_conf"):
        if not Path(getattr(args, flag)).is_file():
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: no such file")
    with gzip.open(args.metadata, "rt") if args.metadata.endswith(".gz") else open(args.metadata) as handle:
        rows = sum(1 for _ in handle) - 1
    if args.n_images > rows:
        parser.error(f"--n-images {args.n_images}: --metadata {args.metadata} has only {rows} rows")
    if Path(args.dir).exists() and not Path(args.dir).is_dir():
        parser.error(f"--dir {args.dir}: not a folder")
    if Path(args.dir).is_dir() and any(Path(args.dir).iterdir()) and not is_scale_folder(Path(args.dir)):
        # every output below it is replaced (store/ and batch_dump/ removed): only a folder of this harness
        parser.error(f"--dir {args.dir}: not empty and not a folder make scale made; give a new or empty one")
    args.metadata_rows = rows
    return args


@dataclass
class Stage:
    name: str
    argv: list[str]
    outputs: dict[str, Path]
    images: str  # the key of the stage's printed counts that says how many images it processed


def folder_size(path: Path) -> dict:
    files = [Path(top) / name for top, _, names in os.walk(path) for name in names]
    return {"bytes": sum(f.lstat().st_size for f in files), "files": len(files)}


def run_stage(stage: Stage, command: list[str], logs: Path, interval: float, exact_cpu: bool) -> dict:
    """Run one ``cxr-spark`` command, measured; its counts (the JSON summary it prints last) included."""
    print(f"scale: {stage.name}: started", file=sys.stderr, flush=True)
    log_file, out_file = logs / f"{stage.name}.log", logs / f"{stage.name}.out"
    cpu_before = children_cpu()
    started = time.monotonic()
    with open(log_file, "w") as err, open(out_file, "w") as out:
        process = subprocess.Popen([*command, *stage.argv], stdout=out, stderr=err)
        sampler = TreeSampler(process.pid, interval)
        sampler.start()
        code = process.wait()
        seconds = time.monotonic() - started
        reaped, left_running = reap_descendants()
        sampler.done.set()
        sampler.join()
    # a worker orphaned before it exited was reaped here: RUSAGE_CHILDREN has it already
    cpu = children_cpu() - cpu_before + sum(v for (pid, _), v in sampler.unreaped.items() if pid not in reaped)
    if code != 0:
        tail = log_file.read_text(errors="replace").splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"scale: {stage.name} failed with exit code {code}; its log: {log_file}")
    prefix = f"{stage.name}: "
    summary = json.loads(next(line for line in reversed(out_file.read_text().splitlines())
                              if line.startswith(prefix))[len(prefix):])
    # train: images seen, train images x epochs run
    images = None if summary.get("reused") else summary[stage.images] * summary.get("epochs_run", 1)
    result = {
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu if exact_cpu else sum(sampler.cpu.values()), 1),
        "cpu_seconds_sampled": round(sum(sampler.cpu.values()), 1),
        "images": images,
        "images_per_s": images and round(images / seconds, 2),
        "peak_rss_mb": {kind: round(value) for kind, value in sampler.peak_mb.items()},
        # the 1-minute load average while the stage ran: what else ran beside it shows here
        "load_average": {"median": round(statistics.median(sampler.load), 2) if sampler.load else None,
                         "max": max(sampler.load, default=None)},
        "outputs": {name: folder_size(path) for name, path in stage.outputs.items()},
        **({"reused": True} if summary.get("reused") else {}),
        **({"heap": sorted(sampler.heap_flags)} if sampler.heap_flags else {}),
        **({"left_running": left_running} if left_running else {}),
        **({"sampler_error": sampler.error} if sampler.error else {}),
    }
    print(f"scale: {stage.name}: {result['seconds']} s, CPU {result['cpu_seconds']} s, "
          f"{images if images is not None else 'reused'} images", file=sys.stderr, flush=True)
    return {**result, "summary": summary}


# ---------------------------------------------------------------------------------------------
# the chain


SPARK_CONF_MARK = "(written by benchmarks/scale.py)"


def is_scale_folder(folder: Path) -> bool:
    """Whether ``folder`` is one this harness made: its ``spark.conf`` says so on its first line."""
    try:
        with open(folder / "spark.conf") as handle:
            return SPARK_CONF_MARK in handle.readline()
    except OSError:
        return False


def write_spark_conf(base: Path, out: Path, driver_memory: str) -> None:
    """``base``'s properties with the driver's memory set, and no console progress bar (logs are files)."""
    properties = {**read_properties(base), "spark.driver.memory": driver_memory,
                  "spark.ui.showConsoleProgress": "false"}
    out.write_text(f"# {base} with spark.driver.memory {driver_memory} and no console progress bar "
                   f"{SPARK_CONF_MARK}\n" + "".join(f"{k} {v}\n" for k, v in properties.items()))


def copy_batch_dump(dump: Path, out: Path, n_files: int) -> int:
    """A fresh folder with copies of the dump's first ``n_files`` PNGs (by path), as a nightly dump."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    chosen = sorted(dump.glob("images_*/images/*.png"))[:n_files]
    for path in chosen:
        shutil.copyfile(path, out / path.name)
    return len(chosen)


def stages(args: argparse.Namespace, run: Path, dump: Path, spark_conf: Path) -> list[Stage]:
    ingested, images = run / f"images_{args.ingest_size}", run / f"images_{args.train_size}"
    out = {name: run / name for name in ("raw", "features", "baseline", "model", "predictions", "report", "store")}
    conf = ["--spark-conf", str(spark_conf)]
    return [
        Stage("synth", ["synth", "--out", str(dump), "--n-images", str(args.n_images), "--size", str(args.size),
                        "--metadata", str(Path(args.metadata).resolve()), "--seed", str(args.seed)],
              {"dump": dump}, "images"),
        Stage("ingest", ["ingest", "--images", str(dump), "--metadata", str(dump / "Data_Entry_2017.csv"),
                         "--split-lists", str(dump), "--bbox", str(dump / "BBox_List_2017.csv"),
                         "--out", str(out["raw"]), "--images-out", str(ingested), "--size", str(args.ingest_size),
                         *conf], {"raw": out["raw"], ingested.name: ingested}, "files_listed"),
        *([Stage("preprocess", ["preprocess", "--in", str(out["raw"]), "--out", str(images), "--size",
                                str(args.train_size), *conf], {images.name: images}, "images")]
          if images != ingested else []),
        Stage("features", ["features", "--in", str(images), "--out", str(out["features"]),
                           "--baseline-out", str(out["baseline"]), *conf],
              {"features": out["features"], "baseline": out["baseline"]}, "images"),
        Stage("train", ["train", "--in", str(images), "--out", str(out["model"]), "--arch", "small_cnn",
                        "--num-proc", str(args.num_proc), "--epochs", str(args.epochs), *conf],
              {"model": out["model"], "model.checkpoints": run / "model.checkpoints"}, "train_images"),
        Stage("score", ["score", "--in", str(images), "--model", str(out["model"]), "--out", str(out["predictions"]),
                        "--split", "test", *conf], {"predictions": out["predictions"]}, "scored"),
        Stage("report", ["report", "--predictions", str(out["predictions"]), "--out", str(out["report"]),
                         "--baseline", str(out["baseline"]), "--images-dataset", str(images),
                         "--model", str(out["model"]), *conf], {"report": out["report"]}, "n_images"),
        Stage("batch-score", ["batch-score", "--images", str(run / "batch_dump"), "--model", str(out["model"]),
                              "--out", str(out["store"]), *conf], {"store": out["store"]}, "files_listed"),
    ]


def parquet_rows(dataset: Path, partition: str | None = None) -> int:
    """Rows of a dataset's Parquet files from their footers, leaving out ``_``-folders (quarantine, boxes,
    runs); with ``partition`` (``split=test``) only that partition's."""
    total = 0
    for path in dataset.rglob("*.parquet"):
        parts = path.relative_to(dataset).parts[:-1]
        if not any(part.startswith(("_", ".")) for part in parts) and (partition is None or partition in parts):
            total += pq.read_metadata(path).num_rows
    return total


def reconcile(run: Path, dump: Path, image_sets: list[Path], results: dict, metadata_rows: int, n_images: int,
              batch_files: int) -> dict:
    """Counts from the manifests and the Parquet footers of the outputs, and whether they add up. The last
    of ``image_sets`` is the one scored."""
    ingest = json.loads((run / "raw" / "_manifest.json").read_text())["counts"]
    images = image_sets[-1]
    batch = results["batch-score"]["summary"]
    batch_run = json.loads((run / "store" / "_runs" / f"{batch['run_id']}.json").read_text())
    batch_run = batch_run.get("counts", batch_run)
    counts = {
        "metadata_file_rows": metadata_rows,
        "dump_images": sum(1 for _ in dump.glob("images_*/images/*.png")),
        "files_listed": ingest["files_listed"], "ingested": ingest["ingested"], "quarantined": ingest["quarantined"],
        "metadata_rows": ingest["metadata_rows"], "metadata_matched": ingest["metadata_matched"],
        "raw_rows": parquet_rows(run / "raw"),
        **{f"{folder.name}_rows": parquet_rows(folder) for folder in image_sets},
        **{f"{folder.name}_quarantined": json.loads((folder / "_manifest.json").read_text())["counts"].get(
            "quarantined", 0) for folder in image_sets},
        "test_images": parquet_rows(images, "split=test"), "predictions": parquet_rows(run / "predictions"),
        "batch_files": batch_files, "batch_files_listed": batch_run["files_listed"],
        "batch_scored": batch_run["scored"], "batch_quarantined": batch_run["quarantined"],
        "store_rows": parquet_rows(run / "store"),
    }
    checks = {
        "dump_images = n_images": counts["dump_images"] == n_images,
        "files_listed = ingested + quarantined": counts["files_listed"] == counts["ingested"] + counts["quarantined"],
        "raw_rows = ingested": counts["raw_rows"] == counts["ingested"],
        **{f"raw_rows = {folder.name}_rows + {folder.name}_quarantined": counts["raw_rows"]
           == counts[f"{folder.name}_rows"] + counts[f"{folder.name}_quarantined"] for folder in image_sets},
        "predictions = test_images": counts["predictions"] == counts["test_images"],
        "batch_files = batch_files_listed = batch_scored + batch_quarantined": counts["batch_files"]
            == counts["batch_files_listed"] == counts["batch_scored"] + counts["batch_quarantined"],
        "store_rows = batch_scored": counts["store_rows"] == counts["batch_scored"],
    }
    return {**counts, "checks": checks, "reconciled": all(checks.values())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Path(args.dir).resolve()
    logs = run / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    dump = run / f"dump_{args.n_images}x{args.size}_seed{args.seed}"  # one per spec: a rerun reuses it
    spark_conf = run / "spark.conf"
    write_spark_conf(Path(args.spark_conf), spark_conf, args.driver_memory)
    script = Path(sys.executable).with_name("cxr-spark")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "cxr_spark.cli"]
    exact_cpu = become_subreaper()
    chain = stages(args, run, dump, spark_conf)
    (logs / "commands.sh").write_text("".join(" ".join([*command, *stage.argv]) + "\n" for stage in chain))
    results, resuming = {}, args.resume
    batch_files = min(args.batch_files, args.n_images)
    for stage in chain:
        saved = logs / f"{stage.name}.json"
        kept = json.loads(saved.read_text()) if resuming and saved.exists() else None
        if kept and kept["argv"] == stage.argv:
            results[stage.name] = {**kept["result"], "resumed": True}
            print(f"scale: {stage.name}: kept from {kept['finished_at']}", file=sys.stderr, flush=True)
            continue
        resuming = False  # every later stage reads what this one writes: they run again too
        saved.unlink(missing_ok=True)
        if stage.name == "batch-score":
            batch_files = copy_batch_dump(dump, run / "batch_dump", batch_files)
            shutil.rmtree(run / "store", ignore_errors=True)  # a fresh store: every file is new to it
        results[stage.name] = run_stage(stage, command, logs, args.interval, exact_cpu)
        saved.write_text(json.dumps({"argv": stage.argv, "result": results[stage.name],
                                     "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    image_sets = [run / f"images_{size}" for size in dict.fromkeys([args.ingest_size, args.train_size])]
    counts = reconcile(run, dump, image_sets, results, args.metadata_rows, args.n_images, batch_files)
    line = json.dumps({
        "n_images": args.n_images, "size": args.size, "train_size": args.train_size,
        "driver_memory": args.driver_memory, "cpu_method": "rusage+unreaped" if exact_cpu else "sampled",
        "stages": {name: {k: v for k, v in result.items() if k != "summary"}
                   for name, result in results.items()},
        "counts": counts,
    })
    (run / "scale.json").write_text(line + "\n")
    print(line)
    return 0 if counts["reconciled"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
