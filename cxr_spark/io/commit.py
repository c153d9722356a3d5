"""Writing outputs so that nothing is lost: an exclusive lock per output, datasets written together
committed together, and what a killed run left finished or removed by the next one.

A run writes each output ``<parent>/<name>`` into a hidden sibling ``.<name>.tmp-<run>`` (Spark and
Petastorm skip names starting with ``.``). When every output is complete it writes its commit record
``.<name>.commit-<run>.json`` beside each output (the run is committed once all of them exist), renames
each previous output aside (``.<name>.old-<run>``), renames each new one in, deletes the old ones, then
the records. A run killed before its commit point leaves its outputs as they were; one killed after it
is rolled forward by the next run on any of its outputs, or by a stage that reads one (:func:`settle`).
Every other hidden ``tmp``, ``old`` or ``scratch`` folder of a dead run is removed then too.

Tests stop a run at each step of this protocol: :func:`step` logs ``commit step: <name>`` and, when
``CXR_SPARK_PAUSE_AT`` names that step, waits there to be killed.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from pyspark.sql import SparkSession

from cxr_spark.core.guards import UsageError, process_alive, replace_problem
from cxr_spark.io.storage import FileSystem, local_path, read_json, to_url, write_text

log = logging.getLogger(__name__)

#: Exit code of a run refused because another holds its output.
EXIT_LOCKED = 4
DEFAULT_LOCK_STALE_AFTER_S = 6 * 3600  # longer than any nightly run; a crashed run's lock expires by then
PAUSE_AT = "CXR_SPARK_PAUSE_AT"


def step(name: str) -> None:
    """Mark a step of a commit: logged, and where a test kills the run (``CXR_SPARK_PAUSE_AT=<name>``)."""
    log.debug("commit step: %s", name)
    if os.environ.get(PAUSE_AT) == name:
        log.warning("commit step: %s: paused (%s) until killed", name, PAUSE_AT)
        while True:
            time.sleep(1)


class OutputLockedError(RuntimeError):
    """Another live run holds an output's lock; the CLI ends with :data:`EXIT_LOCKED`."""

    exit_code = EXIT_LOCKED
    status = "locked"


@dataclass
class RunLock:
    """An exclusive lock file, created atomically, holding the pid, host, time and run id of its holder.

    A lock whose process on this host is gone, or older than ``stale_after_s``, is stale and broken.
    """

    spark: SparkSession
    url: str
    run_id: str
    stale_after_s: float = DEFAULT_LOCK_STALE_AFTER_S

    def acquire(self, what: str = "output") -> None:
        """Take the lock, breaking a stale one once; :class:`OutputLockedError` if a live run holds it."""
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": self.run_id,
                  "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        if self._create(json.dumps(holder)):
            return
        current, age = self._read()
        reason = self._stale_reason(current, age)
        if reason is None:
            raise OutputLockedError(f"{what} is locked by {self.url}: {json.dumps(current)} (held {age:.0f} s); "
                                    f"another run is writing it")
        log.warning("breaking stale lock %s held by %s: %s", self.url, json.dumps(current), reason)
        self._delete()
        if not self._create(json.dumps(holder)):
            raise OutputLockedError(f"lock {self.url} was taken by another run while breaking a stale one")

    def release(self) -> None:
        """Remove the lock if this run still holds it."""
        current, _ = self._read()
        if current.get("run_id") == self.run_id:
            self._delete()
        else:
            log.warning("lock %s is no longer ours (%s); leaving it", self.url, current)

    def _stale_reason(self, holder: dict, age: float) -> str | None:
        if age > self.stale_after_s:
            return f"older than {self.stale_after_s:.0f} s ({age:.0f} s)"
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            if not process_alive(holder["pid"]):
                return f"process {holder['pid']} on this host is gone"
        return None

    def _create(self, text: str) -> bool:
        path = local_path(self.url)
        if path is not None:
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(descriptor, "w") as handle:
                handle.write(text)
            return True
        try:
            FileSystem(self.spark, self.url).create_new(self.url, text)  # HDFS: fails atomically if it exists
        except FileExistsError:
            return False
        return True

    def _read(self) -> tuple[dict, float]:
        """The holder's record (empty if unreadable, e.g. half-written) and the lock's age in seconds."""
        modified = FileSystem(self.spark, self.url).modified(self.url)
        if modified is None:
            return {}, 0.0  # gone meanwhile
        try:
            holder = read_json(self.spark, self.url)
        except (OSError, ValueError):
            holder = {}
        return (holder if isinstance(holder, dict) else {}), time.time() - modified

    def _delete(self) -> None:
        FileSystem(self.spark, self.url).delete(self.url)


def _split(url: str) -> tuple[str, str]:
    parent, name = to_url(url).rsplit("/", 1)
    return parent, name


def _lock_url(url: str) -> str:
    parent, name = _split(url)
    return f"{parent}/.{name}.lock"


def _hidden(url: str, what: str, run: str) -> str:
    parent, name = _split(url)
    return f"{parent}/.{name}.{what}-{run}"


def _leftovers(fs: FileSystem, url: str) -> dict[str, list[str]]:
    """A dead run's hidden siblings of ``url`` by kind (``commit``, ``tmp``, ``old``, ``scratch``)."""
    parent, name = _split(url)
    pattern = re.compile(rf"^\.{re.escape(name)}\.(commit|tmp|old|scratch)-([0-9a-f]+)(\.json)?$")
    found: dict[str, list[str]] = {"commit": [], "tmp": [], "old": [], "scratch": []}
    for entry in fs.names(parent) or []:
        match = pattern.match(entry)
        if match:
            found[match.group(1)].append(f"{parent}/{entry}")
    return found


def _roll(spark: SparkSession, record_url: str) -> None:
    """Finish (all its records exist and parse) or undo (otherwise) the commit a record describes."""
    def fs(url: str) -> FileSystem:
        return FileSystem(spark, url)

    try:
        record = read_json(spark, record_url)
        records = [url for url in record["records"] if fs(url).exists(url)]
        complete = len(records) == len(record["records"]) and all(_readable(spark, url) for url in records)
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("removing an unreadable commit record %s: its run never committed", record_url)
        fs(record_url).delete(record_url)
        return
    if complete:
        log.warning("finishing the commit of run %s that was killed during it: %s", record["run"],
                    ", ".join(move["out"] for move in record["moves"]))
        for move in record["moves"]:
            if fs(move["tmp"]).exists(move["tmp"]):
                if fs(move["out"]).exists(move["out"]):
                    fs(move["out"]).rename(move["out"], move["old"])
                fs(move["tmp"]).rename(move["tmp"], move["out"])
    else:
        log.warning("undoing run %s, killed before its commit: its outputs stay as they were", record["run"])
    for move in record["moves"]:
        left = move["old"] if complete else move["tmp"]
        fs(left).delete(left)
    for url in record["records"]:
        fs(url).delete(url)


def _readable(spark: SparkSession, url: str) -> bool:
    try:
        read_json(spark, url)
        return True
    except (OSError, ValueError):
        return False


def recover(spark: SparkSession, url: str, keep: str | None = None) -> None:
    """Finish or undo a killed run's commit beside ``url``, then remove every hidden folder dead runs left
    there (all but run ``keep``'s). Call it holding ``url``'s lock."""
    fs = FileSystem(spark, to_url(url))
    for record_url in _leftovers(fs, url)["commit"]:
        if fs.exists(record_url):
            _roll(spark, record_url)
    left = _leftovers(fs, url)
    if not fs.exists(to_url(url)) and left["old"]:  # killed between two renames of an older swap
        fs.rename(sorted(left["old"])[-1], to_url(url))
        left = _leftovers(fs, url)
    stale = [path for kind in ("tmp", "old", "scratch") for path in left[kind]
             if keep is None or not path.endswith(f"-{keep}")]
    for path in stale:
        fs.delete(path)
    if stale:
        log.info("removed %d folders a killed run left beside %s", len(stale), to_url(url))


def settle(spark: SparkSession, url: str) -> None:
    """Before a stage reads ``url``: finish a commit a killed run left half-done there (a commit record beside
    it), unless a live run holds its lock (then it is committing, and it finishes it) or the reader may not
    write there (a read-only copy is left to its owner)."""
    if not _leftovers(FileSystem(spark, to_url(url)), url)["commit"]:
        return
    lock = RunLock(spark, _lock_url(url), uuid.uuid4().hex[:8])
    try:
        lock.acquire()
    except (OutputLockedError, OSError) as error:
        log.info("not settling %s: %s", url, error)
        return
    try:
        recover(spark, url)
    finally:
        lock.release()


@dataclass
class OutputRun:
    """One run's hold on the outputs it writes: ``outputs`` maps a key to ``(url, kind)``, ``kind`` the
    manifest ``stage`` an existing output must have to be replaced.

    Entering takes each output's lock (``.<name>.lock``), recovers what a killed run left there, and
    refuses an output that may not be replaced (:class:`UsageError`); :meth:`tmp` is where an output is
    written, :meth:`scratch` a hidden folder for intermediate data; :meth:`commit` puts every output in
    place together. Leaving by an exception deletes this run's folders; leaving always releases the locks.
    """

    spark: SparkSession
    outputs: dict[str, tuple[str, str]]
    stale_after_s: float = DEFAULT_LOCK_STALE_AFTER_S
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def __post_init__(self):
        self.outputs = {key: (to_url(url), kind) for key, (url, kind) in self.outputs.items() if url}
        self._locks: list[RunLock] = []
        self.committed = False

    def __enter__(self) -> "OutputRun":
        try:
            for url, kind in self.outputs.values():
                self._fs(url).mkdirs(_split(url)[0])
                lock = RunLock(self.spark, _lock_url(url), self.run, self.stale_after_s)
                lock.acquire(f"output {url}")
                self._locks.append(lock)
                recover(self.spark, url, keep=self.run)
                problem = replace_problem(kind, self._fs(url).names(url), self._manifest(url))
                if problem:
                    raise UsageError(f"output {url} {problem}; choose another output or remove it yourself")
        except BaseException:
            self._release()
            raise
        return self

    def _fs(self, url: str) -> FileSystem:
        return FileSystem(self.spark, url)

    def _manifest(self, url: str) -> dict | None:
        try:
            return read_json(self.spark, f"{url}/_manifest.json")
        except Exception:  # noqa: BLE001 - absent or unreadable: not a dataset of ours
            return None

    def tmp(self, key: str) -> str:
        return _hidden(self.outputs[key][0], "tmp", self.run)

    def scratch(self, key: str) -> str:
        return _hidden(self.outputs[key][0], "scratch", self.run)

    def commit(self) -> None:
        """Put every output in place: the records (the commit point once all exist), then the swaps."""
        urls = [url for url, _ in self.outputs.values()]
        records = [_hidden(url, "commit", self.run) + ".json" for url in urls]
        record = {"run": self.run, "records": records,
                  "moves": [{"out": url, "tmp": _hidden(url, "tmp", self.run), "old": _hidden(url, "old", self.run)}
                            for url in urls]}
        step("written")
        for record_url in records:
            write_text(self.spark, record_url, json.dumps(record, indent=2) + "\n")
        step("committed")
        for number, move in enumerate(record["moves"], start=1):
            fs = self._fs(move["out"])
            if fs.exists(move["out"]):
                fs.rename(move["out"], move["old"])
            fs.rename(move["tmp"], move["out"])
            step(f"swapped {number} of {len(urls)}")
        for move in record["moves"]:
            self._fs(move["old"]).delete(move["old"])
        for record_url in records:
            self._fs(record_url).delete(record_url)
        self.committed = True
        step("done")
        for url in urls:
            log.info("wrote %s", url)

    def __exit__(self, kind, error, trace) -> None:
        try:
            if kind is not None and not self.committed:
                for key, (url, _) in self.outputs.items():
                    log.warning("output %s not replaced: the run failed; removing its partial output", url)
                    self._fs(url).delete(self.tmp(key))
            for key in self.outputs:
                self._fs(self.scratch(key)).delete(self.scratch(key))
        finally:
            self._release()

    def _release(self) -> None:
        for lock in reversed(self._locks):
            lock.release()
        self._locks = []


@contextmanager
def atomic_output(spark: SparkSession, out: str, kind: str) -> Iterator[str]:
    """Yield a hidden URL to write the whole output ``out`` into; when the block ends normally it replaces
    ``out`` (:class:`OutputRun` with one output: locked, only a ``kind`` output replaced, never half-done).

    On an exception the partial output is deleted and ``out`` is untouched.
    """
    with OutputRun(spark, {"out": (out, kind)}) as run:
        yield run.tmp("out")
        run.commit()
