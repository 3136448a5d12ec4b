"""Matrix products whose results do not depend on how many threads the host gives a run.

The runtime computes with the cores no other process is using right now (runtime/threads.py),
so the thread count of a run follows the machine's load. MKL splits the K dimension of some
products across threads, and the partial sums then add up in another order: measured with
torch 2.13's MKL, [64, 1536] x [1536, 576] and [4, 576] x [576, 576] differ in their last bits
at 1 and 2 threads (a 1-row product did not, in every SmolLM2 shape tried), which was enough for
SmolLM2 to generate other tokens on a busy machine than on an idle one. A product of more than
eight rows therefore runs with a thread count fixed for the machine (`RBLN_NUM_THREADS` when the
device is imported, else the usable cores) through MKL's per-thread setting (`ops.linear_on_rows`),
whatever the run's count; products of one to eight rows (decode) run in rebel's native kernel
(`linear_rows`), whose results do not depend on the count, so they keep the run's. Without MKL
(another BLAS) the setting is left alone. Convolutions run at the same count
(`ops.convolution_at_fixed_threads`), through torch's setting, as oneDNN has no per-call one.
"""
from __future__ import annotations

import ctypes
import functools
import os

import torch

THREADS_ENV = "RBLN_NUM_THREADS"


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


@functools.lru_cache(maxsize=1)
def _mkl_local():
    """MKL's `MKL_Set_Num_Threads_Local` (its C interface) from torch's own library, or None."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        fn = ctypes.CDLL(path).MKL_Set_Num_Threads_Local
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_int,), ctypes.c_int
    return fn


def chosen_threads() -> int | None:
    """The count RBLN_NUM_THREADS chooses, or None when it is not set."""
    chosen = os.environ.get(THREADS_ENV)
    if not chosen:
        return None
    try:
        return max(1, int(chosen))
    except ValueError:
        raise ValueError(f"{THREADS_ENV} must be a positive integer, got {chosen!r}") from None


def fixed_threads() -> int | None:
    """The thread count every multi-row product uses (None: OMP_NUM_THREADS fixes it already)."""
    chosen = chosen_threads()
    if chosen is None and os.environ.get("OMP_NUM_THREADS"):
        return None
    return chosen or usable_cores()


COUNT = fixed_threads()  # what multi-row products use now (None: leave MKL's count alone)


def refresh() -> None:
    """Read the environment again (a serving engine drops the OMP_NUM_THREADS it started with)."""
    global COUNT
    COUNT = fixed_threads()
