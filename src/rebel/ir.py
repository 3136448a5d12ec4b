"""The graph IR every layer speaks: plain data that survives a JSON round trip.

torch.export gives an FX graph whose nodes hold Python objects; an artifact must not (loading
must never run code). So capture turns the FX graph into `Op`s whose arguments are JSON values
or `Ref`s to other values, and whose targets are names resolved against `torch.ops` on load.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .errors import ArtifactError

FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}
# rbln: ops registered by rebel.device.ops; rbln_custom_ops: the vendor's (rebel.device.vendor_ops)
OP_NAMESPACES = ("aten", "rbln", "rbln_custom_ops")
GETITEM = "getitem"


@dataclass(frozen=True)
class Ref:
    """A reference to a value (graph input, weight or op output) by name."""

    name: str


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def nbytes(self, device_dtype: str | None = None) -> int:
        """Bytes this tensor occupies; floats take the device dtype's size when one is given."""
        dtype = device_dtype if (device_dtype and self.is_float) else self.dtype
        return self.numel * torch.empty((), dtype=to_torch_dtype(dtype)).element_size()

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(d: dict) -> TensorSpec:
        return TensorSpec(tuple(int(s) for s in d["shape"]), str(d["dtype"]))

    @staticmethod
    def of(t: torch.Tensor) -> TensorSpec:
        return TensorSpec(tuple(t.shape), dtype_name(t.dtype))

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass
class Op:
    """One ATen op. `out` is a TensorSpec, a tuple of them (multi-output ops), or None."""

    name: str
    target: str
    args: tuple
    kwargs: dict
    out: TensorSpec | tuple | None
    label: str = ""
    kind: str = ""  # support-table class; "host" for ops that fall back
    host_reason: str = ""

    @property
    def refs(self) -> list[str]:
        return [r.name for r in _iter_refs((self.args, self.kwargs))]

    @property
    def out_specs(self) -> list[TensorSpec]:
        if isinstance(self.out, TensorSpec):
            return [self.out]
        if isinstance(self.out, tuple):
            return [o for o in self.out if isinstance(o, TensorSpec)]
        return []

    def to_json(self) -> dict:
        return {"name": self.name, "target": self.target, "args": encode(self.args),
                "kwargs": encode(self.kwargs), "out": _encode_out(self.out), "label": self.label,
                "kind": self.kind, **({"host_reason": self.host_reason} if self.host_reason else {})}

    @staticmethod
    def from_json(d: dict) -> Op:
        return Op(d["name"], d["target"], decode(d["args"]), decode(d["kwargs"]),
                  _decode_out(d["out"]), d.get("label", ""), d.get("kind", ""),
                  d.get("host_reason", ""))


@dataclass
class Graph:
    """A captured model: user inputs, weights, ops in topological order, outputs."""

    inputs: list[tuple[str, TensorSpec]]
    weights: dict[str, torch.Tensor]
    ops: list[Op]
    outputs: list  # flat: Ref or JSON literal per output leaf
    out_spec: str  # pytree TreeSpec as JSON (torch.utils._pytree.treespec_dumps)
    buffer_updates: dict[str, str] = field(default_factory=dict)  # value name -> buffer name
    mutable_buffers: set[str] = field(default_factory=set)
    # Static-address buffers (inputs a compile context marked): mutable buffers whose storage a
    # runtime's context registry owns and shares with the context's other graphs.
    static_buffers: set[str] = field(default_factory=set)

    def specs(self) -> dict[str, TensorSpec]:
        out = {name: spec for name, spec in self.inputs}
        out.update({name: TensorSpec.of(t) for name, t in self.weights.items()})
        for op in self.ops:
            if isinstance(op.out, TensorSpec):
                out[op.name] = op.out
        return out

    def users(self) -> dict[str, list[str]]:
        users: dict[str, list[str]] = {}
        for op in self.ops:
            for r in op.refs:
                users.setdefault(r, []).append(op.name)
        return users


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@lru_cache(maxsize=None)
def to_torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"unknown dtype {name!r}")
    return dtype


# --- JSON encoding of op arguments -------------------------------------------------------------

_ENUMS = {
    "dtype": (torch.dtype, dtype_name, to_torch_dtype),
    "layout": (torch.layout, lambda v: str(v).removeprefix("torch."), lambda s: getattr(torch, s)),
    "memory_format": (torch.memory_format, lambda v: str(v).removeprefix("torch."),
                      lambda s: getattr(torch, s)),
    "device": (torch.device, str, torch.device),
}


def encode(value):
    """Python/torch argument -> JSON-safe value."""
    if isinstance(value, Ref):
        return {"$ref": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value] if isinstance(value, list) else {"$tuple": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"$dict": {k: encode(v) for k, v in value.items()}}
    for tag, (cls, to_str, _) in _ENUMS.items():
        if isinstance(value, cls):
            return {f"${tag}": to_str(value)}
    raise TypeError(f"cannot encode argument {value!r} of type {type(value).__name__}")


def decode(value):
    """Inverse of `encode`; only builds plain values, dtypes and Refs (never runs code)."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise ArtifactError(f"malformed argument {value!r}")
    (tag, inner), = value.items()
    if tag == "$ref":
        return Ref(inner)
    if tag == "$float":
        return float(inner)
    if tag == "$tuple":
        return tuple(decode(v) for v in inner)
    if tag == "$dict":
        return {k: decode(v) for k, v in inner.items()}
    if tag.startswith("$") and tag[1:] in _ENUMS:
        try:
            return _ENUMS[tag[1:]][2](inner)
        except (AttributeError, RuntimeError, TypeError) as e:
            raise ArtifactError(f"malformed {tag[1:]} argument {inner!r}: {e}") from None
    raise ArtifactError(f"malformed argument {value!r}")


def _encode_out(out):
    if isinstance(out, TensorSpec):
        return out.to_json()
    if isinstance(out, tuple):
        return {"$tuple": [_encode_out(o) for o in out]}
    return None


def _decode_out(d):
    if d is None:
        return None
    if "$tuple" in d:
        return tuple(_decode_out(o) for o in d["$tuple"])
    return TensorSpec.from_json(d)


def _iter_refs(value):
    if isinstance(value, Ref):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _iter_refs(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _iter_refs(v)


def substitute(value, env: dict):
    """Replace every Ref in an argument structure by its value from `env`."""
    if isinstance(value, Ref):
        return env[value.name]
    if isinstance(value, list):
        return [substitute(v, env) for v in value]
    if isinstance(value, tuple):
        return tuple(substitute(v, env) for v in value)
    if isinstance(value, dict):
        return {k: substitute(v, env) for k, v in value.items()}
    return value


# --- op targets --------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def resolve_target(target: str):
    """Name -> callable: "getitem" or an "<aten|rbln>.<op>.<overload>" OpOverload. Nothing else
    loads, so a program can only call ops this process registered."""
    if target == GETITEM:
        return operator.getitem
    parts = target.split(".")
    if len(parts) != 3 or parts[0] not in OP_NAMESPACES:
        raise ArtifactError(f"unknown op target {target!r}: programs may only use ATen ops and "
                            "the device's own rbln ops")
    try:
        return getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except AttributeError:
        raise ArtifactError(f"op {target!r} does not exist in this PyTorch "
                            f"({torch.__version__})") from None


def target_name(target) -> str:
    if target is operator.getitem:
        return GETITEM
    if isinstance(target, torch._ops.OpOverload):
        ns, rest = target.name().split("::")
        op, _, overload = rest.partition(".")
        return f"{ns}.{op}.{overload or 'default'}"
    raise TypeError(f"unsupported call target {target!r}")
