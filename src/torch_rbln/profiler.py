"""One Perfetto trace for eager ops and compiled graphs, in the runtime's format.

A profiling session collects predicted events on one clock: each eager op is a launch on the Host
track with a flow arrow to its kernel on the device's Neural Engine track (host fallbacks sit on
the Host track, copies on External HDMA), and each compiled-graph run appends the runtime's own
events (launches, DMA, kernels, flows). The trace is written with rebel.profiler.write_trace, so
ui.perfetto.dev and rebel.profiler.read_trace read it like any runtime trace.

Start it with `with torch_rbln.profile("trace.pb"):` or for the whole process with RBLN_PROFILER=1
(written at exit under $RBLN_PROFILER_DIR, default rbln_traces/).
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from pathlib import Path

from rebel.device.events import HDMA, HOST, NEURAL_ENGINE, Event
from rebel.npu import current_machine
from rebel.profiler import write_trace


class Session:
    def __init__(self, path: Path | None):
        self.path = path
        self.events: list[Event] = []
        self.clock = 0.0
        self.flow = 1
        self.lock = threading.Lock()
        self.devices: set[int] = set()

    def _flows(self, n: int) -> int:
        first = self.flow
        self.flow += n
        return first

    def eager_op(self, name: str, device: int, launch_s: float, device_s: float, args: dict) -> None:
        with self.lock:
            f = self._flows(1)
            t = self.clock
            self.events.append(Event(HOST, None, f"launch {name}", t, launch_s, "launch", args,
                                     flow_out=(f,)))
            self.events.append(Event(NEURAL_ENGINE, device, name, t + launch_s, device_s, "kernel",
                                     args, flow_in=(f,)))
            self.devices.add(device)
            self.clock = t + launch_s + device_s

    def fallback(self, name: str, host_s: float, args: dict) -> None:
        with self.lock:
            self.events.append(Event(HOST, None, name, self.clock, host_s, "fallback", args))
            self.clock += host_s

    def copy(self, device: int, to_device: bool, nbytes: int, seconds: float,
             pinned: bool = False) -> None:
        with self.lock:
            memory = "pinned" if pinned else "pageable"
            name = f"host->device ({memory})" if to_device else f"device->host ({memory})"
            self.events.append(Event(HDMA, device, name, self.clock, seconds,
                                     "dma_in" if to_device else "dma_out",
                                     {"bytes": nbytes, "host_memory": memory}))
            self.devices.add(device)
            self.clock += seconds

    def graph_run(self, name: str, report) -> None:
        with self.lock:
            events = report.events
            if not events:
                return
            start = min(e.start_s for e in events)
            ids = sorted({f for e in events for f in (*e.flow_out, *e.flow_in)})
            base = self._flows(len(ids))
            remap = {old: base + i for i, old in enumerate(ids)}
            for e in events:
                args = dict(e.args, graph=name)
                self.events.append(Event(e.track, e.device, e.name, e.start_s - start + self.clock,
                                         e.dur_s, e.category, args,
                                         tuple(remap[f] for f in e.flow_out),
                                         tuple(remap[f] for f in e.flow_in)))
            self.devices.add(report.device)
            self.clock += max(e.end_s for e in events) - start

    def write(self, path: Path | None = None) -> Path:
        path = Path(path or self.path or _default_path())
        machine = current_machine()
        names = {}
        for d in sorted(self.devices):
            info = machine.device(d)
            names[d] = f"NPU {d} · {info.spec.name} (card {info.card}, die {info.die})"
        with self.lock:
            return write_trace(path, list(self.events), names) or path


_active: Session | None = None
_env_session: Session | None = None


def active() -> Session | None:
    return _active


def _default_path() -> Path:
    folder = Path(os.environ.get("RBLN_PROFILER_DIR", "rbln_traces"))
    return folder / f"torch_rbln_{os.getpid()}.pb"


class profile:
    """Context manager: collect eager ops and compiled-graph runs; write the trace on exit.

        with torch_rbln.profile("trace.pb") as prof:
            y = model(x.to("rbln"))
        prof.path  # the .pb file
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.session = Session(Path(path) if path else None)
        self.path: Path | None = None
        self._outer = None

    def __enter__(self):
        global _active
        self._outer, _active = _active, self.session
        return self

    def __exit__(self, *exc):
        global _active
        _active = self._outer
        self.path = Path(self.session.path or _default_path())
        self.session.write(self.path)
        return False


def record_graph_run(name: str, report) -> None:
    if _active is not None:
        _active.graph_run(name, report)


def start_from_env() -> None:
    """RBLN_PROFILER=1: profile the whole process, write the trace at exit."""
    global _active, _env_session
    if _env_session is not None or os.environ.get("RBLN_PROFILER", "0").lower() not in ("1", "true", "yes", "on"):
        return
    _env_session = Session(None)
    if _active is None:
        _active = _env_session

    def _flush():
        if _env_session.events:
            path = _env_session.write()
            print(f"torch_rbln: profiler trace written to {path} (open it at https://ui.perfetto.dev)",
                  file=sys.stderr)

    atexit.register(_flush)
