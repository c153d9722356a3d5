"""Checks made before a run does any work, so that it cannot destroy what the user has: no output over an
input, no file that is not a published metadata layout read as one. Pure Python, no Spark: the command
line runs them before a Spark session starts.

A failed check raises :class:`UsageError`, which the command line reports as one line and exit code 2.
"""
from __future__ import annotations

import gzip
import json
import os
import posixpath
from urllib.parse import urlparse

from cxr_spark.core.metadata import HEADER

#: The exit code of a mistake on the command line (argparse's own).
EXIT_USAGE = 2


class UsageError(ValueError):
    """A run refused before it started, for a reason the user can fix; the CLI prints it and exits 2."""

    exit_code = EXIT_USAGE
    status = "refused"


def canonical(path: str) -> str:
    """One spelling per place: local paths (plain or ``file:``) resolved with symlinks and ``..`` as
    ``file:///abs``; other URLs with their scheme and host in lower case and their path normalised.

    >>> canonical("hdfs://NameNode:8020/data/../data/raw/")
    'hdfs://namenode:8020/data/raw'
    """
    local = _local(path)
    if local is not None:
        return "file://" + os.path.realpath(os.path.expanduser(local))
    parsed = urlparse(path)
    return f"{parsed.scheme.lower()}://{parsed.netloc.lower()}{posixpath.normpath(parsed.path or '/')}".rstrip("/")


def _local(path: str | None) -> str | None:
    """The local path of a plain path or ``file:`` URL; None for None and for other filesystems."""
    if not path:
        return None
    parsed = urlparse(path)
    return (parsed.path if parsed.scheme else path) if parsed.scheme in ("", "file") else None


def _within(inner: str, outer: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def check_paths(inputs: dict[str, str | None], outputs: dict[str, str | None]) -> None:
    """Refuse an output that equals, contains or sits inside an input, or another output.

    ``inputs`` and ``outputs`` map a flag (``--images``) to its path (None when not given). Replacing an
    output deletes what was there, so an input under it would be lost with it.
    """
    given_inputs = {flag: canonical(path) for flag, path in inputs.items() if path}
    given_outputs = {flag: canonical(path) for flag, path in outputs.items() if path}
    for out_flag, out in given_outputs.items():
        for in_flag, source in given_inputs.items():
            if _within(source, out) or _within(out, source):
                where = ("is" if out == source else "contains" if _within(source, out) else "is inside")
                raise UsageError(f"{out_flag} {outputs[out_flag]} {where} {in_flag} {inputs[in_flag]}: "
                                 f"writing it would replace the input; choose an {out_flag} outside every input")
    flags = list(given_outputs)
    for i, first in enumerate(flags):
        for second in flags[i + 1:]:
            if _within(given_outputs[first], given_outputs[second]) or _within(given_outputs[second],
                                                                                 given_outputs[first]):
                raise UsageError(f"{first} {outputs[first]} and {second} {outputs[second]} overlap: "
                                 f"each output needs a place of its own")


#: The header lines ``Data_Entry_2017*.csv`` is published with: the v2020 revision, and the 2017 file,
#: whose lines end with an extra empty column.
METADATA_HEADERS = (HEADER, HEADER + ",")


def metadata_header_problem(first_line: bytes) -> str | None:
    """Why ``first_line`` (raw bytes, BOM and line end included) is not a published NIH header, or None."""
    try:
        text = first_line.decode("utf-8-sig").rstrip("\r\n").strip()
    except UnicodeDecodeError:
        return "its first line is not text (UTF-8)"
    if text in METADATA_HEADERS:
        return None
    shown = text if len(text) <= 120 else text[:117] + "..."
    return f"its header is {shown!r}"


def read_first_line(path: str, limit: int = 4096) -> bytes:
    """The first line of a local file (gunzipped when its name ends in ``.gz``), at most ``limit`` bytes."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            return handle.readline(limit)
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise UsageError(f"--metadata {path}: cannot be read ({error})") from error


def check_metadata_file(path: str | None) -> None:
    """Refuse a local ``--metadata`` that is missing or not one of the published NIH layouts."""
    local = _local(path)
    if local is None:
        return  # not given, or on another filesystem: ingest checks it from Spark the same way
    if not os.path.isfile(local):
        raise UsageError(f"--metadata {path}: no such file")
    problem = metadata_header_problem(read_first_line(local))
    if problem:
        raise UsageError(f"--metadata {path}: not an NIH Data_Entry_2017 file: {problem}; expected the header "
                         f"{HEADER!r} (a trailing comma allowed, as in the 2017 file)")


def check_folder(flag: str, path: str | None) -> None:
    """Refuse a local input folder that does not exist (other filesystems are checked by Spark)."""
    local = _local(path)
    if local is not None and not os.path.isdir(local):
        raise UsageError(f"{flag} {path}: no such folder")


#: The manifest's ``stage`` of each kind of output (what ``_manifest.json`` says wrote it), by its name.
KINDS = {"ingest": "raw dataset", "preprocess": "images dataset", "features": "features dataset",
         "features-baseline": "baseline predictions", "train": "model folder", "score": "predictions dataset",
         "report": "report folder"}


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def replace_problem(kind: str, entries: list[str] | None, manifest: dict | None) -> str | None:
    """Why an existing output may not be replaced by a run writing ``kind`` (a manifest stage), or None.

    ``entries`` are the names in the output folder (None when there is nothing there), ``manifest`` its
    ``_manifest.json`` (None when absent or unreadable). Only a missing or empty folder, or a dataset this
    pipeline wrote of the same kind, may be replaced: replacing deletes what was there.
    """
    if not entries:
        return None
    if manifest is None or not isinstance(manifest, dict):
        return ("exists and is not an output of cxr-spark (it has no readable _manifest.json); replacing it "
                "would delete it")
    stage = manifest.get("stage")
    if stage != kind:
        return (f"is {_a(KINDS.get(stage, 'output'))} (written by {stage!r}), not {_a(KINDS.get(kind, kind))}; "
                f"replacing it would delete it")
    return None


def check_replaceable_local(flag: str, path: str | None, kind: str) -> None:
    """:func:`replace_problem` for a local output, before Spark starts (other filesystems: at the swap)."""
    local = _local(path)
    if local is None or not os.path.exists(local):
        return
    if not os.path.isdir(local):
        raise UsageError(f"{flag} {path} is a file, not a folder; replacing it would delete it")
    manifest = None
    try:
        with open(os.path.join(local, "_manifest.json")) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        pass
    problem = replace_problem(kind, os.listdir(local), manifest)
    if problem:
        raise UsageError(f"{flag} {path} {problem}; choose another {flag} or remove it yourself")


def check_run(inputs: dict[str, str | None], outputs: dict[str, tuple[str | None, str | None]],
              folders: tuple[str, ...] = ()) -> None:
    """Every check of a stage's paths before it starts: the input ``folders`` (flags) exist, no output
    overlaps an input or another output, and each output whose kind is given may be replaced."""
    for flag in folders:
        check_folder(flag, inputs.get(flag))
    check_paths(inputs, {flag: path for flag, (path, _) in outputs.items()})
    for flag, (path, kind) in outputs.items():
        if kind is not None:
            check_replaceable_local(flag, path, kind)


#: What an input flag takes, by the manifest ``stage`` of the dataset that fits, as errors name it.
TAKES = {"ingest": "a raw dataset (written by ingest)",
         "preprocess": "an images_<size> dataset (written by preprocess or ingest --images-out)",
         "features": "a features dataset (written by features)",
         "features-baseline": "baseline predictions (written by features --baseline-out)",
         "train": "a model folder (written by train)",
         "score": "a predictions dataset (written by score)",
         "report": "a report folder (written by report)"}

#: An MLflow model URI (``models:/NAME/VERSION``): not a folder, resolved by whoever takes it.
MODEL_URI_PREFIX = "models:/"


def _read_manifest(folder: str) -> dict | None:
    """``folder/_manifest.json`` as a dict, or None when it is absent, unreadable or not an object."""
    try:
        with open(os.path.join(folder, "_manifest.json")) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def input_problem(folder: str, stages: tuple[str, ...], needs: str | None = None) -> str | None:
    """Why the local ``folder`` is not an input of one of the kinds ``stages`` (manifest stages), or None.

    ``needs`` is a file the folder must hold (a model folder's ``model.json``); a folder holding it passes
    without a manifest (a model card made by hand), but not with a manifest of another stage.
    """
    if not os.path.isdir(folder):
        return "no such folder" if not os.path.exists(folder) else "is a file, not a folder"
    manifest = _read_manifest(folder)
    if needs is not None and not os.path.isfile(os.path.join(folder, needs)):
        return f"has no {needs}"
    if manifest is None:
        if needs is not None:
            return None
        return "has no readable _manifest.json, so it is not a dataset cxr-spark wrote"
    stage = manifest.get("stage")
    if stage in stages:
        return None
    if stage in TAKES:
        return f"is {TAKES[stage]}"
    return f"is not a dataset cxr-spark wrote (its _manifest.json says stage {stage!r})"


def check_input(command: str, flag: str, path: str | None, stages: tuple[str, ...], needs: str | None = None) -> None:
    """Refuse a local input of ``command`` that is not the kind it takes through ``flag``: one of ``stages``,
    the manifest ``stage`` of the datasets that fit (:func:`input_problem`). Paths on other filesystems and
    MLflow model URIs (``models:/...``) are left to the stage; None (a flag not given) passes.

    ``check_input("score", "--in", "runs/demo/raw", ("preprocess",))`` refuses the raw dataset with
    "--in runs/demo/raw is a raw dataset (written by ingest); score takes an images_<size> dataset (written by
    preprocess or ingest --images-out)".
    """
    if path is None or path.startswith(MODEL_URI_PREFIX):
        return
    local = _local(path)
    if local is None:
        return
    problem = input_problem(os.path.expanduser(local), stages, needs)
    if problem:
        separator = ":" if problem.startswith("no such") else ""
        raise UsageError(f"{flag} {path}{separator} {problem}; {command} takes "
                         f"{' or '.join(TAKES.get(stage, stage) for stage in stages)}")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one of another user's counts).

    >>> process_alive(os.getpid())
    True
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True
