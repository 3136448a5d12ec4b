"""The virtual machine the host sees: which product, how many cards, hence which devices.

Like the real driver, every die is one device: one RBLN-CA25 card shows 4 devices. The machine is
chosen by environment, read when first asked: RBLN_VIRTUAL_NPU (product name or spec file path,
default RBLN-CA25) and RBLN_VIRTUAL_CARDS (default 1).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from ..errors import DeviceError, SpecError
from .spec import ProductSpec, load_spec

DEFAULT_PRODUCT = "RBLN-CA25"
MAX_CARDS = 8  # one server: eight PCIe slots


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    card: int
    die: int
    spec: ProductSpec

    @property
    def name(self) -> str:
        return self.spec.name

    def __str__(self) -> str:
        return f"rbln:{self.index} ({self.spec.name} card {self.card}, die {self.die})"


@dataclass(frozen=True)
class MachineConfig:
    spec: ProductSpec
    cards: int

    @property
    def devices(self) -> tuple[DeviceInfo, ...]:
        return tuple(DeviceInfo(c * self.spec.dies + d, c, d, self.spec)
                     for c in range(self.cards) for d in range(self.spec.dies))

    def device(self, index: int) -> DeviceInfo:
        if isinstance(index, bool) or not isinstance(index, int):
            raise DeviceError(f"device index must be an int, got {index!r}")
        if not 0 <= index < len(self.devices):
            raise DeviceError(f"device {index} does not exist: the virtual machine has "
                              f"{len(self.devices)} device(s) (0..{len(self.devices) - 1}, "
                              f"{self.cards} x {self.spec.name})")
        return self.devices[index]

    def same_card(self, a: int, b: int) -> bool:
        return self.device(a).card == self.device(b).card


def machine_from_env(env: dict | None = None) -> MachineConfig:
    env = os.environ if env is None else env
    spec = load_spec(env.get("RBLN_VIRTUAL_NPU") or DEFAULT_PRODUCT)
    raw = env.get("RBLN_VIRTUAL_CARDS", "1")
    try:
        cards = int(raw)
    except ValueError:
        raise SpecError(f"RBLN_VIRTUAL_CARDS must be an integer, got {raw!r}") from None
    if not 1 <= cards <= MAX_CARDS:
        raise SpecError(f"RBLN_VIRTUAL_CARDS must be between 1 and {MAX_CARDS}, got {cards}")
    return MachineConfig(spec, cards)


@lru_cache(maxsize=1)
def _cached() -> MachineConfig:
    return machine_from_env()


def current_machine() -> MachineConfig:
    """The process-wide virtual machine (read once from the environment)."""
    return _cached()


def reset_machine() -> None:
    """Forget the cached machine so the environment is read again (tests, notebooks)."""
    _cached.cache_clear()


def device_count() -> int:
    return len(current_machine().devices)


def npu_is_available(index: int = 0) -> bool:
    return isinstance(index, int) and 0 <= index < device_count()


def get_npu_name(index: int = 0) -> str:
    return current_machine().device(index).name
