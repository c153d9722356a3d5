"""The demo: every stage on a synthetic NIH-style dump, in one Spark session, then the test AUROC table."""
from __future__ import annotations

import argparse
import json
import logging
import time
from functools import partial
from pathlib import Path

from cxr_spark.config import load_config, override
from cxr_spark.io.session import build_session
from cxr_spark.stages.features import features
from cxr_spark.stages.ingest.job import ingest
from cxr_spark.stages.report.gradcam import GradcamRequest
from cxr_spark.stages.report.job import report
from cxr_spark.stages.score import score
from cxr_spark.stages.train.job import train
from cxr_spark.synth import BBOX_FILE, SynthSpec, generate_or_reuse

log = logging.getLogger(__name__)


#: The demo's stages in order, and what each does (its ``[k/N]`` console lines).
STAGES = {
    "synth": "drawing a synthetic NIH-style dump",
    "ingest+preprocess": "reading the dump into the raw dataset and resized images, in one pass",
    "features": "hand-crafted features and the MLlib baseline",
    "train": "training the CNN with Horovod",
    "score": "scoring the test split",
    "report": "metrics, Grad-CAM and report.html",
}
#: Counts worth a result line (the full counts are in the log file and each dataset's _manifest.json).
RESULT_KEYS = ("images", "reused", "quarantined", "splits", "n_features", "baseline_test_macro_auroc", "epochs_run",
               "best_epoch", "best_val_loss", "best_val_auroc", "model_version", "scored")


def result_text(result: dict) -> str:
    """A stage's result in one short line: the counts a user looks at, numbers rounded."""
    if "per_label" in result:
        return f"test macro AUROC {result['macro']['auroc']:.3f}"
    shown = {key: round(value, 3) if isinstance(value, float) else value
             for key, value in result.items() if key in RESULT_KEYS}
    log.debug("result: %s", json.dumps(result, default=str))
    return json.dumps(shown or result, default=str)


def format_auroc_table(metrics: dict) -> str:
    """Per-label and macro AUROC with their 95% bootstrap intervals as an aligned text table."""
    width = max(len(name) for name in metrics["labels"]) + 2

    def cells(row: dict) -> str:
        auroc = "   n/a" if row.get("auroc") is None else f"{row['auroc']:6.3f}"
        interval = row.get("auroc_ci")
        return auroc + (f"  [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")

    lines = [f"{'finding':<{width}}{'support':>8}  {'AUROC':>6}  95% interval"]
    for name, row in metrics["per_label"].items():
        lines.append(f"{name:<{width}}{row['support']:>8}  {cells(row)}")
    lines.append(f"{'macro':<{width}}{'':>8}  {cells(metrics['macro'])}")
    return "\n".join(lines)


def format_gradcam_line(metrics: dict, report_dir: Path) -> str:
    """Where the Grad-CAM overlays are and each boxed finding's fraction of heatmap peaks inside its box."""
    gradcam = metrics.get("gradcam") or {}
    if gradcam.get("status") != "computed":
        return f"Grad-CAM: not computed ({gradcam.get('reason')})"
    fractions = ", ".join(f"{name} {row['peaks_in_box']}/{row['boxed_images']}"
                          for name, row in gradcam["per_label"].items() if row["boxed_images"])
    n = sum(len(row["top"]) for row in gradcam["per_label"].values())
    return (f"Grad-CAM: {n} overlays in {report_dir / 'gradcam'}; heatmap peaks inside the box: "
            f"{fractions or 'no scored image has a box'}")


def run_demo(args: argparse.Namespace) -> dict:
    started = time.time()
    config = load_config(args.config)
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    timings = {}

    def timed(stage, fn, *fn_args):
        t0 = time.time()
        log.info("[%d/%d] %s: %s ...", len(timings) + 1, len(STAGES), stage, STAGES[stage])
        result = fn(*fn_args)
        timings[stage] = round(time.time() - t0, 1)
        log.info("[%d/%d] %s done in %.0f s: %s", len(timings), len(STAGES), stage, timings[stage],
                 result_text(result))
        return result

    timed("synth", generate_or_reuse, SynthSpec(out=str(run / "dump"), n_images=args.n_images,
                                                size=args.image_size, seed=args.seed))
    spark = build_session("cxr-spark demo", args.spark_conf)
    try:
        dump, raw, images = str(run / "dump"), str(run / "raw"), str(run / f"images_{args.size}")
        # ingest and preprocess in one pass over the files (cxr-spark ingest --images-out)
        timed("ingest+preprocess", partial(ingest, bbox=f"{dump}/{BBOX_FILE}", images_out=images,
                                           images_settings=override(config.preprocess, size=args.size)),
              spark, dump, raw, f"{dump}/Data_Entry_2017.csv", dump, config.ingest)
        # the classical big-data baseline the report sets beside the CNN
        baseline = timed("features", features, spark, images, str(run / "features"), config.features,
                         str(run / "baseline"))
        trained = timed("train", partial(train, tracking=config.tracking, tracking_uri=args.tracking_uri), spark,
                        images, str(run / "model"), override(config.train, epochs=args.epochs, num_proc=args.num_proc))
        timed("score", score, spark, images, str(run / "model"), str(run / "predictions"), "test",
              config.score.batch_size)
        # Grad-CAM of the scored images and model; the boxes come from raw/_bbox, found through images' manifest
        metrics = timed("report", partial(report, gradcam=GradcamRequest(images=images, model=str(run / "model"))),
                        spark, str(run / "predictions"), str(run / "report"), str(run / "baseline"))
    finally:
        spark.stop()
    total = round(time.time() - started, 1)
    print()
    print(f"Test split: {metrics['n_images']} images, model {metrics['model']['version']}")
    print(format_auroc_table(metrics))
    print(f"MLlib baseline on {baseline['n_features']} hand-crafted features: test macro AUROC "
          f"{baseline['baseline_test_macro_auroc']:.3f}")
    print(format_gradcam_line(metrics, run / "report"))
    print(f"\nStage times (s): {json.dumps(timings)}; total {total} s")
    print(f"Training curves: {run / 'model' / 'training_curves.png'}; tables: {run / 'report' / 'report.md'}")
    if trained.get("mlflow_run"):
        print(f"MLflow: run {trained['mlflow_run']}, registered {trained['registered']}; "
              f"browse with: .venv/bin/mlflow ui --backend-store-uri {trained['tracking_uri']}")
    print(f"Report: {(run / 'report' / 'report.html').resolve()}")
    return {"macro_auroc": metrics["macro"]["auroc"], "test_images": metrics["n_images"], "seconds": total,
            "run_dir": str(run), "report": str((run / "report" / "report.html").resolve())}
