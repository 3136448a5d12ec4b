"""What the virtual device did during a run, as timed slices on named tracks.

The event engine produces these; the profiler turns them into a Perfetto trace and the run
report sums them. Times are predicted seconds on the modelled hardware, not host wall time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Track kinds, in the order a trace shows them for one device.
HOST = "Host"
HDMA = "External HDMA"
TASK_DMA = "Task DMA"
NEURAL_ENGINE = "Neural Engine Clusters"
LINK = "Chip-to-chip Link"
DEVICE_TRACKS = (HDMA, TASK_DMA, NEURAL_ENGINE, LINK)


@dataclass(frozen=True)
class Event:
    """One slice on one track.

    `device` is None for the Host track (one host per machine). `flow_out` holds ids of flow
    arrows that start at this slice, `flow_in` ids of arrows that end here (Perfetto draws an
    arrow from the slice that lists an id in flow_out to the slice that lists it in flow_in).
    """

    track: str
    device: int | None
    name: str
    start_s: float
    dur_s: float
    category: str = ""  # e.g. "launch", "sync", "fallback", "kernel", "dma_in", "dma_out"
    args: dict = field(default_factory=dict)
    flow_out: tuple[int, ...] = ()
    flow_in: tuple[int, ...] = ()

    @property
    def end_s(self) -> float:
        return self.start_s + self.dur_s
