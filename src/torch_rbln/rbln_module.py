"""`torch.rbln`: device management and memory statistics of the eager "rbln" device.

Memory figures are this process's eager tensors in each virtual device's DRAM (the shim's
allocator counts every storage); mem_get_info also subtracts what compiled runtimes hold there
(rebel.device.memory), so the two share one DRAM budget the way they do on the chip.
"""
from __future__ import annotations

import contextlib

import torch

_shim = None


def _init(shim) -> None:
    global _shim
    _shim = shim


def _index(device=None) -> int:
    if device is None:
        return current_device()
    if isinstance(device, int):
        idx = device
    else:
        d = torch.device(device) if not isinstance(device, torch.device) else device
        if d.type != "rbln":
            raise ValueError(f"expected an rbln device, got {d}")
        idx = d.index if d.index is not None else current_device()
    if not 0 <= idx < device_count():
        from rebel.errors import DeviceError
        raise DeviceError(f"rbln:{idx} does not exist: the virtual machine has {device_count()} "
                          f"rbln device(s) (0..{device_count() - 1})")
    return idx


# --- devices ---------------------------------------------------------------------------------

def is_available() -> bool:
    return True


def is_initialized() -> bool:
    return _shim is not None


def _is_in_bad_fork() -> bool:
    return False


def _lazy_init() -> None:
    pass


def device_count() -> int:
    from rebel.npu import device_count as count
    return count()


def current_device() -> int:
    return _shim.current_device()


def set_device(device) -> None:
    _shim.set_device(_index(device))


class device:
    """Context manager: make `device` the current rbln device inside the block."""

    def __init__(self, device):
        self.idx = _index(device) if device is not None else None
        self.prev = None

    def __enter__(self):
        if self.idx is not None:
            self.prev = current_device()
            set_device(self.idx)
        return self

    def __exit__(self, *exc):
        if self.prev is not None:
            set_device(self.prev)
        return False


def synchronize(device=None) -> None:
    """Every eager op completes before it returns (the emulation is synchronous): nothing to wait for."""
    _index(device)


def get_device_name(device=None) -> str:
    from rebel.npu import current_machine
    return current_machine().device(_index(device)).spec.name


def get_device_properties(device=None):
    """A record of the device: product, card and die, DRAM, peak FP16 throughput."""
    from types import SimpleNamespace

    from rebel.npu import current_machine
    info = current_machine().device(_index(device))
    die = info.spec.die
    return SimpleNamespace(name=info.spec.name, index=info.index, card=info.card, die=info.die,
                           total_memory=die.memory.dram_usable_bytes,
                           neural_engines=die.compute.neural_engines,
                           fp16_tflops=die.compute.peak_flops("float16") / 1e12)


def set_device_dtype(dtype) -> None:
    """torch.float16 (default) or torch.bfloat16: the format float32 rbln tensors are rounded to."""
    from . import _dispatch
    _dispatch.set_device_dtype(dtype)


def get_device_dtype():
    from . import _dispatch
    return _dispatch.get_device_dtype()


# --- random numbers: eager random ops run on the host generator ------------------------------

def manual_seed(seed: int) -> None:
    """Random ops on rbln tensors draw from the host (CPU) generator, which torch.manual_seed
    already seeds (it calls this function too, so this must not call it back)."""


def manual_seed_all(seed: int) -> None:
    """See manual_seed."""


def seed() -> None:
    torch.seed()


def initial_seed() -> int:
    return torch.initial_seed()


def get_rng_state(device=None):
    return torch.get_rng_state()


def set_rng_state(state, device=None) -> None:
    torch.set_rng_state(state)


# --- memory ----------------------------------------------------------------------------------

def memory_allocated(device=None) -> int:
    return _shim.stats(_index(device))[0]


def max_memory_allocated(device=None) -> int:
    return _shim.stats(_index(device))[1]


def reset_peak_memory_stats(device=None) -> None:
    _shim.reset_peak(_index(device))


def memory_reserved(device=None) -> int:
    """No caching allocator: reserved equals allocated."""
    return memory_allocated(device)


def max_memory_reserved(device=None) -> int:
    return max_memory_allocated(device)


def empty_cache() -> None:
    """Freed blocks go back at once (no caching allocator), so there is nothing to release."""


def _runtime_bytes(idx: int) -> int:
    from rebel.device.memory import device_memory
    return device_memory(idx).used


def _usable_bytes(idx: int) -> int:
    """The device's whole usable DRAM (the shim's own limit shrinks by what runtimes hold)."""
    from rebel.device.memory import device_memory
    return device_memory(idx).capacity


def mem_get_info(device=None) -> tuple[int, int]:
    """(free, total) bytes of the device's usable DRAM, eager tensors and compiled runtimes together."""
    idx = _index(device)
    total = _usable_bytes(idx)
    return max(0, total - _shim.stats(idx)[0] - _runtime_bytes(idx)), total


def memory_stats(device=None) -> dict:
    idx = _index(device)
    allocated, peak, live, calls, _ = _shim.stats(idx)
    return {"allocated_bytes.all.current": allocated, "allocated_bytes.all.peak": peak,
            "reserved_bytes.all.current": allocated, "reserved_bytes.all.peak": peak,
            "active.all.current": live, "allocation.all.allocated": calls,
            "runtime_bytes.all.current": _runtime_bytes(idx), "capacity_bytes": _usable_bytes(idx)}


def memory_summary(device=None) -> str:
    s = memory_stats(device)
    mib = 2 ** 20
    return (f"rbln:{_index(device)} DRAM: {s['allocated_bytes.all.current'] / mib:.2f} MiB in "
            f"{s['active.all.current']} eager tensors (peak {s['allocated_bytes.all.peak'] / mib:.2f} "
            f"MiB), {s['runtime_bytes.all.current'] / mib:.2f} MiB held by compiled runtimes, "
            f"{s['capacity_bytes'] / 2**30:.2f} GiB usable")


# --- what ran --------------------------------------------------------------------------------

def explain() -> str:
    from ._explain import explain as _explain
    return _explain()


def reset() -> None:
    """Start a new explain() window."""
    from . import stats
    stats.reset()


def profile(path=None):
    from .profiler import profile as _profile
    return _profile(path)


@contextlib.contextmanager
def fallback_disabled():
    """Inside the block, host fallbacks raise (like TORCH_RBLN_DISABLE_FALLBACK=1)."""
    import os
    old = os.environ.get("TORCH_RBLN_DISABLE_FALLBACK")
    os.environ["TORCH_RBLN_DISABLE_FALLBACK"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TORCH_RBLN_DISABLE_FALLBACK"]
        else:
            os.environ["TORCH_RBLN_DISABLE_FALLBACK"] = old
