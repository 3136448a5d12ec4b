"""A trace that grows run by run, written to disk without costing more than the runs.

Each run's events are shifted onto one clock (run after run) with their flow ids kept unique.
Rewriting the whole protobuf after every run would cost O(runs^2) for an LLM's hundreds of decode
steps, so the file is rewritten at most every `interval_s`, and whenever someone asks for it
(`flush`): reading `Runtime.trace_path`, closing the runtime, or interpreter exit.
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from ..device.events import Event
from .perfetto_trace import write_trace


class TraceFile:
    def __init__(self, path: Path, device_names: dict[int, str], interval_s: float = 2.0):
        self.path = Path(path)
        self.device_names = device_names
        self.interval_s = interval_s
        self.events: list[Event] = []
        self.clock = 0.0
        self._flows = 0
        self._dirty = False
        self._written_at: float | None = None

    def add(self, events: list[Event], span_s: float) -> None:
        """Append one run's events (times from 0) and advance the clock by its span."""
        base = self._flows
        for e in events:
            self.events.append(replace(e, start_s=e.start_s + self.clock,
                                       flow_out=tuple(f + base for f in e.flow_out),
                                       flow_in=tuple(f + base for f in e.flow_in)))
        self._flows = base + max((f for e in events for f in (*e.flow_out, *e.flow_in)), default=0)
        self.clock += span_s
        self._dirty = True
        if self._written_at is None or time.monotonic() - self._written_at > self.interval_s:
            self.flush()

    def flush(self) -> None:
        if not self._dirty:
            return
        first = self._written_at is None
        write_trace(self.path, self.events, self.device_names)
        self._dirty, self._written_at = False, time.monotonic()
        if first:
            print(f"rebel: profiler trace written to {self.path} (open it at https://ui.perfetto.dev)",
                  file=sys.stderr)
