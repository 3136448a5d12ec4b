"""What torch_rbln did since the last reset: the figures behind `torch.rbln.explain()`.

One process-wide record, shared by the eager device and the torch.compile backend, so that
explain() answers "what fell back, what recompiled, how many host<->device copies, how much
predicted device time" for any mix of eager ops and compiled graphs.
"""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Record:
    device_ops: Counter = field(default_factory=Counter)        # eager op -> calls on the device
    fallbacks: Counter = field(default_factory=Counter)         # eager op -> calls on the host
    fallback_reasons: dict = field(default_factory=dict)        # eager op -> why it fell back
    kernel_compiles: Counter = field(default_factory=Counter)   # eager op -> kernels compiled
    device_time_s: float = 0.0                                  # predicted, eager + compiled
    copies_to_device: int = 0
    copies_to_host: int = 0
    bytes_to_device: int = 0
    bytes_to_host: int = 0
    graph_compiles: list = field(default_factory=list)          # (graph, reason) per compile
    graph_cache_hits: int = 0                                   # compiled graphs loaded from disk
    graph_runs: int = 0
    graph_fallback_runs: int = 0                                # graphs run in Python (over limit)


_lock = threading.Lock()
record = Record()


def reset() -> None:
    """Forget everything counted so far (explain() then covers only what runs next)."""
    global record
    with _lock:
        record = Record()


def current() -> Record:
    return record


def add_copy(to_device: bool, nbytes: int) -> None:
    r = record
    if to_device:
        r.copies_to_device += 1
        r.bytes_to_device += nbytes
    else:
        r.copies_to_host += 1
        r.bytes_to_host += nbytes
