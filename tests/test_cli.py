"""The command line's help and flags (issue #20): help pages show the defaults conf/pipeline.toml really holds
and end with an example that parses; ``--print-config`` prints the settings a run would use, as TOML, without
starting Spark; renamed flags still work under their old names, with one warning."""
from __future__ import annotations

import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cxr_spark.cli import args_parser, main

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("synth", "ingest", "preprocess", "features", "train", "score", "report", "batch-score", "demo")
#: Flags whose default comes from conf: (command, flag, section, key).
CONF_FLAGS = [("ingest", "--val-fraction", "ingest", "val_fraction"),
              ("ingest", "--test-fraction", "ingest", "test_fraction"),
              ("ingest", "--split-seed", "ingest", "split_seed"), ("ingest", "--size", "preprocess", "size"),
              ("preprocess", "--size", "preprocess", "size"), ("features", "--max-iter", "features", "max_iter"),
              ("features", "--reg-param", "features", "reg_param"), ("score", "--split", "score", "split"),
              ("batch-score", "--batch-size", "score", "batch_size"), ("demo", "--epochs", "train", "epochs"),
              ("demo", "--num-proc", "train", "num_proc"), ("train", "--arch", "train", "model"),
              ("train", "--epochs", "train", "epochs"), ("train", "--learning-rate", "train", "learning_rate"),
              ("train", "--input-workers", "train", "input_workers")]


@pytest.fixture(scope="module")
def conf() -> dict:
    with open(ROOT / "conf" / "pipeline.toml", "rb") as handle:
        return tomllib.load(handle)


def _help(command: str, capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "250")  # argparse wraps at the terminal width: one flag a line
    with pytest.raises(SystemExit) as exited:
        args_parser().parse_args([command, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def _entries(text: str) -> list[str]:
    """Each option of a help page on one line: its flags, metavar and help, whitespace collapsed."""
    entries: list[str] = []
    for line in text.splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif entries and line.startswith("   "):
            entries[-1] += " " + line.strip()
    return [" ".join(entry.split()) for entry in entries]


@pytest.mark.parametrize("command, flag, section, key", CONF_FLAGS)
def test_help_shows_the_default_conf_holds(command, flag, section, key, conf, capsys, monkeypatch):
    value = conf[section][key]
    shown = f'"{value}"' if isinstance(value, str) else str(value)
    entries = [entry for entry in _entries(_help(command, capsys, monkeypatch)) if entry.startswith(flag + " ")]
    assert len(entries) == 1 and f"(default {shown}, from conf [{section}] {key})" in entries[0], entries


@pytest.mark.parametrize("command", COMMANDS)
def test_no_help_says_default_from_conf_without_the_value(command, capsys, monkeypatch):
    assert "default from conf" not in _help(command, capsys, monkeypatch)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_ends_with_an_example_that_parses(command, capsys, monkeypatch):
    lines = _help(command, capsys, monkeypatch).rstrip("\n").splitlines()
    assert lines[-2] == "example:"
    words = shlex.split(lines[-1])
    assert words[:2] == ["cxr-spark", command]
    args = args_parser().parse_args(words[1:])  # SystemExit (a test error) if a flag is unknown or missing
    assert args.command == command


def _printed(argv: list[str], capsys) -> dict:
    assert main(argv) == 0
    return tomllib.loads(capsys.readouterr().out)


def test_print_config_is_the_conf_section_with_the_flags_given(conf, capsys, tmp_path):
    assert _printed(["score", "--print-config", "--split", "val"], capsys) == {
        "score": {**conf["score"], "split": "val"}}
    assert _printed(["preprocess", "--print-config", "--size", "64"], capsys) == {
        "preprocess": {**conf["preprocess"], "size": 64}}
    assert _printed(["features", "--print-config", "--max-iter", "7"], capsys) == {
        "features": {**conf["features"], "max_iter": 7}}
    assert _printed(["ingest", "--print-config", "--split-seed", "5"], capsys) == {
        "ingest": {**conf["ingest"], "split_seed": 5}}
    # with --images-out, ingest also writes images with the preprocess settings
    assert _printed(["ingest", "--print-config", "--images-out", "x", "--size", "48"], capsys) == {
        "ingest": conf["ingest"], "preprocess": {**conf["preprocess"], "size": 48}}
    assert _printed(["batch-score", "--print-config"], capsys) == {
        "batch-score": {"batch_size": conf["score"]["batch_size"], "lock_stale_after_s": 21600,
                        "retry_quarantined": False, "fail_on_drift": False}}
    report = _printed(["report", "--print-config", "--gradcam-top-k", "5"], capsys)["report"]
    assert report["gradcam_top_k"] == 5 and "gradcam_layer" not in report  # not set: no TOML null


def test_print_config_of_the_demo_is_every_section_it_runs_with(conf, capsys):
    printed = _printed(["demo", "--print-config", "--input-size", "64", "--epochs", "3"], capsys)
    assert printed["demo"]["input_size"] == 64 and printed["preprocess"] == {**conf["preprocess"], "size": 64}
    assert printed["train"] == {**conf["train"], "epochs": 3}
    assert printed["score"] == {**conf["score"], "split": "test"}  # the demo scores the test split
    assert printed["ingest"] == conf["ingest"] and printed["features"] == conf["features"]


def test_print_config_reads_the_config_given(conf, capsys, tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text((ROOT / "conf" / "pipeline.toml").read_text().replace('split = "test"', 'split = "val"'))
    assert _printed(["score", "--print-config", "--config", str(mine)], capsys)["score"]["split"] == "val"


def test_print_config_starts_no_spark_and_writes_nothing(conf, tmp_path):
    # --spark-conf names no file: a run that built its session would fail there with exit code 1
    done = subprocess.run([sys.executable, "-m", "cxr_spark.cli", "score", "--in", "images", "--model", "model",
                           "--out", "predictions", "--split", "train", "--print-config", "--spark-conf", "absent.conf"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and tomllib.loads(done.stdout) == {"score": {**conf["score"], "split": "train"}}
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, old, new, value, dest, expected", [
    ("report", "--images", "--images-dataset", "runs/demo/images_128", "images", "runs/demo/images_128"),
    ("demo", "--size", "--input-size", "64", "size", 64),
])
def test_a_renamed_flag_still_works_under_its_old_name(command, old, new, value, dest, expected):
    from cxr_spark.cli_flags import deprecation_warnings

    required = ["--predictions", "p", "--out", "o"] if command == "report" else []
    old_args = args_parser().parse_args([command, *required, old, value])
    new_args = args_parser().parse_args([command, *required, new, value])
    assert getattr(old_args, dest) == getattr(new_args, dest) == expected  # same destination and type
    assert deprecation_warnings(old_args) == [f"{old} is deprecated: use {new} (same meaning)"]
    assert deprecation_warnings(new_args) == []


def test_the_old_name_prints_one_warning_and_the_run_goes_on(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cxr_spark.cli", "report", "--predictions", "none", "--out",
                           "report", "--images", "images_128", "--spark-conf", "absent.conf"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 2, done.stderr
    assert lines[0] == "cxr-spark report: warning: --images is deprecated: use --images-dataset (same meaning)"
    assert lines[1].startswith("cxr-spark report: error: --predictions none: no such folder")


def test_the_old_name_is_hidden_and_the_new_help_names_it(capsys, monkeypatch):
    text = _help("report", capsys, monkeypatch)
    assert "--images-dataset IMAGES" in text and "(formerly --images, still accepted)" in text
    assert "--images IMAGES" not in text
