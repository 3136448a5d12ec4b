"""The event engine: place one run's work on the device's queues and time it.

Queues: the Host (launches, waits, fallback ops), External HDMA (host <-> device DRAM over PCIe),
Task DMA (device DRAM <-> SRAM) and the Neural Engine Clusters. Each queue does one thing at a
time; work starts when its queue is free and its inputs are ready. Weights sit in DRAM from the
start, so their loads may run ahead of the kernel that needs them (predictive DMA) as long as
they fit in the shared SRAM left over.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..npu.spec import LinkSpec, ProductSpec
from .events import HDMA, HOST, LINK, NEURAL_ENGINE, TASK_DMA, Event
from .timing import KernelPlan, KernelTime, collective_seconds, hdma_seconds, task_dma_seconds


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
                 resident_inputs: bool = False, group: tuple[int, ...] = (), link: LinkSpec | None = None):
        """prefetch: predictive DMA of weights (off measures its gain). resident_inputs: the
        inputs are already in device DRAM (no External HDMA in), as when a kernel's operands
        were produced on the device; used to time kernels alone. group, link: the dies of a
        tensor-parallel run (they do the same work in lockstep) and the link their collectives
        use."""
        self.spec = spec
        self.device = device
        self.prefetch = prefetch
        self.resident_inputs = resident_inputs
        self.group = tuple(group) or (device,)
        self.link = link or spec.links.die_to_die

    def run(self, steps, start_s: float = 0.0, first_flow: int = 1) -> Timeline:
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
        spec, dev = self.spec, self.device
        launch_flow, done_flow = flow, flow + 1
        launch = Event(HOST, None, f"launch {step.name}", t, spec.runtime.launch_s, "launch",
                       {"segment": step.name}, flow_out=(launch_flow,))
        events.append(launch)
        pending_flow = [launch_flow]  # attached to the first device slice

        def device_event(track, name, start, dur, category, args) -> Event:
            flow_in = tuple(pending_flow)
            pending_flow.clear()
            ev = Event(track, dev, name, start, dur, category, args, flow_in=flow_in)
            events.append(ev)
            return ev

        t0 = launch.end_s
        in_dram: dict[str, float] = {}
        hdma_free = t0
        for value, nbytes in step.copy_in:
            if self.resident_inputs:
                in_dram[value] = t0
                continue
            ev = device_event(HDMA, f"{value} host->device", hdma_free, hdma_seconds(nbytes, spec),
                              "dma_in", {"bytes": nbytes, "value": value})
            hdma_free = in_dram[value] = ev.end_s

        dma_free = ne_free = t0
        prefetch_budget = spec.die.memory.shared_sram_bytes // 2
        last_end = hdma_free
        for k in step.kernels:
            if k.plan.comm:
                start = max(ne_free, dma_free)
                ev = device_event(LINK, f"{k.name}", start,
                                  collective_seconds(k.plan.comm, k.plan.comm_bytes, len(self.group),
                                                     self.link),
                                  "collective", {"op": k.plan.comm, "bytes": k.plan.comm_bytes,
                                                 "dies": len(self.group), "link": self.link.name})
                ne_free = dma_free = ev.end_s
                last_end = max(last_end, ev.end_s)
                continue
            weights = [x for x in k.plan.dma_in if x.weight]
            acts = [x for x in k.plan.dma_in if not x.weight]
            w_bytes = sum(x.nbytes for x in weights)
            prefetched = bool(weights) and self.prefetch and w_bytes <= prefetch_budget
            # Prefetched weights load as soon as the queue is free; otherwise they stream in
            # behind the activations while the kernel runs.
            order = [("weights", weights)] if prefetched else []
            order += [("load", acts)] + ([] if prefetched else [("weights", weights)])
            loads_start = loads_end = None  # of the last load, which gates the first tile
            for label, group in order:
                if not group:
                    continue
                nbytes = sum(x.nbytes for x in group)
                start = max([dma_free] + [in_dram.get(x.value, t0) for x in group if not x.weight])
                if label == "weights" and not prefetched:
                    start = max(start, ne_free)  # no SRAM to spare before the previous kernel ends
                args = {"bytes": nbytes, "values": [x.value for x in group]}
                if label == "weights":
                    args["prefetch"] = prefetched
                ev = device_event(TASK_DMA, f"{label} {k.name}", start,
                                  task_dma_seconds(nbytes, spec, k.kind), "dma_in", args)
                dma_free, loads_start, loads_end = ev.end_s, ev.start_s, ev.end_s
            tiles = max(1, k.plan.tiles)
            # Kernels run in order, so what they read from SRAM is ready; the launch (command
            # issue) overlaps the first tile's load.
            tiles = max(1, k.plan.tiles)
            start = ne_free + k.time.launch_s
            first_tile = None
            if loads_end is not None:
                first_tile = loads_end if tiles == 1 else min(loads_end, loads_start + k.time.first_in_s)
                start = max(start, first_tile)
            end = start + k.time.compute_s
            if loads_end is not None and tiles > 1:
                end = max(end, loads_end + k.time.compute_s / tiles)
            # The slice shows the engine busy from its launch, but not before its first operands
            # are on chip (the launch itself overlaps their load).
            start = max(ne_free, start - k.time.launch_s, first_tile or ne_free)
            ne = device_event(NEURAL_ENGINE, k.name, start, end - start, "kernel",
                              {"ops": list(k.ops), "kind": k.kind, "flops": k.plan.flops,
                               "tiles": tiles})
            ne_free = ne.end_s
            if k.plan.dma_out:
                o_bytes = k.plan.bytes_out
                overlap = (ne.dur_s * (tiles - 1) / tiles) if tiles > 1 else 0.0
                start = max(dma_free, ne.end_s - overlap)
                ev = device_event(TASK_DMA, f"store {k.name}", start,
                                  task_dma_seconds(o_bytes, spec, k.kind), "dma_out",
                                  {"bytes": o_bytes, "values": [x.value for x in k.plan.dma_out]})
                dma_free = ev.end_s
                for x in k.plan.dma_out:
                    in_dram[x.value] = ev.end_s
            last_end = max(last_end, dma_free, ne_free)

        hdma_free = max(hdma_free, last_end)
        for value, nbytes in step.copy_out:
            start = max(hdma_free, in_dram.get(value, last_end))
            ev = device_event(HDMA, f"{value} device->host", start, hdma_seconds(nbytes, spec, to_device=False),
                              "dma_out", {"bytes": nbytes, "value": value})
            hdma_free = ev.end_s
        device_end = max(last_end, hdma_free)
        if events[-1].device is not None:  # let the host's wait point back at the last device slice
            last = events.pop()
            events.append(Event(last.track, last.device, last.name, last.start_s, last.dur_s,
                                last.category, last.args, flow_out=(done_flow,), flow_in=last.flow_in))
        wait = Event(HOST, None, f"wait {step.name}", launch.end_s,
                     device_end - launch.end_s + spec.runtime.sync_s, "sync", {"segment": step.name},
                     flow_in=(done_flow,))
        events.append(wait)
        return wait.end_s, flow + 2

