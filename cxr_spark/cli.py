"""The ``cxr-spark`` command: one subcommand per stage, and ``demo`` to run them all.

``spark_jobs/<stage>.py`` call :func:`submit_main` with the same arguments under ``spark-submit``.

Exit codes: 0 on success; 2 for a run refused before it could do harm (:class:`~cxr_spark.core.guards.UsageError`:
an output over an input, an output that is not a dataset of its kind, a metadata file of another layout,
a run with nothing to write), printed as one line. A stage module may define ``exit_code(counts) -> int``
to report a distinct code for a finished run (``batch-score``: 3 when nothing was new, 5 when it drifted and
``--fail-on-drift`` was given), and an exception with an
integer ``exit_code`` attribute ends the command with that code and its message instead of a
traceback (``batch-score``: 4 when the store is locked). Any other failure exits with 1.

``--print-config`` prints a run's settings as TOML and exits 0 before any check or Spark: a stage module's
``settings(args, config)`` (also what its ``main`` runs with) makes them, else its conf section is shown.
A renamed flag keeps its old spelling through :func:`cxr_spark.cli_flags.deprecated_alias`, with a warning.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from types import ModuleType

from cxr_spark import __version__
from cxr_spark.cli_flags import (OneLineParser, conf_default, deprecated_alias, deprecation_warnings, relax_required,
                                 settings_toml)
from cxr_spark.config import PipelineConfig, load_config, override
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


#: One example command line per command, the last lines of its help (tests/test_cli.py parses each).
EXAMPLES = {
    "synth": "cxr-spark synth --out runs/demo/dump --n-images 1000 --size 1024",
    "ingest": "cxr-spark ingest --images runs/demo/dump --metadata runs/demo/dump/Data_Entry_2017.csv "
              "--split-lists runs/demo/dump --out runs/demo/raw --images-out runs/demo/images_224",
    "preprocess": "cxr-spark preprocess --in runs/demo/raw --out runs/demo/images_224 --size 224",
    "features": "cxr-spark features --in runs/demo/images_224 --out runs/demo/features "
                "--baseline-out runs/demo/baseline",
    "train": "cxr-spark train --in runs/demo/images_224 --out runs/demo/model --arch small_cnn --epochs 10",
    "score": "cxr-spark score --in runs/demo/images_224 --model runs/demo/model --out runs/demo/predictions",
    "report": "cxr-spark report --predictions runs/demo/predictions --baseline runs/demo/baseline "
              "--images-dataset runs/demo/images_224 --out runs/demo/report",
    "batch-score": "cxr-spark batch-score --images /data/incoming --model runs/demo/model --out /data/store",
    "demo": "cxr-spark demo --run-dir runs/demo --n-images 1000 --input-size 128",
}
#: The conf section whose settings a stage without a ``settings(args, config)`` function runs with.
CONF_SECTIONS = {"ingest": "ingest", "preprocess": "preprocess", "features": "features", "train": "train",
                 "score": "score", "batch-score": "score"}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="pipeline defaults (default: conf/pipeline.toml)")
    parser.add_argument("--spark-conf", help="Spark properties file when not under spark-submit "
                                             "(default: conf/spark/local.conf)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-dir", help="folder for this run's full log, <command>-<UTC time>.log (default: "
                                          "the demo's RUN_DIR/logs, else logs/ beside --out, else ./logs)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the settings this command would run with (conf/pipeline.toml, or --config, "
                             "merged with the flags given) as TOML and exit, without starting Spark; paths "
                             "may be left out")


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
    parser.add_argument("--input-size", dest="size", type=int, default=128,
                        help="side of the images_<size> dataset the model trains on (default 128)")
    deprecated_alias(parser, "--size", "--input-size")
    parser.add_argument("--epochs", type=int, help=f"maximum training epochs {conf_default('train', 'epochs')}")
    parser.add_argument("--num-proc", type=int, help=f"Horovod processes {conf_default('train', 'num_proc')}")
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed (default 0)")
    parser.add_argument("--tracking-uri", help="MLflow tracking store or server (default: MLFLOW_TRACKING_URI, "
                                               "else conf [tracking] uri, else RUN_DIR/mlruns)")


def demo_settings(args: argparse.Namespace, config: PipelineConfig) -> dict:
    """The demo's settings by conf section, as :func:`cxr_spark.demo.run_demo` uses them (``--print-config``)."""
    return {"demo": {"run_dir": args.run_dir, "n_images": args.n_images, "image_size": args.image_size,
                     "input_size": args.size, "seed": args.seed},
            "ingest": config.ingest, "preprocess": override(config.preprocess, size=args.size),
            "features": config.features, "train": override(config.train, epochs=args.epochs, num_proc=args.num_proc),
            "score": override(config.score, split="test")}


def _help_text(text: str) -> str:
    """Help paragraphs wrapped for the terminal (the formatter keeps the example lines as they are)."""
    return "\n\n".join(textwrap.fill(paragraph, 100) for paragraph in text.split("\n\n"))


def _with_example(parser: argparse.ArgumentParser, command: str) -> None:
    """End ``command``'s help with its example (kept unwrapped: a line to copy)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = _help_text(parser.description or "")
    epilog = _help_text(parser.epilog) + "\n\n" if parser.epilog else ""
    parser.epilog = f"{epilog}example:\n  {EXAMPLES[command]}"


def args_parser(strict: bool = True) -> argparse.ArgumentParser:
    """The ``cxr-spark`` parser; not ``strict``: no option is required (``--print-config`` needs no paths)."""
    parser = OneLineParser(prog="cxr-spark", description=(
        "A Spark pipeline for chest X-rays (NIH ChestX-ray14): synth -> ingest -> preprocess -> train "
        "(Horovod-on-Spark) -> score -> report. Each stage can also run as spark-submit spark_jobs/<stage>.py."))
    parser.add_argument("--version", action="version", version=f"cxr-spark {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    synth = commands.add_parser("synth", help="write a synthetic NIH ChestX-ray14-style dump (no Spark)",
                                description="Write images_NNN/images/*.png, Data_Entry_2017.csv, train_val_list.txt "
                                            "and test_list.txt exactly like the NIH download.")
    _add_synth(synth)
    synth.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    _with_example(synth, "synth")
    for name, (module, help_text) in SPARK_STAGES.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        module.configure_parser(sub)
        _add_common(sub)
        _with_example(sub, name)
        if not strict:
            relax_required(sub)
    demo = commands.add_parser("demo", help="run every stage on a synthetic dump and print test AUROC",
                               description="synth -> ingest -> preprocess -> train -> score -> report in RUN_DIR.")
    _add_demo(demo)
    _add_common(demo)
    _with_example(demo, "demo")
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    """Console and log file for this run (cxr_spark/io/console.py): everything any process of the run writes
    goes to ``<log dir>/<command>-<UTC time>.log`` (``--log-dir``; default: the demo's ``<run-dir>/logs``,
    else ``logs/`` beside ``--out``, else ./logs), the console gets our progress, results and actionable
    warnings. The log is closed at exit, after Python has printed any traceback, so the traceback is in it."""
    import atexit
    import contextlib

    from cxr_spark.io import console

    stack = contextlib.ExitStack()
    stack.enter_context(console.run_log(console.log_path(console.default_log_dir(args), args.command),
                                        args.verbose))
    atexit.register(stack.close)


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


def print_config(command: str, args: argparse.Namespace) -> str:
    """The TOML ``--print-config`` prints: the settings ``command`` runs with, by conf section (the stage
    module's ``settings(args, config)``; a stage without one shows its conf section as it is)."""
    config = load_config(args.config)
    if command == "demo":
        sections = demo_settings(args, config)
    else:
        module = SPARK_STAGES[command][0]
        make = getattr(module, "settings", None)
        section = CONF_SECTIONS.get(command)
        if make is None:
            sections = {section: getattr(config, section)} if section else {}
        else:
            made = make(args, config)
            sections = made if isinstance(made, dict) else {section or command: made}
    source = args.config or "conf/pipeline.toml"
    return settings_toml(sections, f"# cxr-spark {command}: the settings of this run ({source} with the flags given)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = args_parser(strict="--print-config" not in argv).parse_args(argv)
    for warning in deprecation_warnings(args):  # on the console before anything else, refused runs included
        print(f"cxr-spark {args.command}: warning: {warning}", file=sys.stderr, flush=True)
    if getattr(args, "print_config", False):
        print(print_config(args.command, args), end="")
        return 0
    stage = SPARK_STAGES.get(args.command)
    check = getattr(stage[0], "check_args", None) if stage else None
    if check is not None:
        try:
            check(args)  # paths, files and input kinds: before a log file or Spark, so a refused run leaves nothing
        except UsageError as error:
            print(f"cxr-spark {args.command}: error: {error}", file=sys.stderr)
            return error.exit_code
    _setup_logging(args)
    try:
        if args.command == "synth":
            from cxr_spark.synth import SynthSpec, generate_or_reuse

            counts = generate_or_reuse(SynthSpec(out=args.out, n_images=args.n_images, size=args.size,
                                                 seed=args.seed, metadata=args.metadata))
        elif args.command == "demo":
            from cxr_spark.demo import run_demo

            counts = run_demo(args)
        else:
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
    return getattr(stage[0], "exit_code", lambda _: 0)(counts) if stage else 0


def submit_main(stage: str, argv: list[str]) -> int:
    """Entry point of ``spark_jobs/<stage>.py``: same arguments as ``cxr-spark <stage>``."""
    return main([stage, *argv])


if __name__ == "__main__":
    sys.exit(main())
