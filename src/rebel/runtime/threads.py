"""How many torch threads a run of the virtual NPU computes with.

The emulated device's kernels are torch ops on this host's CPU, most of them small (an LLM
decode step is ~2000 ATen calls on tensors of a few KiB). With torch's default (one thread per
core) every op that crosses torch's parallel grain, above all each matmul, waits at an OpenMP
barrier for all its threads; when another process holds one of the cores (a shared CI box, a
laptop doing anything else) that wait is a scheduler time slice, and a run becomes several times
slower. Measured on a 2-core box with another job running: a SmolLM2 decode step took 0.2-0.5 s
with 2 threads and 60-90 ms with 1; idle, 1 and 2 threads gave the same decode step (an M=1
matmul does not scale on this CPU), and 2 threads only helped the 64-row prefill (~30%).

But on an idle machine every core helps: measured on the same box, idle, SmolLM2 decode at
batch 1 ran at 14.8 tokens/s with 1 thread and 23.0 with 2 (Hugging Face eager: 15.8 and 25.4).
So a run uses the usable cores that no other process keeps busy (at least 1): the cores' busy
time since the last look (/proc/stat) less this process's own CPU time, looked at again at most
once a second (a first look counts the runnable threads of /proc/loadavg less this process's).
Without /proc it leaves one core to the caller (the policy of vLLM's CPU worker, which
vllm_rbln's workers keep: their engine and front-end run beside them). `RBLN_NUM_THREADS` chooses the count; an `OMP_NUM_THREADS` the user set is left
alone (torch already honours it). Results do not depend on the count: products of more than one
row, which MKL may split differently at other counts, and convolutions, which oneDNN blocks by
the count, run at a count fixed for the machine (device/gemm_threads.py); tests compare.

The count is set for the run only and restored afterwards, per calling thread (OpenMP keeps the
count per thread; a run nested in another, as a pipeline's stages are, leaves it to the
outermost), so code outside the runtime keeps the caller's torch settings.
"""
from __future__ import annotations

import os
import threading
import time

import torch

from ..device.gemm_threads import THREADS_ENV, chosen_threads, usable_cores  # noqa: F401  (this module's API too)

RECHECK_S = 1.0  # how long a look at the other processes' load holds
_free = (float("-inf"), 1)  # (when looked, free cores then)

_local = threading.local()  # per thread: depth of nested runs, the count to restore


def run_threads() -> int | None:
    """The thread count runs use, or None to leave torch's setting alone (OMP_NUM_THREADS)."""
    chosen = chosen_threads()
    if chosen is None and os.environ.get("OMP_NUM_THREADS"):
        return None
    return chosen or free_cores()


def free_cores() -> int:
    """Usable cores no other process is running on (re-read at most every RECHECK_S)."""
    global _free
    now = time.monotonic()
    if now - _free[0] >= RECHECK_S:
        cores = usable_cores()
        busy = busy_elsewhere()
        _free = (now, max(1, cores - 1 if busy is None else cores - busy))
    return _free[1]


def busy_elsewhere() -> int | None:
    """Cores other processes keep busy, or None where unknown (no /proc). Measured over the
    time since the last look when that lies within MIN_SPAN_S..MAX_SPAN_S (runs one after
    another look about once a second): /proc/stat's busy time of all cores less this process's
    own CPU time, so a job that holds a core counts and a blip does not. An older look says
    nothing about now (a child process that ran meanwhile, a reload, would count), so a first
    look, or one after a pause, takes a snapshot instead (`runnable_elsewhere`). That is racy: this
    process's own OpenMP workers fall asleep between a benchmark's runs, and /proc/loadavg and
    their states are read apart, so measured here 6 snapshots in 528 saw a busy core that was
    not, and each held one thread for the next second of runs (a 1.3-1.5x slower row)."""
    global _times
    now = time.monotonic()
    try:
        with open("/proc/stat") as f:
            cpu = [int(v) for v in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()
        own = int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return runnable_elsewhere()
    busy = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait (steal counts: the host took it)
    last, _times = _times, (now, busy, own)
    if last is None or not MIN_SPAN_S <= now - last[0] <= MAX_SPAN_S:
        return runnable_elsewhere()
    others = (busy - last[1] - (own - last[2])) / (_TICKS * (now - last[0]))
    return max(0, int(others + 0.5))


MIN_SPAN_S, MAX_SPAN_S = 0.2, 2.5
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_times = None  # (when, all cores' busy ticks, this process's ticks) at the last look


def runnable_elsewhere() -> int | None:
    """Threads of other processes running or runnable right now, or None where unknown (no
    /proc): the 4th field of /proc/loadavg counts every runnable thread, this process's own
    running ones (this thread, OpenMP workers still spinning) are taken off."""
    try:
        with open("/proc/loadavg") as f:
            runnable = int(f.read().split()[3].split("/")[0])
        own = 0
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/stat") as f:
                    stat = f.read()
            except OSError:  # the thread ended meanwhile
                continue
            own += stat[stat.rindex(")") + 2] == "R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, runnable - own)


class run_threads_set:
    """Compute with `threads` (default: `run_threads()`) torch threads inside the block. A class,
    not a generator context manager: every run enters one, and a generator's frames cost a
    small model's run several microseconds."""

    __slots__ = ("threads", "saved", "outer")

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def __enter__(self):
        depth = getattr(_local, "depth", 0)
        self.outer = not depth
        if depth:  # nested: the outermost run chose
            _local.depth = depth + 1
            return self
        threads = run_threads() if self.threads is None else self.threads
        self.saved = torch.get_num_threads()
        if threads is not None and threads != self.saved:
            torch.set_num_threads(threads)
        _local.depth = 1
        return self

    def __exit__(self, *exc):
        if not self.outer:
            _local.depth -= 1
            return
        _local.depth = 0
        if torch.get_num_threads() != self.saved:
            torch.set_num_threads(self.saved)
