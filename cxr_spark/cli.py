"""The ``cxr-spark`` command: one subcommand per stage, and ``demo`` to run them all.

``spark_jobs/<stage>.py`` call :func:`submit_main` with the same arguments under ``spark-submit``.

Exit codes: 0 on success; 2 for a run refused before it could do harm (:class:`~cxr_spark.core.guards.UsageError`:
an output over an input, an output that is not a dataset of its kind, a metadata file of another layout,
a run with nothing to write), printed as one line. A stage module may define ``exit_code(counts) -> int``
to report a distinct code for a finished run (``batch-score``: 3 when nothing was new), and an exception with an
integer ``exit_code`` attribute ends the command with that code and its message instead of a
traceback (``batch-score``: 4 when the store is locked). Any other failure exits with 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from types import ModuleType

from cxr_spark import __version__
from cxr_spark.config import load_config
from cxr_spark.core.guards import UsageError
from cxr_spark.io.session import build_session
from cxr_spark.stages import features, preprocess, score
from cxr_spark.stages.batch_score import job as batch_score
from cxr_spark.stages.ingest import job as ingest
from cxr_spark.stages.report import job as report
from cxr_spark.stages.train import job as train

log = logging.getLogger("cxr_spark")

SPARK_STAGES: dict[str, tuple[ModuleType, str]] = {
    "ingest": (ingest, "read an image dump and its metadata into the raw Petastorm dataset, with a quarantine"),
    "preprocess": (preprocess, "decode and resize raw images into images_<size>, with train mean/std"),
    "features": (features, "compute per-image feature vectors (histogram, moments, edges, texture, lung regions) "
                           "and optionally an MLlib logistic-regression baseline scored like the CNN"),
    "train": (train, "train a CNN with Horovod-on-Spark, one Petastorm shard per process"),
    "score": (score, "score a split of an images dataset with a trained model into predictions"),
    "report": (report, "confusion matrices, AUROC and average precision by Spark: metrics.json, report.md and report.html"),
    "batch-score": (batch_score, "score the new files of an unlabelled image dump (PNG, JPEG, DICOM) into a "
                                 "predictions store, skipping images this model version already scored"),
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="pipeline defaults (default: conf/pipeline.toml)")
    parser.add_argument("--spark-conf", help="Spark properties file when not under spark-submit "
                                             "(default: conf/spark/local.conf)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_synth(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder for the synthetic dump (NIH layout); a complete dump "
                                                      "of the same spec already there is reused")
    parser.add_argument("--n-images", type=int, default=1000, help="number of images (default 1000)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (default 1024, as NIH)")
    parser.add_argument("--metadata", help="real Data_Entry CSV to sample patients and labels from "
                                           "(default: built-in frequencies, floored at 10%% per finding)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", default="runs/demo", help="where every stage writes (default runs/demo)")
    parser.add_argument("--n-images", type=int, default=1000, help="synthetic images (default 1000)")
    parser.add_argument("--image-size", type=int, default=1024, help="synthetic image side (default 1024)")
    parser.add_argument("--size", type=int, default=128, help="training input side (default 128)")
    parser.add_argument("--epochs", type=int, help="maximum training epochs (default from conf)")
    parser.add_argument("--num-proc", type=int, help="Horovod processes (default from conf: 2)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed (default 0)")


def args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxr-spark", description=(
        "A Spark pipeline for chest X-rays (NIH ChestX-ray14): synth -> ingest -> preprocess -> train "
        "(Horovod-on-Spark) -> score -> report. Each stage can also run as spark-submit spark_jobs/<stage>.py."))
    parser.add_argument("--version", action="version", version=f"cxr-spark {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    synth = commands.add_parser("synth", help="write a synthetic NIH ChestX-ray14-style dump (no Spark)",
                                description="Write images_NNN/images/*.png, Data_Entry_2017.csv, train_val_list.txt "
                                            "and test_list.txt exactly like the NIH download.")
    _add_synth(synth)
    synth.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    for name, (module, help_text) in SPARK_STAGES.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.configure_parser(sub)
        _add_common(sub)
    demo = commands.add_parser("demo", help="run every stage on a synthetic dump and print test AUROC",
                               description="synth -> ingest -> preprocess -> train -> score -> report in RUN_DIR.")
    _add_demo(demo)
    _add_common(demo)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("py4j", "matplotlib", "petastorm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _summary(stage: str, counts: dict) -> str:
    return f"{stage}: " + json.dumps(counts, default=str)


def run_stage(stage: str, args: argparse.Namespace, spark=None) -> dict:
    """Run one Spark stage with a session built here (and stopped here) unless one is given."""
    config = load_config(args.config)
    log.info("%s: arguments %s", stage, {k: v for k, v in vars(args).items() if v is not None})
    own_session = spark is None
    spark = spark or build_session(f"cxr-spark {stage}", args.spark_conf)
    try:
        return SPARK_STAGES[stage][0].main(spark, args, config)
    finally:
        if own_session:
            spark.stop()


def main(argv: list[str] | None = None) -> int:
    args = args_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "synth":
            from cxr_spark.synth import SynthSpec, generate_or_reuse

            counts = generate_or_reuse(SynthSpec(out=args.out, n_images=args.n_images, size=args.size,
                                                 seed=args.seed, metadata=args.metadata))
        elif args.command == "demo":
            from cxr_spark.demo import run_demo

            counts = run_demo(args)
        else:
            check = getattr(SPARK_STAGES[args.command][0], "check_args", None)
            if check is not None:
                check(args)  # paths and files, before Spark starts
            counts = run_stage(args.command, args)
    except UsageError as error:
        print(f"cxr-spark {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except Exception as error:
        code = getattr(error, "exit_code", None)
        if not isinstance(code, int):
            raise
        log.error("%s: %s", args.command, error)
        print(_summary(args.command, {"status": getattr(error, "status", "failed"), "exit_code": code,
                                      "error": str(error)}))
        return code
    print(_summary(args.command, counts))
    stage = SPARK_STAGES.get(args.command)
    return getattr(stage[0], "exit_code", lambda _: 0)(counts) if stage else 0


def submit_main(stage: str, argv: list[str]) -> int:
    """Entry point of ``spark_jobs/<stage>.py``: same arguments as ``cxr-spark <stage>``."""
    return main([stage, *argv])


if __name__ == "__main__":
    sys.exit(main())
