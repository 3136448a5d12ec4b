"""The event engine: place one run's work on the device's queues and time it.

Queues: the Host (launches, waits, fallback ops), External HDMA (host <-> device DRAM over PCIe),
Task DMA (device DRAM <-> SRAM) and the Neural Engine Clusters. Each queue does one thing at a
time; work starts when its queue is free and its inputs are ready. Weights sit in DRAM from the
start, so their loads may run ahead of the kernel that needs them (predictive DMA) as long as
they fit in the shared SRAM left over.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..npu.spec import LinkSpec, ProductSpec
from .events import HDMA, HOST, LINK, NEURAL_ENGINE, TASK_DMA, Event
from .timing import (KernelPlan, KernelTime, collective_seconds, hdma_seconds, host_memory,
                     row_kernel_seconds, task_dma_seconds)


@dataclass(frozen=True)
class KernelStep:
    name: str
    kind: str
    ops: tuple[str, ...]
    plan: KernelPlan
    time: KernelTime


@dataclass(frozen=True)
class DeviceStep:
    name: str
    copy_in: tuple[tuple[str, int], ...]
    kernels: tuple[KernelStep, ...]
    copy_out: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class HostOpStep:
    name: str
    seconds: float
    args: dict


@dataclass(frozen=True)
class HostStep:
    name: str
    ops: tuple[HostOpStep, ...]


@dataclass
class Timeline:
    events: list[Event]
    start_s: float
    end_s: float

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s


class EventEngine:
    def __init__(self, spec: ProductSpec, device: int, prefetch: bool = True,
                 resident_inputs: bool = False, group: tuple[int, ...] = (), link: LinkSpec | None = None,
                 replayed: bool = False):
        """prefetch: predictive DMA of weights (off measures its gain). resident_inputs: the
        inputs are already in device DRAM (no External HDMA in), as when a kernel's operands
        were produced on the device; used to time kernels alone. group, link: the dies of a
        tensor-parallel run (they do the same work in lockstep) and the link their collectives
        use. replayed: the run repeats back to back on the same inputs (a CUDA-graph replay loop),
        so inputs that fit the shared SRAM's replay-resident share are read from there by the
        kernels that model their caches (block-per-row kernels)."""
        self.spec = spec
        self.replayed = replayed
        self.device = device
        self.prefetch = prefetch
        self.resident_inputs = resident_inputs
        self.group = tuple(group) or (device,)
        self.link = link or spec.links.die_to_die

    def run(self, steps, start_s: float = 0.0, first_flow: int = 1,
            pinned: frozenset[str] = frozenset(), inputs_ready_s: dict[str, float] | None = None,
            compute_ready_s: float | None = None) -> Timeline:
        """Time `steps`. pinned: the inputs whose host copies are in page-locked memory (the
        user passed a pinned tensor), so their External HDMA takes the pinned path; every other
        host copy is from pageable memory. Outputs are written to fresh pageable host tensors
        (Runtime.run has no `out=` argument), so device->host copies are always pageable.

        inputs_ready_s, compute_ready_s: for a run issued ahead of the data it needs (the
        orchestrator's predictive DMA across pipeline stages): the time each named input exists
        on the host (its copy in waits for it), and the time before which no kernel or
        collective may start (the previous stage's results are needed by then). Until then the
        Task DMA preloads the first kernels' weights only as far as half the shared SRAM holds
        them; later loads wait for the gate as the kernels do."""
        self._pinned = frozenset(pinned)
        self._ready = dict(inputs_ready_s or {})
        self._gate = compute_ready_s
        self._preloaded = 0  # weight bytes loaded ahead of the compute gate
        self._cursor = 0.0  # when the Task DMA queue's preloads before the gate end
        self._preloading = True
        events: list[Event] = []
        t = start_s
        flow = first_flow
        for step in steps:
            if isinstance(step, HostStep):
                for op in step.ops:
                    events.append(Event(HOST, None, op.name, t, op.seconds, "fallback", op.args))
                    t += op.seconds
            else:
                t, flow = self._device_step(step, t, flow, events)
        # Every die of a tensor-parallel group runs the same kernels at the same times.
        events += [replace(e, device=d, flow_in=(), flow_out=())
                   for d in self.group if d != self.device for e in list(events)
                   if e.device == self.device]
        return Timeline(events, start_s, t)

    def _device_step(self, step: DeviceStep, t: float, flow: int, events: list[Event]):
        spec = self.spec
        launch = Event(HOST, None, f"launch {step.name}", t, spec.runtime.launch_s, "launch",
                       {"segment": step.name}, flow_out=(flow,))
        events.append(launch)
        q = _Queues(self.device, launch.end_s, events, pending_flow=[flow])
        for value, nbytes in step.copy_in:
            if self.resident_inputs:
                q.in_dram[value] = q.t0
                continue
            pinned = value in self._pinned
            memory = host_memory(pinned)
            ev = q.emit(HDMA, f"{value} host->device ({memory})", max(q.hdma, self._ready.get(value, q.hdma)),
                        hdma_seconds(nbytes, spec, pinned=pinned), "dma_in",
                        {"bytes": nbytes, "value": value, "host_memory": memory})
            q.hdma = q.in_dram[value] = ev.end_s
        q.last = q.hdma
        for k in step.kernels:
            if k.plan.comm:
                self._collective(k, q)
            else:
                self._kernel(k, q)
            q.last = max(q.last, q.dma, q.ne)
        q.hdma = max(q.hdma, q.last)
        for value, nbytes in step.copy_out:
            pinned = False  # results land in new, pageable host tensors
            memory = host_memory(pinned)
            ev = q.emit(HDMA, f"{value} device->host ({memory})",
                        max(q.hdma, q.in_dram.get(value, q.last)),
                        hdma_seconds(nbytes, spec, to_device=False, pinned=pinned), "dma_out",
                        {"bytes": nbytes, "value": value, "host_memory": memory})
            q.hdma = ev.end_s
        done = flow + 1
        if events[-1].device is not None:  # the host's wait points back at the last device slice
            events[-1] = replace(events[-1], flow_out=(done,))
        device_end = max(q.last, q.hdma)
        wait = Event(HOST, None, f"wait {step.name}", launch.end_s,
                     device_end - launch.end_s + spec.runtime.sync_s, "sync", {"segment": step.name},
                     flow_in=(done,))
        events.append(wait)
        return wait.end_s, flow + 2

    def _collective(self, k: KernelStep, q: _Queues) -> None:
        """All dies stop and exchange over the link; nothing else runs meanwhile."""
        seconds = collective_seconds(k.plan.comm, k.plan.comm_bytes, len(self.group), self.link)
        ev = q.emit(LINK, k.name, max(q.ne, q.dma, self._gate or 0.0), seconds, "collective",
                    {"op": k.plan.comm, "bytes": k.plan.comm_bytes, "dies": len(self.group),
                     "link": self.link.name})
        q.ne = q.dma = ev.end_s

    def _kernel(self, k: KernelStep, q: _Queues) -> None:
        spec = self.spec
        if k.plan.rows is not None and spec.die.compute.row_kernels:
            self._row_kernel(k, q)
            return
        weights = [x for x in k.plan.dma_in if x.weight]
        acts = [x for x in k.plan.dma_in if not x.weight]
        w_bytes = sum(x.nbytes for x in weights)
        # Stream order (a GPU): the kernel starts once the previous one has completed (its
        # results written) and issues its own loads; nothing runs ahead across kernels. Its
        # launch cost overlaps its first loads, as for any kernel here.
        stream = spec.die.dma.loads_in_stream_order
        prefetched = bool(weights) and self.prefetch and w_bytes <= spec.die.memory.shared_sram_bytes // 2
        floor = q.t0  # no load before this (the compute gate, for all but preloaded weights)
        ahead = False  # this kernel's weights preload before the gate
        if self._gate is not None:  # issued ahead of the data it needs (see `run`)
            q.ne = max(q.ne, self._gate)
            floor = self._gate
            dur = task_dma_seconds(w_bytes, spec, k.kind) if weights else 0.0
            cursor = max(self._cursor, q.t0)
            # Preloads fill the queue's time before the gate, in kernel order, as far as half
            # the shared SRAM holds them; everything else loads after it.
            if weights and self._preloading and prefetched and not stream and \
                    cursor + dur <= self._gate and \
                    self._preloaded + w_bytes <= spec.die.memory.shared_sram_bytes // 2:
                self._preloaded += w_bytes
                ahead = True
            elif weights:
                self._preloading = False  # in kernel order: the first that does not fit ends it
        issued = max(q.ne, q.dma)
        # Prefetched weights load as soon as the queue is free; otherwise they stream in behind
        # the activations while the kernel runs.
        order = [("weights", weights)] if prefetched else []
        order += [("load", acts)] + ([] if prefetched else [("weights", weights)])
        last_load = None  # the last load gates the kernel's first tile
        for label, group in order:
            if not group:
                continue
            nbytes = sum(x.nbytes for x in group)
            start = max([q.dma] + [q.in_dram.get(x.value, q.t0) for x in group if not x.weight])
            if ahead and label == "weights":
                start = max(self._cursor, q.t0)
            else:
                start = max(start, floor)
            if label == "weights" and not prefetched:
                start = max(start, q.ne)  # no SRAM to spare before the previous kernel ends
            if stream:
                start = max(start, issued)
            args = {"bytes": nbytes, "values": [x.value for x in group]}
            if label == "weights":
                args["prefetch"] = prefetched and not stream
            last_load = q.emit(TASK_DMA, f"{label} {k.name}", start,
                               task_dma_seconds(nbytes, spec, k.kind), "dma_in", args)
            if ahead and label == "weights":
                args["preload"] = "ahead of the previous stage's end"
                self._cursor = last_load.end_s
                q.dma = max(q.dma, last_load.end_s)
            else:
                q.dma = last_load.end_s

        # Kernels run in order, so what they read from SRAM is ready; the launch (command issue)
        # overlaps the first tile's load.
        tiles = max(1, k.plan.tiles)
        start = (issued if stream else q.ne) + k.time.launch_s
        first_tile = issued if stream else q.ne
        if last_load is not None:
            first_tile = last_load.end_s if tiles == 1 else min(last_load.end_s,
                                                                 last_load.start_s + k.time.first_in_s)
            start = max(start, first_tile)
        end = start + k.time.compute_s
        if last_load is not None and tiles > 1:
            end = max(end, last_load.end_s + k.time.compute_s / tiles)
        # The slice shows the engine busy from its launch, but not before its first operands are
        # on chip.
        start = max(issued if stream else q.ne, start - k.time.launch_s, first_tile)
        ne = q.emit(NEURAL_ENGINE, k.name, start, end - start, "kernel",
                    {"ops": list(k.ops), "kind": k.kind, "flops": k.plan.flops, "tiles": tiles})
        q.ne = ne.end_s
        if k.plan.dma_out:
            # results stream out tile by tile: all but the last tile's leave while it computes
            overlap = ne.dur_s * (tiles - 1) / tiles
            ev = q.emit(TASK_DMA, f"store {k.name}", max(q.dma, ne.end_s - overlap),
                        task_dma_seconds(k.plan.bytes_out, spec, k.kind), "dma_out",
                        {"bytes": k.plan.bytes_out, "values": [x.value for x in k.plan.dma_out]})
            q.dma = ev.end_s
            for x in k.plan.dma_out:
                q.in_dram[x.value] = ev.end_s


    def _row_kernel(self, k: KernelStep, q: _Queues) -> None:
        """A block-per-row kernel (GPU row reductions) issues its own loads and stores as it
        runs: one engine slice from its start, after the previous kernel and its inputs, to
        launch + its row time, with its memory traffic shown on Task DMA inside it."""
        spec = self.spec
        ready = [q.in_dram.get(x.value, q.t0) for x in k.plan.dma_in if not x.weight]
        start = max([q.ne, q.dma, self._gate or q.t0] + ready)
        seconds = row_kernel_seconds(k.plan.rows, spec, self.replayed)
        row = k.plan.rows
        ne = q.emit(NEURAL_ENGINE, k.name, start, k.time.launch_s + seconds, "kernel",
                    {"ops": list(k.ops), "kind": k.kind, "flops": k.plan.flops, "tiles": k.plan.tiles,
                     "row_kernel": row.family, "rows": row.rows, "cols": row.cols,
                     "passes": row.passes})
        q.emit(TASK_DMA, f"stream {k.name}", start + k.time.launch_s, seconds, "dma_in",
               {"bytes": k.plan.bytes_in + k.plan.bytes_out,
                "values": [x.value for x in (*k.plan.dma_in, *k.plan.dma_out)],
                "in_kernel": True})
        q.ne = q.dma = ne.end_s
        for x in k.plan.dma_out:
            q.in_dram[x.value] = ne.end_s


@dataclass
class _Queues:
    """When each of one device's queues is next free, and when values land in device DRAM."""

    device: int
    t0: float
    events: list[Event]
    pending_flow: list[int]  # the host launch's arrow, attached to the first device slice
    hdma: float = 0.0
    dma: float = 0.0
    ne: float = 0.0
    last: float = 0.0
    in_dram: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.hdma = self.dma = self.ne = self.last = self.t0

    def emit(self, track: str, name: str, start: float, dur: float, category: str, args: dict) -> Event:
        ev = Event(track, self.device, name, start, dur, category, args,
                   flow_in=tuple(self.pending_flow))
        self.pending_flow.clear()
        self.events.append(ev)
        return ev
