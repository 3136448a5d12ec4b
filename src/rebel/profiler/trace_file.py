"""A trace that grows run by run, appended to disk as each run finishes.

Each run's events are shifted onto one clock (run after run) with their flow ids kept unique,
encoded as one serialized Perfetto `Trace` chunk and appended to the file. `Trace.packet` is a
repeated field, so concatenated chunks parse as one trace: the file on disk is complete and
valid as soon as `add` returns, with no flush step. Track descriptors go out once, in the chunk
of the run that first uses a track, so each run appends only its own packets and the cost per
run (time, bytes, memory) stays flat over an LLM's hundreds of decode steps; no list of past
events is kept.
"""
from __future__ import annotations

import sys
from pathlib import Path

from ..device.events import Event
from .perfetto_trace import TraceEncoder


class TraceFile:
    def __init__(self, path: Path, device_names: dict[int, str]):
        self.path = Path(path)
        self.device_names = device_names
        self.clock = 0.0
        self.runs = 0
        self.bytes_written = 0
        self.last_append_bytes = 0
        self._flows = 0
        self._encoder = TraceEncoder(device_names)

    @property
    def tracks(self) -> int:
        """Lane tracks described so far: the profiler's only state that grows, bounded by the model."""
        return self._encoder.tracks

    @property
    def open_ends(self) -> int:
        """Slice ends kept to assign lanes across runs: bounded by nesting depth, not by runs."""
        return self._encoder.open_ends

    def add(self, events: list[Event], span_s: float) -> None:
        """Append one run's events (times from 0) to the file and advance the clock by its span."""
        chunk = self._encoder.encode(events, offset_s=self.clock, flow_base=self._flows)
        self._flows += max((f for e in events for f in (*e.flow_out, *e.flow_in)), default=0)
        self.clock += span_s
        first = self.runs == 0
        if first:  # a new trace replaces whatever an earlier process left at this path
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "wb" if first else "ab") as f:
            f.write(chunk)
        self.runs += 1
        self.bytes_written += len(chunk)
        self.last_append_bytes = len(chunk)
        if first:
            print(f"rebel: profiler trace written to {self.path} (open it at https://ui.perfetto.dev)",
                  file=sys.stderr)
