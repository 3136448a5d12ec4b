"""Device state shared by the runtimes of one compile context: static buffers and shared weights.

A compile context (rebel/compile_context.py) ties graphs compiled separately (prefill, decode
per batch size; encoder, decoder) to one set of device buffers. At run time the tie is the
context id recorded in each artifact: every runtime of a context on the same device group (one
die, or the dies of a tensor-parallel model) joins one `ContextState`, found in a process-wide
registry by (context id, devices). It holds

- the static buffers, zero-initialised in (accounted) device DRAM when the first runtime that
  uses one is created, updated in place by the runs, seen by every runtime of the group;
- with weight sharing, the weights by content key, placed and counted once however many
  runtimes use them (reference-counted per runtime);
- the lock that serialises runs of every runtime of the group: they read and write the same
  buffers, so two runs at once could interleave a prefill's writes with a decode's reads.

The state is freed, DRAM included, when the last runtime of the group closes.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from ..compiler.program import Program
from ..compiler.tensor_parallel import shard_weight
from ..device.memory import device_memory
from ..errors import RBLNError
from ..ir import TensorSpec, to_torch_dtype


class ContextState:
    def __init__(self, context_id: str, devices: tuple[int, ...]):
        self.context_id = context_id
        self.devices = devices
        self.lock = threading.Lock()  # held by a run of any runtime of the group
        self.static: list[dict[str, torch.Tensor]] = [{} for _ in devices]  # per die
        self.static_specs: dict[str, tuple[TensorSpec, int | None]] = {}
        self.static_bytes: dict[str, int] = {}  # bytes one die holds, per static buffer
        self.weights: dict[str, list[torch.Tensor]] = {}  # content key -> per-die tensors
        self.weight_refs: dict[str, int] = {}
        self._handles: dict[str, list[tuple]] = {}  # "static:<name>" / "weight:<key>" -> DRAM
        self._bytes: dict[str, int] = {}            # the same keys -> bytes per die
        self.runtimes = 0

    # --- static buffers ---------------------------------------------------------------------

    def ensure_static(self, program: Program, name: str) -> None:
        """Allocate static buffer `name` as `program` sizes it, or check that the one already
        held agrees (shape as allocated, dtype, tensor-parallel split)."""
        spec = program.static_buffer_spec(name)
        split = program.sharding.weights.get(name)
        held = self.static_specs.get(name)
        if held is not None:
            if held != (spec, split):
                raise RBLNError(
                    f"static buffer {name!r} of compile context {self.context_id[:8]} is {held[0]} "
                    f"(split {held[1]}) on rbln:{self.devices[0]}, but this model expects {spec} "
                    f"(split {split}); resize every model of the context alike "
                    "(exp_multiply_buffer_size / exp_rescale_buffer_size)")
            return
        nbytes = program.static_local_bytes(name)
        self._handles[f"static:{name}"] = _allocate(
            self.devices, nbytes, f"static buffer {name!r} ({spec}) of compile context "
            f"{self.context_id[:8]}")
        self._bytes[f"static:{name}"] = nbytes
        dtype = to_torch_dtype(spec.dtype)
        # The device keeps floats as FP32 values of 16-bit numbers (executor convention).
        full = torch.zeros(spec.shape, dtype=torch.float32 if dtype.is_floating_point else dtype)
        size = len(self.devices)
        for rank in range(size):
            self.static[rank][name] = shard_weight(full, split, rank, size).clone() \
                if size > 1 else full
        self.static_specs[name] = (spec, split)
        self.static_bytes[name] = nbytes

    # --- shared weights ---------------------------------------------------------------------

    def shared_weight(self, key: str, placed: Callable[[], list[torch.Tensor]], nbytes: int,
                      what: str) -> list[torch.Tensor]:
        """The per-die tensors of weight `key`: the group's if it holds them, else `placed()`
        registered (and `nbytes` per die allocated). Counts one more user."""
        if key not in self.weights:
            self._handles[f"weight:{key}"] = _allocate(self.devices, nbytes, what)
            self._bytes[f"weight:{key}"] = nbytes
            self.weights[key] = placed()
            self.weight_refs[key] = 0
        self.weight_refs[key] += 1
        return self.weights[key]

    def drop_weights(self, keys) -> None:
        for key in keys:
            self.weight_refs[key] -= 1
            if self.weight_refs[key] == 0:
                del self.weights[key], self.weight_refs[key]
                _free(self._handles.pop(f"weight:{key}"))
                del self._bytes[f"weight:{key}"]

    @property
    def dram_bytes(self) -> int:
        """Bytes per die the group holds: its static buffers and shared weights."""
        return sum(self._bytes.values())

    def free(self) -> None:
        for handles in self._handles.values():
            _free(handles)
        self._handles.clear()
        self._bytes.clear()
        self.static = [{} for _ in self.devices]
        self.weights.clear()


_registry: dict[tuple[str, tuple[int, ...]], ContextState] = {}
_registry_lock = threading.Lock()


def join(context_id: str, devices: tuple[int, ...]) -> ContextState:
    """The state of context `context_id` on `devices`, created on first use; one more runtime."""
    with _registry_lock:
        state = _registry.get((context_id, devices))
        if state is None:
            state = _registry[(context_id, devices)] = ContextState(context_id, devices)
        state.runtimes += 1
        return state


def leave(state: ContextState, weight_keys=()) -> None:
    """A runtime of the group closed: drop its weight references; the last one frees all."""
    with _registry_lock:
        state.drop_weights(weight_keys)
        state.runtimes -= 1
        if state.runtimes == 0:
            state.free()
            _registry.pop((state.context_id, state.devices), None)


def states() -> list[ContextState]:
    """Every live context state (for tests and rbln-smi style reports)."""
    with _registry_lock:
        return list(_registry.values())


def _allocate(devices, nbytes: int, what: str) -> list[tuple]:
    held = []
    try:
        for index in devices:
            memory = device_memory(index)
            held.append((memory, memory.allocate(nbytes, what)))
    except Exception:
        _free(held)
        raise
    return held


def _free(held) -> None:
    for memory, handle in held:
        memory.free(handle)
