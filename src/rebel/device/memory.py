"""Device DRAM accounting, per virtual device, shared by every runtime in the process.

Nothing is stored here: tensors live in host memory. What is tracked is how much of each device's
DRAM they would occupy, so that a model that does not fit fails the way it would on the chip.
Runtimes are not the only tenants: the eager device (torch_rbln) keeps its own count and joins
through `add_tenant`, so each side sees the other's bytes.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..errors import DeviceMemoryError
from ..npu import current_machine


def _gib(n: int) -> str:
    """A byte count people can read at any size (a tiny test model's needs are not "0.0 MiB")."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} B"


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
            others = sum(t.used(self.index) for t in _tenants)
            if self.used + others + nbytes > self.capacity:
                eager = f", {_gib(others)} of it eager tensors" if others else ""
                raise DeviceMemoryError(
                    f"{what} needs {_gib(nbytes)} of device DRAM but rbln:{self.index} has "
                    f"{_gib(self.capacity - self.used - others)} free ({_gib(self.used + others)} of "
                    f"{_gib(self.capacity)} usable in use{eager}). Use a larger device, tensor "
                    f"parallelism, or free other runtimes.")
            self._next += 1
            self.allocations[self._next] = (what, nbytes)
            self.used += nbytes
            self.peak = max(self.peak, self.used)
        self._notify()
        return self._next

    def free(self, handle: int) -> None:
        with self._lock:
            what_bytes = self.allocations.pop(handle, None)
            if what_bytes is not None:
                self.used -= what_bytes[1]
        self._notify()

    def _notify(self) -> None:
        for tenant in _tenants:
            tenant.runtimes_changed(self.index, self.used)

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used - sum(t.used(self.index) for t in _tenants)


class Tenant:
    """Another user of device DRAM: reports its bytes and hears how much runtimes hold."""

    def used(self, index: int) -> int:
        return 0

    def runtimes_changed(self, index: int, runtime_bytes: int) -> None:
        """Called after a runtime allocates or frees on device `index`."""


_tenants: list[Tenant] = []


def add_tenant(tenant: Tenant) -> None:
    _tenants.append(tenant)


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
