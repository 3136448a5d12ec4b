"""Device DRAM accounting, per virtual device, shared by every runtime in the process.

Nothing is stored here: tensors live in host memory. What is tracked is how much of each device's
DRAM they would occupy, so that a model that does not fit fails the way it would on the chip.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..errors import DeviceMemoryError
from ..npu import current_machine


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass
class DeviceMemory:
    index: int
    capacity: int  # usable bytes (after the firmware reservation)
    used: int = 0
    peak: int = 0
    allocations: dict[int, tuple[str, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _next: int = 0

    def allocate(self, nbytes: int, what: str) -> int:
        with self._lock:
            if self.used + nbytes > self.capacity:
                raise DeviceMemoryError(
                    f"{what} needs {_gib(nbytes)} of device DRAM but rbln:{self.index} has "
                    f"{_gib(self.capacity - self.used)} free ({_gib(self.used)} of "
                    f"{_gib(self.capacity)} usable in use). Use a larger device, tensor "
                    f"parallelism, or free other runtimes.")
            self._next += 1
            self.allocations[self._next] = (what, nbytes)
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            return self._next

    def free(self, handle: int) -> None:
        with self._lock:
            what_bytes = self.allocations.pop(handle, None)
            if what_bytes is not None:
                self.used -= what_bytes[1]

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used


_memories: dict[int, DeviceMemory] = {}
_lock = threading.Lock()


def device_memory(index: int) -> DeviceMemory:
    """The DRAM of virtual device `index` (validated against the current machine)."""
    info = current_machine().device(index)
    with _lock:
        if index not in _memories:
            _memories[index] = DeviceMemory(index, info.spec.die.memory.dram_usable_bytes)
        return _memories[index]


def reset_memory() -> None:
    """Forget all accounting (tests; after the machine changes)."""
    with _lock:
        _memories.clear()
