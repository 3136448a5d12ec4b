"""What one run did: predicted times on the modelled NPU, bytes moved, kernels, fallbacks."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..device.events import HDMA, HOST, NEURAL_ENGINE, TASK_DMA, Event


def _union_s(events: list[Event]) -> float:
    total, cursor = 0.0, float("-inf")
    for e in sorted(events, key=lambda e: e.start_s):
        if e.end_s > cursor:
            total += e.end_s - max(e.start_s, cursor)
            cursor = e.end_s
    return total


@dataclass(frozen=True)
class KernelRecord:
    name: str
    ops: tuple[str, ...]
    start_s: float
    dur_s: float


@dataclass
class RunReport:
    """Predicted figures are for the modelled hardware; wall_time_s is this emulation's cost."""

    npu: str
    device: int
    latency_s: float            # predicted, host launch to host wake-up
    device_time_s: float        # predicted time with any device queue busy
    host_time_s: float          # predicted host work: launches and fallback ops (not waiting)
    wall_time_s: float          # measured on this machine
    bytes_moved: dict[str, int]
    kernels: list[KernelRecord]
    host_fallbacks: list[tuple[str, float]]
    events: list[Event] = field(repr=False, default_factory=list)
    # External HDMA bytes by direction and host memory, e.g. {"host_to_device": {"pinned": n,
    # "pageable": m}}: pinned copies run at the link's DMA rate, pageable ones are staged.
    host_copies: dict[str, dict[str, int]] = field(default_factory=dict)

    @staticmethod
    def from_events(npu: str, device: int, events: list[Event], wall_time_s: float) -> RunReport:
        start = min((e.start_s for e in events), default=0.0)
        end = max((e.end_s for e in events), default=0.0)
        moved = {"hdma_host_to_device": 0, "hdma_device_to_host": 0, "task_dma_in": 0,
                 "task_dma_out": 0}
        for e in events:
            if e.track in (HDMA, TASK_DMA):
                prefix = "hdma_host_to_device" if e.track == HDMA else "task_dma_in"
                if e.category == "dma_out":
                    prefix = "hdma_device_to_host" if e.track == HDMA else "task_dma_out"
                moved[prefix] += int(e.args.get("bytes", 0))
        copies = {"host_to_device": {"pinned": 0, "pageable": 0},
                  "device_to_host": {"pinned": 0, "pageable": 0}}
        for e in events:
            if e.track == HDMA and "host_memory" in e.args:
                way = "device_to_host" if e.category == "dma_out" else "host_to_device"
                copies[way][e.args["host_memory"]] += int(e.args.get("bytes", 0))
        host = [e for e in events if e.track == HOST and e.category in ("launch", "fallback")]
        return RunReport(
            npu, device, end - start, _union_s([e for e in events if e.device is not None]),
            sum(e.dur_s for e in host), wall_time_s, moved,
            [KernelRecord(e.name, tuple(e.args.get("ops", ())), e.start_s - start, e.dur_s)
             for e in events if e.track == NEURAL_ENGINE and e.device == device],
            [(e.name, e.dur_s) for e in events if e.category == "fallback"], events, copies)

    def copy(self, **changes) -> RunReport:
        """This report with its own containers (events, the predicted timeline's, stay shared)
        and `changes` applied: a run's report, made from the memoised prediction each run, so a
        caller editing it leaves the prediction as it was. Cheaper than `dataclasses.replace`,
        which re-runs `__init__`."""
        new = object.__new__(RunReport)
        new.__dict__.update(self.__dict__, bytes_moved=dict(self.bytes_moved),
                            kernels=list(self.kernels), host_fallbacks=list(self.host_fallbacks),
                            host_copies={way: dict(paths) for way, paths in self.host_copies.items()},
                            **changes)
        return new

    def _copies(self) -> str:
        """', host copies in: 1.00 MiB pinned, ...' for the paths any copy took."""
        parts = []
        for way, label in (("host_to_device", "in"), ("device_to_host", "out")):
            paths = [f"{n / 2**20:.2f} MiB {memory}"
                     for memory, n in self.host_copies.get(way, {}).items() if n]
            if paths:
                parts.append(f"{label} {' + '.join(paths)}")
        return f" (host copies {', '.join(parts)})" if parts else ""

    def summary(self) -> str:
        from ..profiler import summarize
        return summarize(self.events)

    def __repr__(self) -> str:
        mib = sum(self.bytes_moved.values()) / 2**20
        return (f"RunReport({self.npu} rbln:{self.device}: predicted latency "
                f"{self.latency_s * 1e6:.1f} us (device {self.device_time_s * 1e6:.1f} us, host "
                f"{self.host_time_s * 1e6:.1f} us), {len(self.kernels)} kernels, "
                f"{len(self.host_fallbacks)} host fallbacks, {mib:.2f} MiB moved{self._copies()}; "
                f"emulated in {self.wall_time_s * 1e3:.2f} ms)")
