"""Multi-model pipelines across dies and cards: record each request's runs, overlap requests.

A pipeline (a text encoder, a denoiser run step after step, a decoder: the vendor's diffusers
pipelines, unmodified) runs its submodules' runtimes as it always does; each runtime sits on the
dies its `device=` placed it on. Inside `with orch.request("r1"):` every `Runtime.run` is recorded:
which stage ran (the runtime's name), on which dies, its predicted timeline (the run report's
events) and the host time since the previous run (the pipeline's own host work: scheduler steps,
guidance). `orch.schedule()` then lays the recorded runs of all requests on one virtual clock:

- within a request, runs keep their order (each one's inputs are the previous ones' outputs,
  through the host code between them);
- across requests only the dies (and the links their collectives take) are shared: a run starts
  when its request allows and every die it uses is free, so the next request's text encoding and
  the previous request's decode overlap the current denoising loop when they sit on other dies;
- predictive DMA across stage boundaries: a run whose dies are free is issued while the previous
  stage of its request still computes. Its inputs that already existed on the host (the same
  tensor passed to an earlier run, like prompt embeddings every denoising step) are copied in
  then, and its first kernels' weights preloaded into SRAM (as far as half the shared SRAM
  holds them); its inputs that the previous stage produced, and all its kernels, wait for that
  stage to finish (the event engine re-times the run with those ready times).

The schedule reports per-stage predicted times, sequential against orchestrated totals and each
die's utilisation, and writes one Perfetto trace with every stage on its dies.
"""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from ..device.engine import EventEngine
from ..device.events import HOST, LINK, NEURAL_ENGINE, Event
from ..errors import RBLNError
from ..npu import current_machine
from ..profiler.perfetto_trace import TraceEncoder
from . import runtime as _runtime
from .report import _union_s
from .runtime import RunRecord, Runtime
from .timeline import build_steps, die_group

STAGE_TRACK = "Pipeline stages"


@dataclass
class StageRun:
    """One recorded run: the stage, its dies, its predicted timeline and where its inputs came
    from. `early_inputs` are the program inputs that existed before the previous run of the
    request finished (predictive DMA may copy them in ahead); the others came from it."""

    stage: str
    devices: tuple[int, ...]
    latency_s: float
    host_gap_s: float           # host time between the previous run (or the request's start) and this one
    events: list[Event] = field(repr=False)
    early_inputs: frozenset = frozenset()
    record: RunRecord | None = field(default=None, repr=False)  # None for a predicted run
    timing: _Timing | None = field(default=None, repr=False)  # to re-time it issued ahead

    @property
    def compute_start_s(self) -> float:
        """When its first kernel or collective starts in its own timeline: what comes before
        (launch, copies in, weight loads) is what predictive DMA may issue ahead."""
        return min((e.start_s for e in self.events if e.track in (NEURAL_ENGINE, LINK)),
                   default=self.latency_s)


@dataclass(frozen=True)
class _Timing:
    """What re-timing a run takes: its program and the engine settings of its placement."""

    program: object
    spec: object
    device: int
    group: tuple[int, ...]
    link: object
    prefetch: bool
    fill: dict | None = None
    pinned: frozenset = frozenset()


class Request:
    """The runs of one request, in the order the pipeline made them."""

    def __init__(self, orchestrator: Orchestrator, name: str, host_gap_s: float | None):
        self.orchestrator = orchestrator
        self.name = name
        self.runs: list[StageRun] = []
        self.closed = False
        self._host_gap_s = host_gap_s
        self._last_s: float | None = None  # this machine's clock at the previous run's return
        self._seen: dict[int, tuple] = {}  # id(tensor) -> (weakref, version, run index, role)
        self._lock = threading.Lock()

    # --- recording ------------------------------------------------------------------------------

    def __enter__(self) -> Request:
        if self.closed:
            raise RBLNError(f"request {self.name!r} is closed; open a new one with orch.request()")
        previous = _runtime.set_recorder(self._record)
        if previous is not None:
            _runtime.set_recorder(previous)
            raise RBLNError(f"request {self.name!r} opened while another request is recording; "
                            f"close that one first (one request records at a time)")
        self._last_s = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop recording. A request is closed once: closing it again is a mistake worth hearing."""
        if self.closed:
            raise RBLNError(f"request {self.name!r} is already closed")
        self.closed = True
        if _runtime._recorder == self._record:
            _runtime.set_recorder(None)

    def _record(self, record: RunRecord) -> None:
        with self._lock:
            index = len(self.runs)
            gap = record.entered_s - self._last_s if self._host_gap_s is None else self._host_gap_s
            self._last_s = record.returned_s
            names = [n for n, _ in record.program.inputs]
            early = set()
            for name, value in zip(names, record.inputs):
                seen = self._seen.get(id(value)) if isinstance(value, torch.Tensor) else None
                if seen is not None and seen[0]() is value and seen[1] == value._version:
                    # an input of any earlier run, or an output of a run before the previous one
                    if seen[3] == "input" or seen[2] < index - 1:
                        early.add(name)
            for value in record.inputs:
                self._remember(value, index, "input")
            for value in pytree.tree_leaves(record.outputs):
                self._remember(value, index, "output")
            report, engine = record.report, record.runtime._engine
            timing = _Timing(record.program, engine.spec, engine.device, engine.group, engine.link,
                             engine.prefetch, record.fill, record.pinned)
            self.runs.append(StageRun(self.orchestrator.stage_name(record.runtime),
                                      tuple(record.runtime.devices), report.latency_s, max(gap, 0.0),
                                      report.events, frozenset(early), record, timing))

    def add_predicted(self, compiled, stage: str, device=0, repeat: int = 1,
                      host_gap_s: float = 0.0, early_inputs=(), bucket: int = 0) -> list[StageRun]:
        """Add runs without running them: `repeat` runs of `compiled` (an RBLNCompiledModel,
        meta-compiled ones included: full-size models predicted without weights) placed on
        `device` (as for `Runtime`: a first index or every tensor-parallel die), each after
        `host_gap_s` of host work. early_inputs: the inputs (names or positions) that exist
        before the previous run ends (prompt embeddings in a denoising loop), so predictive DMA
        may copy them in ahead (every repeat gets the same)."""
        if self.closed:
            raise RBLNError(f"request {self.name!r} is closed; open a new one with orch.request()")
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise RBLNError(f"repeat must be an int >= 1, got {repeat!r}")
        if isinstance(host_gap_s, bool) or not isinstance(host_gap_s, (int, float)) or host_gap_s < 0:
            raise RBLNError(f"host_gap_s must be seconds >= 0, got {host_gap_s!r}")
        inner = getattr(compiled, "compiled", compiled)
        if not hasattr(inner, "buckets") or not hasattr(inner, "spec"):
            raise RBLNError(f"add_predicted expects an RBLNCompiledModel, got {type(compiled).__name__}")
        program = inner.buckets[bucket]
        group, link = die_group(program, inner.spec, device)
        machine = current_machine()
        for d in group:
            info = machine.device(d)  # DeviceError names what exists
            if info.spec.name != program.npu:
                raise RBLNError(f"the model was compiled for {program.npu} but rbln:{d} is a "
                                f"{info.spec.name}")
        names = [n for n, _ in program.inputs]
        early = set()
        for item in early_inputs:
            if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(names):
                early.add(names[item])
            elif item in names:
                early.add(item)
            else:
                raise RBLNError(f"early_inputs: {item!r} is not an input of this model ({names})")
        timing = _Timing(program, inner.spec, group[0], group, link, True)
        timeline = EventEngine(inner.spec, group[0], True, group=group, link=link).run(
            build_steps(program, inner.spec))
        added = []
        with self._lock:
            for _ in range(repeat):
                run = StageRun(str(stage), group, timeline.latency_s, float(host_gap_s),
                               timeline.events, frozenset(early), None, timing)
                self.runs.append(run)
                added.append(run)
        return added

    def _remember(self, value, index: int, role: str) -> None:
        if isinstance(value, torch.Tensor) and id(value) not in self._seen:
            self._seen[id(value)] = (weakref.ref(value), value._version, index, role)

    def __repr__(self) -> str:
        stages = sorted({r.stage for r in self.runs})
        state = "closed" if self.closed else "recording"
        return (f"Request({self.name!r}, {len(self.runs)} runs of {stages}, predicted "
                f"{sum(r.latency_s for r in self.runs) * 1e3:.3f} ms device + "
                f"{sum(r.host_gap_s for r in self.runs) * 1e3:.3f} ms host, {state})")


class Orchestrator:
    """Records the runs of a multi-model pipeline per request and schedules several requests on
    the virtual NPU's dies together (see the module docstring for the rule).

        orch = rebel.runtime.Orchestrator()
        orch.label(pipe)                 # name stages after the pipeline's attributes (optional)
        for i, prompt in enumerate(prompts):
            with orch.request(f"r{i}"):
                pipe(prompt)             # runs as usual; every Runtime.run is recorded
        plan = orch.schedule()           # sequential vs orchestrated, per stage, per die
        plan.write_trace("pipeline.pb")  # every stage on its dies, per request

    host_gap_s: the host time between runs; None measures it on this machine (the pipeline's
    own host code), a number fixes it (reproducible predictions). predictive_dma: issue a stage's
    input copies and weight preloads while the previous stage still computes.
    """

    def __init__(self, host_gap_s: float | None = None, predictive_dma: bool = True):
        if host_gap_s is not None and (isinstance(host_gap_s, bool) or
                                       not isinstance(host_gap_s, (int, float)) or host_gap_s < 0):
            raise RBLNError(f"host_gap_s must be seconds >= 0 or None (measured), got {host_gap_s!r}")
        self.host_gap_s = host_gap_s
        self.predictive_dma = bool(predictive_dma)
        self.requests: list[Request] = []
        self._labels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._auto: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def request(self, name: str | None = None) -> Request:
        """A request to record: use it as `with orch.request("r1"): pipe(...)`."""
        name = f"r{len(self.requests) + 1}" if name is None else str(name)
        if any(r.name == name for r in self.requests):
            raise RBLNError(f"a request named {name!r} was recorded already; names must be unique")
        request = Request(self, name, self.host_gap_s)
        self.requests.append(request)
        return request

    def label(self, target, name: str | None = None) -> dict[str, Runtime]:
        """Name stages. A Runtime gets `name`; any other object (a pipeline) is searched for the
        runtimes it holds (attributes, lists, dicts, a few levels deep) and each is named after
        the attribute that leads to it ("text_encoder", "transformer", "vae/decoder"). Returns
        the names given."""
        if isinstance(target, Runtime):
            if not name:
                raise RBLNError("label(runtime, name): give the stage a name")
            self._labels[target] = str(name)
            return {str(name): target}
        found: dict[str, list[tuple[str, Runtime]]] = {}
        for path, runtime in _runtimes_in(target):
            top = (f"{name}." if name else "") + path[0]
            found.setdefault(top, [])
            if all(r is not runtime for _, r in found[top]):
                found[top].append((runtime.name or str(len(found[top])), runtime))
        if not found:
            raise RBLNError(f"no rebel Runtime found in {type(target).__name__}; label runtimes "
                            f"one by one with orch.label(runtime, name)")
        named = {}
        for top, runtimes in found.items():
            for leaf, runtime in runtimes:
                stage = top if len(runtimes) == 1 else f"{top}/{leaf}"
                self._labels[runtime] = stage
                named[stage] = runtime
        return named

    def stage_name(self, runtime: Runtime) -> str:
        """A runtime's stage: its label, else its name (the artifact's), else model<n>."""
        if runtime in self._labels:
            return self._labels[runtime]
        if runtime.name:
            return runtime.name
        if runtime not in self._auto:
            self._auto[runtime] = f"model{len(self._auto)}"
        return self._auto[runtime]

    def schedule(self, requests=None, predictive_dma: bool | None = None) -> Schedule:
        """The recorded requests (all, or those named) on one virtual timeline, next to the same
        runs made one request after the other."""
        chosen = self._chosen(requests)
        prefetch = self.predictive_dma if predictive_dma is None else bool(predictive_dma)
        sequential = _Scheduler(chosen, overlap=False, predictive=False).run()
        orchestrated = _Scheduler(chosen, overlap=True, predictive=prefetch).run()
        return Schedule(chosen, orchestrated, sequential, prefetch)

    def _chosen(self, requests) -> list[Request]:
        if requests is None:
            chosen = list(self.requests)
        else:
            by_name = {r.name: r for r in self.requests}
            names = [requests] if isinstance(requests, str) else list(requests)
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise RBLNError(f"unknown request(s) {unknown}; recorded: {list(by_name)}")
            chosen = [by_name[n] for n in names]
        open_ = [r.name for r in chosen if not r.closed]
        if open_:
            raise RBLNError(f"request(s) {open_} are still recording; close them before scheduling")
        if not any(r.runs for r in chosen):
            raise RBLNError("nothing to schedule: no Runtime ran inside any request "
                            "(run the pipeline inside `with orch.request(name):`)")
        return chosen

    def __repr__(self) -> str:
        runs = sum(len(r.runs) for r in self.requests)
        gap = "measured" if self.host_gap_s is None else f"{self.host_gap_s * 1e6:.1f} us"
        return (f"Orchestrator({len(self.requests)} requests, {runs} runs, host gaps {gap}, "
                f"predictive DMA {'on' if self.predictive_dma else 'off'})")


@dataclass
class ScheduledRun:
    """One run placed on the virtual timeline: [start_s, end_s) on its dies; its own kernels
    start at compute_s; preload_s of its copies and weight loads ran ahead of the previous stage's end."""

    request: str
    index: int
    stage: str
    devices: tuple[int, ...]
    start_s: float
    end_s: float
    compute_s: float
    ready_s: float              # when the previous stage's results (and host work) were ready
    events: list[Event] = field(repr=False)

    @property
    def preload_s(self) -> float:
        """How long it was issued before its request's data was ready (predictive DMA)."""
        return max(0.0, self.ready_s - self.start_s)


class _Scheduler:
    """List scheduling: repeatedly place the next run of whichever request can start earliest."""

    def __init__(self, requests: list[Request], overlap: bool, predictive: bool):
        self.requests = [r for r in requests if r.runs]
        self.overlap = overlap
        self.predictive = predictive
        self.free: dict[str, float] = {}  # resource -> when it is next free
        self._retimed: dict[tuple, list[Event]] = {}

    def run(self) -> list[ScheduledRun]:
        placed: list[ScheduledRun] = []
        state = {r.name: [0, None, None] for r in self.requests}  # next index, prev start, prev end
        clock = 0.0
        pending = list(self.requests)
        while pending:
            if not self.overlap:  # one request after another: each starts when the last ended
                candidates = [pending[0]]
            else:
                candidates = pending
            best = None
            for request in candidates:
                option = self._option(request, state[request.name], clock if not self.overlap else 0.0)
                if best is None or option[0] < best[0][0] - 1e-15:
                    best = (option, request)
            (start, ready, events, resources), request = best
            st = state[request.name]
            run = request.runs[st[0]]
            end = start + max((e.end_s for e in events), default=0.0)
            for res in resources:
                self.free[res] = end
            compute = min((e.start_s for e in events if e.track in (NEURAL_ENGINE, LINK)),
                          default=end - start)
            placed.append(ScheduledRun(request.name, st[0], run.stage, run.devices, start, end,
                                       start + compute, ready,
                                       [replace(e, start_s=e.start_s + start) for e in events]))
            st[0] += 1
            st[1], st[2] = start, end
            if st[0] == len(request.runs):
                pending.remove(request)
                clock = max(clock, end)
        return placed

    def _option(self, request: Request, st: list, arrival: float):
        """(start, ready, events, resources) of the request's next run."""
        index, prev_start, prev_end = st
        run = request.runs[index]
        resources = _resources(run)
        ready = (arrival if prev_end is None else prev_end) + run.host_gap_s
        free = max((self.free.get(r, 0.0) for r in resources), default=0.0)
        start = max(ready, free)
        events = run.events
        lead = run.compute_start_s
        if self.predictive and prev_end is not None and start > free and lead > 0 \
                and not _starts_on_host(run):
            # Issue it ahead, no earlier than the previous stage began and no earlier than its
            # preload needs: its compute and its inputs from that stage wait for `ready`.
            ahead = max(free, prev_start, ready - lead)
            if ahead < start:
                gate = ready - ahead
                events = self._retime(run, gate)
                start = ahead
        return start, ready, events, resources

    def _retime(self, run: StageRun, gate: float) -> list[Event]:
        key = (id(run), round(gate * 1e12))
        if key not in self._retimed:
            t = run.timing
            engine = EventEngine(t.spec, t.device, t.prefetch, group=t.group, link=t.link)
            late = {name: gate for name, _ in t.program.inputs if name not in run.early_inputs}
            timeline = engine.run(build_steps(t.program, t.spec, t.fill), pinned=t.pinned,
                                  inputs_ready_s=late, compute_ready_s=gate)
            self._retimed[key] = timeline.events
        return self._retimed[key]


def _starts_on_host(run: StageRun) -> bool:
    """A run whose program begins with host fallback ops cannot be issued ahead of its data."""
    segments = run.timing.program.segments if run.timing is not None else []
    return not segments or segments[0].kind != "device"


def _resources(run: StageRun) -> list[str]:
    """What a run holds: its dies, and the link its collectives take (the card's switch when
    its dies share a card, the card-to-card link otherwise)."""
    machine = current_machine()
    resources = [f"die {d}" for d in run.devices]
    if any(e.track == LINK for e in run.events):
        cards = sorted({machine.device(d).card for d in run.devices})
        resources.append(f"card {cards[0]} switch" if len(cards) == 1 else "card-to-card link")
    return resources


class Schedule:
    """The orchestrated timeline of some requests and the sequential one it is measured against."""

    def __init__(self, requests: list[Request], runs: list[ScheduledRun],
                 sequential: list[ScheduledRun], predictive_dma: bool):
        self.requests = requests
        self.runs = runs
        self.sequential_runs = sequential
        self.predictive_dma = predictive_dma

    @property
    def orchestrated_s(self) -> float:
        """Predicted time from the first request's start to the last one's end, overlapped."""
        return max(r.end_s for r in self.runs)

    @property
    def sequential_s(self) -> float:
        """The same requests one after the other: every run and host gap back to back."""
        return max(r.end_s for r in self.sequential_runs)

    @property
    def speedup(self) -> float:
        return self.sequential_s / self.orchestrated_s

    @property
    def dies(self) -> list[int]:
        return sorted({d for r in self.runs for d in r.devices})

    def stages(self) -> dict[str, dict]:
        """Per stage: runs, predicted time per run (its own timeline) and in all."""
        out: dict[str, dict] = {}
        for request in self.requests:
            for run in request.runs:
                s = out.setdefault(run.stage, {"runs": 0, "total_s": 0.0, "devices": run.devices})
                s["runs"] += 1
                s["total_s"] += run.latency_s
        for s in out.values():
            s["per_run_s"] = s["total_s"] / s["runs"]
        return out

    def utilisation(self) -> dict[int, float]:
        """Per die: the share of the orchestrated span in which any of its queues is busy."""
        span = self.orchestrated_s
        return {d: _union_s([e for r in self.runs for e in r.events if e.device == d]) / span
                for d in self.dies}

    def check(self) -> None:
        """Raise if the schedule breaks its rule: a die running two runs at once, or a request's
        runs out of order. (The scheduler cannot produce either; this makes it checkable.)"""
        for d in self.dies:
            spans = sorted((r.start_s, r.end_s, r.request, r.index) for r in self.runs if d in r.devices)
            for a, b in zip(spans, spans[1:]):
                if b[0] < a[1] - 1e-12:
                    raise RBLNError(f"die {d} runs {a[2]}#{a[3]} and {b[2]}#{b[3]} at once")
        for request in self.requests:
            mine = sorted((r for r in self.runs if r.request == request.name), key=lambda r: r.index)
            for a, b in zip(mine, mine[1:]):
                if b.compute_s < a.end_s - 1e-12:
                    raise RBLNError(f"{request.name}: {b.stage} computes before {a.stage} has finished")

    def events(self) -> list[Event]:
        """Every run's events on the shared clock: device work on its dies, each request's host
        work on a Host track of its own, and a 'Pipeline stages' slice per run on each die."""
        out: list[Event] = []
        flows = 0
        for run in self.runs:
            label = f"{run.request}/{run.stage}"
            for e in run.events:
                e = replace(e, flow_in=tuple(f + flows for f in e.flow_in),
                            flow_out=tuple(f + flows for f in e.flow_out))
                if e.device is None:
                    e = replace(e, track=f"{HOST} · {run.request}")
                out.append(e)
            flows += max((f for e in run.events for f in (*e.flow_in, *e.flow_out)), default=0)
            args = {"request": run.request, "stage": run.stage, "run": run.index,
                    "dies": list(run.devices), "preload_us": run.preload_s * 1e6}
            for d in run.devices:
                out.append(Event(STAGE_TRACK, d, label, run.start_s, run.end_s - run.start_s,
                                 "stage", args))
                if run.preload_s > 0:
                    out.append(Event(STAGE_TRACK, d, f"{label} predictive DMA", run.start_s,
                                     min(run.preload_s, run.end_s - run.start_s), "preload", args))
        previous: dict[str, float] = {}
        for run in sorted(self.runs, key=lambda r: (r.request, r.index)):
            gap = run.ready_s - previous.get(run.request, run.ready_s)
            if gap > 0:
                out.append(Event(f"{HOST} · {run.request}", None, "host work", previous[run.request],
                                 gap, "host", {"request": run.request}))
            previous[run.request] = run.end_s
        return out

    def write_trace(self, path) -> Path:
        """One Perfetto trace (open at ui.perfetto.dev) of the orchestrated timeline."""
        machine = current_machine()
        names = {}
        for d in self.dies:
            info = machine.device(d)
            names[d] = f"NPU {d} · {info.spec.name} (card {info.card}, die {info.die})"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(TraceEncoder(names, title="open-rbln pipeline").encode(self.events()))
        return path

    def report(self) -> str:
        """A text table: stages, totals, utilisation per die."""
        lines = [f"{'stage':<24}{'dies':<14}{'runs':>6}{'per run ms':>12}{'total ms':>12}"]
        for stage, s in self.stages().items():
            dies = ",".join(str(d) for d in s["devices"])
            lines.append(f"{stage:<24}{dies:<14}{s['runs']:>6}{s['per_run_s'] * 1e3:>12.4f}"
                         f"{s['total_s'] * 1e3:>12.4f}")
        lines.append(f"sequential {self.sequential_s * 1e3:.4f} ms, orchestrated "
                     f"{self.orchestrated_s * 1e3:.4f} ms ({self.speedup:.2f}x, predictive DMA "
                     f"{'on' if self.predictive_dma else 'off'}, "
                     f"{sum(r.preload_s for r in self.runs) * 1e3:.4f} ms issued ahead)")
        lines.append("die utilisation: " + ", ".join(f"rbln:{d} {u:.0%}" for d, u in self.utilisation().items()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Schedule({len(self.requests)} requests, {len(self.runs)} runs on dies {self.dies}: "
                f"sequential {self.sequential_s * 1e3:.4f} ms, orchestrated "
                f"{self.orchestrated_s * 1e3:.4f} ms, {self.speedup:.2f}x)")


def _runtimes_in(obj, depth: int = 5):
    """(attribute path, runtime) for every Runtime reachable from `obj`'s attributes."""
    seen: set[int] = set()
    stack = [((), obj, 0)]
    while stack:
        path, value, level = stack.pop()
        if id(value) in seen or level > depth:
            continue
        seen.add(id(value))
        if isinstance(value, Runtime):
            if path:
                yield path, value
            continue
        if isinstance(value, (str, bytes, int, float, bool, torch.Tensor)) or value is None:
            continue
        if isinstance(value, dict):
            items = [(str(k), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            items = [(str(i), v) for i, v in enumerate(value)]
        else:
            items = [(k, v) for k, v in getattr(value, "__dict__", {}).items()
                     if not k.startswith("__")]
            if isinstance(value, torch.nn.Module):  # its children, not its parameters
                items = [(k, v) for k, v in items if k not in ("_parameters", "_buffers")]
        for key, child in reversed(items):
            # private containers (a module's _modules) add no name of their own
            stack.append((path if key.startswith("_") else (*path, key), child, level + 1))
