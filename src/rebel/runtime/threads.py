"""How many torch threads a run of the virtual NPU computes with.

The emulated device's kernels are torch ops on this host's CPU, most of them small (an LLM
decode step is ~2000 ATen calls on tensors of a few KiB). With torch's default (one thread per
core) every op that crosses torch's parallel grain, above all each matmul, waits at an OpenMP
barrier for all its threads; when another process holds one of the cores (a shared CI box, a
laptop doing anything else) that wait is a scheduler time slice, and a run becomes several times
slower. Measured on a 2-core box with another job running: a SmolLM2 decode step took 0.2-0.5 s
with 2 threads and 60-90 ms with 1; idle, 1 and 2 threads gave the same decode step (an M=1
matmul does not scale on this CPU), and 2 threads only helped the 64-row prefill (~30%).

So a run uses the usable cores minus one (the core left to the caller's own Python: the
generate loop, a tokenizer, a serving front-end), at least 1 -- the policy of vLLM's CPU
worker, which vllm_rbln applies to its workers too. `RBLN_NUM_THREADS` chooses the count; an
`OMP_NUM_THREADS` the user set is left alone (torch already honours it). Results do not depend
on the count: the device computes each kernel the same way at any count (tests compare).

The count is set for the run only and restored afterwards, per calling thread (OpenMP keeps the
count per thread; a run nested in another, as a pipeline's stages are, leaves it to the
outermost), so code outside the runtime keeps the caller's torch settings.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

THREADS_ENV = "RBLN_NUM_THREADS"

_local = threading.local()  # per thread: depth of nested runs, the count to restore


@functools.lru_cache(maxsize=1)
def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def run_threads() -> int | None:
    """The thread count runs use, or None to leave torch's setting alone (OMP_NUM_THREADS)."""
    chosen = os.environ.get(THREADS_ENV)
    if chosen:
        try:
            return max(1, int(chosen))
        except ValueError:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {chosen!r}") from None
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, usable_cores() - 1)


@contextlib.contextmanager
def run_threads_set(threads: int | None = None):
    """Compute with `threads` (default: `run_threads()`) torch threads inside the block."""
    if getattr(_local, "depth", 0):  # nested: the outermost run chose
        _local.depth += 1
        try:
            yield
        finally:
            _local.depth -= 1
        return
    threads = run_threads() if threads is None else threads
    saved = torch.get_num_threads()
    if threads is not None and threads != saved:
        torch.set_num_threads(threads)
    _local.depth = 1
    try:
        yield
    finally:
        _local.depth = 0
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)
