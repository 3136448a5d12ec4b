"""`rebel.compile_context.CompileContext`: graphs compiled together that share device state.

The vendor's optimum-rbln compiles an LLM as separate graphs (prefill, decode per batch size;
encoder and decoder) with separate `compile_from_torch` calls sharing one context, and marks the
KV caches it passes as example inputs with `mark_static_address`. In a context:

- a marked input is not an input of the compiled program: it becomes a persistent, named device
  buffer (a "static buffer"). Its storage is zero-initialised in device DRAM when the first
  runtime of the context is created on a device (the example's values, often a meta tensor, are
  used only for shape and dtype), device ops update it in place, the caller never passes it, and
  constant folding never bakes it in, even in a graph that only reads it;
- every runtime of the context on the same device(s) sees the same buffer, also when its model
  was saved and reloaded in another process: the artifact records the context id, and the
  runtime keeps a per-device registry of each context's buffers (`rebel.runtime.device_state`);
- with `use_weight_sharing=True` the context's graphs hold their weights once in device DRAM:
  each weight gets a content key, and runtimes of the context on one device place a key once.
  Each .rbln file still stores every weight it uses, so a file loads on its own.
"""
from __future__ import annotations

import hashlib
import uuid

import torch

from .errors import CompileError
from .ir import TensorSpec, dtype_name


class CompileContext:
    """A group of compiled graphs sharing static buffers (and, optionally, weights)."""

    def __init__(self, use_weight_sharing: bool = False):
        if not isinstance(use_weight_sharing, bool):
            raise CompileError(f"use_weight_sharing must be True or False, got {use_weight_sharing!r}")
        self.use_weight_sharing = use_weight_sharing
        self.id = uuid.uuid4().hex
        # id(tensor) -> (tensor, name); the tensor is held so its id is never reused meanwhile.
        self._marked: dict[int, tuple[torch.Tensor, str]] = {}
        self._specs: dict[str, TensorSpec] = {}     # static buffer name -> spec as marked
        self._weight_keys: set[str] = set()         # content keys some compiled graph already holds
        self.compiled = 0                           # graphs compiled in this context

    def mark_static_address(self, tensor: torch.Tensor, name: str | None = None) -> str:
        """Mark `tensor` (an example input of graphs compiled in this context) as a static
        buffer named `name` (default `static_<n>`). Returns the name."""
        if not isinstance(tensor, torch.Tensor):
            raise CompileError(f"mark_static_address expects a torch.Tensor, got {type(tensor).__name__}")
        if name is None:
            name = f"static_{len(self._specs)}"
        if not isinstance(name, str) or not name:
            raise CompileError(f"static buffer name must be a non-empty string, got {name!r}")
        spec = TensorSpec(tuple(int(d) for d in tensor.shape), dtype_name(tensor.dtype))
        known = self._marked.get(id(tensor))
        if known is not None and known[0] is tensor:
            if known[1] != name:
                raise CompileError(f"this tensor is already marked static as {known[1]!r}, not {name!r}")
            return name
        if name in self._specs:
            raise CompileError(f"static buffer name {name!r} is already marked for another tensor "
                               f"({self._specs[name]}) in this context")
        self._marked[id(tensor)] = (tensor, name)
        self._specs[name] = spec
        return name

    def static_name(self, tensor) -> str | None:
        """The static buffer name of `tensor` if it was marked in this context (by identity)."""
        known = self._marked.get(id(tensor))
        return known[1] if known is not None and known[0] is tensor else None

    def static_positions(self, inputs) -> dict[int, str]:
        """Example-input position -> static buffer name, for one bucket's example inputs."""
        out = {i: self.static_name(t) for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)}
        return {i: n for i, n in out.items() if n is not None}

    @property
    def static_buffers(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def record(self, weights: dict[str, torch.Tensor]) -> dict:
        """The context record one compiled model carries (and its artifact's manifest): the
        id, weight sharing, and with sharing each weight's content key and the weights this
        model is the first of the context to hold (counted in its memory queries)."""
        self.compiled += 1
        record = {"id": self.id, "weight_sharing": self.use_weight_sharing}
        if self.use_weight_sharing:
            keys = {name: weight_key(t, name) for name, t in weights.items()}
            owned = sorted(n for n, k in keys.items() if k not in self._weight_keys)
            self._weight_keys |= set(keys.values())
            record.update(weight_keys=keys, owned_weights=owned)
        return record

    def __repr__(self) -> str:
        buffers = ", ".join(f"{n}: {s}" for n, s in self._specs.items())
        return (f"CompileContext(id={self.id[:8]}, use_weight_sharing={self.use_weight_sharing}, "
                f"static_buffers=[{buffers}], compiled_graphs={self.compiled})")


def weight_key(t: torch.Tensor, name: str = "") -> str:
    """A content key: equal keys mean the same bytes of the same spec. A meta tensor has no
    bytes, so its name stands in for them (graphs of one model name a weight alike)."""
    h = hashlib.sha256(f"{tuple(t.shape)}:{dtype_name(t.dtype)}".encode())
    if t.is_meta:
        h.update(f"meta:{name}".encode())
    else:
        flat = t.detach().contiguous().reshape(-1)
        if flat.numel():
            h.update((flat.view(torch.uint8) if flat.dtype != torch.bool else flat).numpy())
    return h.hexdigest()[:32]


__all__ = ["CompileContext", "weight_key"]
