"""Measuring a command's whole process tree on Linux: CPU seconds (rusage, with a child subreaper, plus
what PySpark's daemon reaps unaccounted) and peak resident memory per kind of process (psutil samples).
How and why: docs/scale.md."""
from __future__ import annotations

import ctypes
import os
import resource
import signal
import threading
import time
from pathlib import Path

import psutil

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
MB = 2**20
LAUNCHER = "org.apache.spark.launcher.Main"  # spark-submit's short-lived JVM that builds the driver's command


class TreeSampler(threading.Thread):
    """Every ``interval`` seconds, each descendant of this process: its CPU time (user + system, the
    last value seen is kept per process) and its resident memory, summed per kind: ``driver`` the java
    processes, ``workers`` the Python processes other than the command's own (``driver_pid``).

    ``unreaped`` keeps, for each process whose parent ignores SIGCHLD (PySpark's daemon, for its
    workers), its last CPU time with that of the children it waited for: the kernel discards such a
    process's usage when it exits under that parent, so it never reaches ``RUSAGE_CHILDREN``."""

    def __init__(self, driver_pid: int, interval: float):
        super().__init__(daemon=True)
        self.driver_pid, self.interval = driver_pid, interval
        self.cpu: dict[tuple[int, float], float] = {}
        self.unreaped: dict[tuple[int, float], float] = {}
        self.kind: dict[tuple[int, float, str], tuple[str, bool]] = {}
        self.peak_mb = {"driver": 0.0, "workers": 0.0, "python_driver": 0.0}
        self.load: list[float] = []  # the machine's 1-minute load average at each sample
        self.heap_flags: set[str] = set()
        self.done = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            while not self.done.is_set():
                self.sample()
                self.done.wait(self.interval)
        except Exception as error:  # noqa: BLE001 - reported beside the figures it leaves incomplete
            self.error = repr(error)

    def _kind(self, process: psutil.Process) -> tuple[str, bool]:
        command = process.cmdline()
        if process.name() == "java" and LAUNCHER not in command:
            self.heap_flags.update(arg for arg in command if arg.startswith("-Xmx"))
            kind = "driver"
        elif process.pid == self.driver_pid:
            kind = "python_driver"
        elif command and "python" in os.path.basename(command[0]):
            kind = "workers"
        else:
            kind = "other"
        return kind, _ignores_sigchld(process.ppid())

    def sample(self) -> None:
        self.load.append(os.getloadavg()[0])
        rss = dict.fromkeys(self.peak_mb, 0)
        for process in psutil.Process().children(recursive=True):
            try:
                with process.oneshot():
                    key = (process.pid, process.create_time())
                    # by name too: spark-submit's bash becomes the JVM by exec, with the same pid
                    kind, unreaped = self.kind.get((*key, process.name())) or self.kind.setdefault(
                        (*key, process.name()), self._kind(process))
                    times, memory = process.cpu_times(), process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            self.cpu[key] = times.user + times.system
            if unreaped:
                self.unreaped[key] = sum(times[:4])  # user, system, children_user, children_system
            if kind in rss:
                rss[kind] += memory
        for kind, value in rss.items():
            self.peak_mb[kind] = max(self.peak_mb[kind], value / MB)


def _ignores_sigchld(pid: int) -> bool:
    """Whether process ``pid`` ignores SIGCHLD (its children are then reaped without their usage)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    ignored = next((line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), "0")
    return bool(int(ignored, 16) >> (signal.SIGCHLD - 1) & 1)


def become_subreaper() -> bool:
    """Make orphaned descendants (a JVM outliving its driver) children of this process, so that their
    CPU time reaches ``RUSAGE_CHILDREN`` when they are reaped. False where prctl is missing (not Linux)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_descendants(timeout: float = 120.0) -> tuple[set[int], list[int]]:
    """Wait for every remaining child (orphans included): the pids reaped here, and those still running
    after ``timeout``."""
    deadline, reaped = time.monotonic() + timeout, set()
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped, []
        if pid:
            reaped.add(pid)
        elif time.monotonic() > deadline:
            return reaped, [child.pid for child in psutil.Process().children()]
        else:
            time.sleep(0.1)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
