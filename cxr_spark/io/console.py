"""What the ``cxr-spark`` command shows on the console, and the full log it keeps on disk.

A run writes everything (our logging, third-party warnings, the Spark JVM's log4j output, Spark's Python
workers' and Horovod's processes' stdout/stderr, TensorFlow's C++ notices) to ``<log dir>/<stage>-<UTC>.log``.
The console gets our progress and results, and any warning or error except the ones in :data:`NOISE`,
each listed with the reason a user cannot act on it.

Three places filter, each where its noise starts:

* Python logging in this process (:class:`ConsoleFilter`): ``cxr_spark`` records at INFO, others at WARNING,
  :data:`NOISE` never; what the console does not show goes to the log file through a ``FileHandler``.
  ``logging.captureWarnings`` turns this process's warnings into such records.
* The JVM: ``conf/spark/log4j2.properties`` (passed by :mod:`cxr_spark.io.session`) logs INFO to the log
  file and WARN to the console, less the loggers it names.
* Child processes (Spark's Python workers, Horovod's ranks, TensorFlow's C++ logging) write to this process's
  file descriptors 1 and 2, which :func:`run_log` points at pipes read by a small tee process
  (``python -m cxr_spark.io.console``): every line to the log file, :func:`console_line` decides the console.
  A separate process, not a thread, so a long C call holding the GIL never blocks the JVM's writes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

#: Lines (of any process) the console never shows; each goes to the log file only. (pattern, reason)
NOISE: list[tuple[re.Pattern, str]] = [(re.compile(pattern), reason) for pattern, reason in [
    (r"petastorm/.*: FutureWarning: ",
     "petastorm 0.13.1 calls pyarrow APIs deprecated since pyarrow 2-5; only a petastorm upgrade removes them"),
    (r"petastorm/unischema\.py:\d+: UserWarning: schema_fields behavior has changed",
     "petastorm's notice that field patterns now match whole names; ours are whole names"),
    (r"^Cache cleanup complete\.$", "petastorm prints it each time a reader closes (every epoch on every rank)"),
    (r"\] oneDNN custom operations are on", "TensorFlow's build notice, printed by every process importing it"),
    (r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized", "TensorFlow's build notice (CPU flags)"),
    (r"^To enable the following instructions: ", "second line of TensorFlow's CPU-flags notice"),
    (r'^Setting default log level to "WARN"\.$|^To adjust logging level use sc\.setLogLevel',
     "Spark's shell notice; the JVM's levels are set in conf/spark/log4j2.properties"),
]]
#: Horovod's forwarding prefix on a rank's output: ``[1]<stdout>:`` (or ``[1,0]<stdout>:`` under MPI).
RANK_PREFIX = re.compile(r"^\[(\d+)(?:,\d+)?\]<(stdout|stderr)>:")
#: Written by :func:`run_log` to both pipes at exit; the tee acknowledges once it has seen it on both.
SENTINEL = "\x00cxr-spark console flush\x00"
LOG_FILE_ENV = "CXR_SPARK_LOG_FILE"  # the run's log file, for session.py's log4j settings
_tee_process: subprocess.Popen | None = None  # kept: it outlives run_log until the JVM closes its pipes


def noise_reason(text: str) -> str | None:
    """Why ``text`` (one line, or a log message) is kept off the console, or None when it is shown."""
    return next((reason for pattern, reason in NOISE if pattern.search(text)), None)


def console_line(line: str, after_noise: bool) -> tuple[bool, bool]:
    """Whether a child process's output ``line`` goes to the console, and whether it was a hidden warning.

    Rank 0's stdout is shown (its per-epoch lines), other ranks' stdout is not (the same lines again);
    any rank's stderr is shown unless it is noise. The indented line after a hidden warning (the source
    line ``warnings.warn`` prints) is hidden with it.
    """
    body = line.rstrip("\n")
    prefix = RANK_PREFIX.match(body)
    if prefix:
        body = body[prefix.end():]
        if prefix.group(2) == "stdout" and prefix.group(1) != "0":
            return False, False
    if after_noise and body.startswith((" ", "\t")):
        return False, True
    noise = noise_reason(body) is not None
    return not noise, noise and "Warning: " in body


def shown_text(line: str) -> str:
    """What the console shows of a line it shows: rank 0's stdout as rank 0 printed it, without Horovod's
    ``[0]<stdout>:`` prefix; every other line as it is.

    >>> shown_text("[0]<stdout>:epoch 1/20: loss 0.1391")
    'epoch 1/20: loss 0.1391'
    >>> shown_text("[1]<stderr>:Traceback (most recent call last):")
    '[1]<stderr>:Traceback (most recent call last):'
    """
    prefix = RANK_PREFIX.match(line)
    return line[prefix.end():] if prefix and prefix.group(2) == "stdout" else line


def log_path(log_dir: str | Path, stage: str, now: datetime | None = None) -> Path:
    """``<log_dir>/<stage>-<UTC timestamp>.log``: one file per run, sortable by time."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    return Path(log_dir) / f"{stage}-{stamp}.log"


def default_log_dir(args) -> Path:
    """``--log-dir`` when given; the demo's ``<run-dir>/logs``; else ``logs/`` beside ``--out``; else ./logs."""
    if getattr(args, "log_dir", None):
        return Path(args.log_dir)
    if getattr(args, "run_dir", None):
        return Path(args.run_dir) / "logs"
    out = getattr(args, "out", None)
    if out and "://" not in out:
        return Path(out).resolve().parent / "logs"
    return Path("logs")


# ---------------------------------------------------------------------------------------------
# Python logging


class ConsoleFilter(logging.Filter):
    """The console's share of log records: ours from ``level``, others' from WARNING, never :data:`NOISE`."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "cxr_spark" or record.name.startswith("cxr_spark.")
        if record.levelno < (self.level if ours else logging.WARNING):
            return False
        return noise_reason(record.getMessage()) is None


class FileOnlyFilter(logging.Filter):
    """The complement of a :class:`ConsoleFilter`: what the console shows reaches the file through the tee."""

    def __init__(self, console: ConsoleFilter):
        super().__init__()
        self.console = console

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.console.filter(record)


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS message`` for our INFO lines; level and logger name only where they tell something."""

    def format(self, record: logging.LogRecord) -> str:
        ours = record.name.startswith("cxr_spark") and record.levelno == logging.INFO
        self._style._fmt = "%(asctime)s %(message)s" if ours else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        return super().format(record)


def setup_logging(verbose: bool, log_file: Path | None) -> None:
    """Console handler on stderr (filtered), and a DEBUG/INFO file handler for everything it leaves out."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    level = logging.DEBUG if verbose else logging.INFO
    root.setLevel(level)
    logging.getLogger("cxr_spark").setLevel(logging.DEBUG)  # our DEBUG lines: always in the file
    for chatty in ("py4j", "matplotlib", "PIL"):  # DEBUG records per call: too many even for the file
        logging.getLogger(chatty).setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console_filter = ConsoleFilter(level)
    console.addFilter(console_filter)
    console.setFormatter(ConsoleFormatter(datefmt="%H:%M:%S"))
    root.addHandler(console)
    if log_file is not None:
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.addFilter(FileOnlyFilter(console_filter))
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(to_file)
    logging.captureWarnings(True)


# ---------------------------------------------------------------------------------------------
# the tee: fds 1 and 2 of this process and its children -> log file + filtered console


@contextlib.contextmanager
def run_log(log_file: Path | None, verbose: bool = False):
    """Route this process's (and its future children's) stdout/stderr through the tee for the block.

    ``log_file`` None: plain logging to the console, nothing on disk (and no tee).
    """
    if log_file is None:
        setup_logging(verbose, None)
        yield None
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.touch()
    sys.stdout.flush(), sys.stderr.flush()
    (out_r, out_w), (err_r, err_w), (ack_r, ack_w) = os.pipe(), os.pipe(), os.pipe()
    global _tee_process
    _tee_process = subprocess.Popen([sys.executable, "-m", "cxr_spark.io.console", str(log_file), str(out_r), str(err_r),
                            str(ack_w)], pass_fds=(out_r, err_r, ack_w), stdin=subprocess.DEVNULL)
    for fd in (out_r, err_r, ack_w):
        os.close(fd)
    saved = os.dup(1), os.dup(2)
    os.dup2(out_w, 1), os.dup2(err_w, 2)
    os.close(out_w), os.close(err_w)
    os.environ[LOG_FILE_ENV] = str(log_file)
    setup_logging(verbose, log_file)
    print(f"log: {log_file}", file=sys.stderr, flush=True)
    try:
        yield log_file
    except BaseException:
        logging.getLogger("cxr_spark").debug("the run ended with an exception", exc_info=True)
        raise
    finally:
        for stream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
            stream.flush()
            os.write(fd, f"{SENTINEL}\n".encode())
        selectors_ready = selectors.DefaultSelector()
        selectors_ready.register(ack_r, selectors.EVENT_READ)
        selectors_ready.select(timeout=10)  # the tee has shown everything we wrote (or is stuck: go on)
        os.close(ack_r)
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.close(saved[0]), os.close(saved[1])
        # the tee ends when the JVM (which holds copies of the pipes) exits with this process


def tee(log_file: str, out_fd: int, err_fd: int, ack_fd: int) -> None:
    """The tee process: lines of ``out_fd``/``err_fd`` to ``log_file``, and per :func:`console_line` to
    this process's stdout/stderr (the real console); ``ack_fd`` gets a byte once both sent :data:`SENTINEL`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the run, not its output
    consoles = {out_fd: sys.stdout.buffer, err_fd: sys.stderr.buffer}
    pending, after_noise, flushed = {out_fd: b"", err_fd: b""}, {out_fd: False, err_fd: False}, set()
    selector = selectors.DefaultSelector()
    for fd in consoles:
        selector.register(fd, selectors.EVENT_READ)
    with open(log_file, "ab", buffering=0) as sink:
        while selector.get_map():
            for key, _ in selector.select():
                fd = key.fd
                data = os.read(fd, 65536)
                if not data:
                    selector.unregister(fd)
                    lines = [pending[fd]] if pending[fd] else []
                else:
                    *lines, pending[fd] = (pending[fd] + data).split(b"\n")
                    lines = [line + b"\n" for line in lines]
                for raw in lines:
                    text = raw.decode("utf-8", "replace")
                    if text.rstrip("\n") == SENTINEL:
                        flushed.add(fd)
                        if flushed == set(consoles) and ack_fd >= 0:
                            os.write(ack_fd, b"k"), os.close(ack_fd)
                            ack_fd = -1
                        continue
                    sink.write(raw)
                    show, after_noise[fd] = console_line(text, after_noise[fd])
                    if show:
                        with contextlib.suppress(OSError):
                            consoles[fd].write(shown_text(text).encode()), consoles[fd].flush()


# ---------------------------------------------------------------------------------------------
# progress


def eta_text(seconds: float) -> str:
    """A rough remaining time: ``40 s``, ``3 min``, ``1.5 h``."""
    if seconds < 90:
        return f"{max(0, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def progress_line(what: str, done: int, total: int, elapsed: float, unit: str = "") -> str:
    """``what: done/total unit (pct%, rate/s, ETA ...)`` from the elapsed time so far, assuming a steady rate."""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = eta_text((total - done) / rate) if rate > 0 else "?"
    unit = f" {unit}" if unit else ""
    return f"{what}: {done}/{total}{unit} ({100 * done // max(total, 1)}%, {rate:.1f}/s, ETA {eta})"


class SparkProgress:
    """A daemon thread that logs the active Spark stage's finished/total tasks with an ETA, every ``every``
    seconds while it advances (replacing Spark's console bar, which a log file cannot hold). A stage
    whose tasks do not finish (Horovod's training job: its own per-epoch lines say how far it is) says nothing.
    """

    def __init__(self, spark, every: float = 10.0):
        self.tracker, self.every = spark.sparkContext.statusTracker(), every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="cxr-spark-progress", daemon=True)

    def _run(self) -> None:
        seen: dict[int, tuple[float, int]] = {}  # stage id -> (first seen, tasks done at last line)
        while not self.stop.wait(self.every):
            try:
                for stage_id in self.tracker.getActiveStageIds():
                    info = self.tracker.getStageInfo(stage_id)
                    if info is None:
                        continue
                    first, last = seen.setdefault(stage_id, (time.monotonic(), info.numCompletedTasks))
                    if info.numCompletedTasks > last and info.numTasks > 1:
                        seen[stage_id] = (first, info.numCompletedTasks)
                        log.info("  %s", progress_line(f"Spark stage {stage_id} ({info.name.split(' at ')[0]})",
                                                      info.numCompletedTasks, info.numTasks,
                                                      time.monotonic() - first, "tasks"))
            except Exception:  # the context stopping under us: progress is best effort
                log.debug("Spark progress poll failed", exc_info=True)


_progress: SparkProgress | None = None


def spark_started(spark) -> None:
    """Once per process with a run log: print the Spark UI's address and start :class:`SparkProgress`."""
    global _progress
    if LOG_FILE_ENV not in os.environ or _progress is not None:
        return
    url = spark.sparkContext.uiWebUrl
    if url:
        log.info("Spark UI: %s", url)
    _progress = SparkProgress(spark)
    _progress.thread.start()


if __name__ == "__main__":
    tee(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
