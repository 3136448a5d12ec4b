"""Linear layers against weights packed once, when a runtime is created, for the kernel that
reads them fastest (`packed_weights` picks, per weight, from the rows its readers have).

- 16-bit (SIXTEEN_BIT): a weight some graph reads with a decode batch's rows (1 to 8) is held in
  the device's 16-bit format (the values the device holds, exactly; half the bytes). Those rows
  run in rebel's native kernel (`linear_rows`), which reads it as such: SmolLM2's decode step at
  batch 4 went from ~46 to ~31 ms. A graph that reads it with more rows (a prefill) converts it
  back to float32 for MKL, about 15% on top of the product for SmolLM2's layers; so a weight with
  such a reader is held so only up to NARROW_MAX_ELEMENTS (a 4096x4096 weight's conversion at 64
  rows cost more than the product), and one that only many-row readers read keeps float32. Both
  routes give exactly what the interpreter computes from the float32 weight
  (`ops.linear_on_rows` takes the same two), so only the bytes read change. An embedding lookup
  of the same weight (a tied head) reads the 16-bit copy too, and gets the same rows.
- oneDNN (ONEDNN): a wide weight (at least WIDE_OUT_FEATURES output features on a die: a head)
  that is not held in 16 bits goes to oneDNN's blocked layout. MKL's sgemm reads a
  vocabulary-wide weight ([576, 49152] for SmolLM2) at about half the memory rate from 4 rows on:
  measured here (torch 2.13, 2 threads), 4 rows took 4.8 ms against 2.4 ms for one, 64 rows
  17.4 ms. oneDNN's inner-product kernel against the weight reordered once
  (`mkldnn._reorder_linear_weight`, the prepacking vLLM's CPU backend does for every linear) took
  2.8 ms for 4 rows, 3.9 ms for 8 and 13.7 ms for 64. Numerics: oneDNN accumulates in FP32 in
  another order: after rounding to FP16 about 1 logit in 500 is one unit in the last place apart.
  Its result for a row does not depend on how many rows it runs with nor on the thread count.

Memory: a runtime keeps the plain float32 copy only when something else reads it. SmolLM2's tied
embedding and head (whose graphs all read it with 1 to 4 rows: prefill takes the last token's)
are one 16-bit copy instead of a float32 one plus a packed float32 one. `RBLN_PACKED_LINEAR=0`
turns packing off.
"""
from __future__ import annotations

import math
import os

import torch

from ..ir import Ref, to_torch_dtype
from . import linear_rows
from .ops import linear_on_rows

WIDE_OUT_FEATURES = 16384
NARROW_MAX_ELEMENTS = 1 << 22  # 16 MiB as FP32: converting it for a prefill costs ~15% of the product
SUFFIX = "@packed"  # a packed weight's name in a die's environment
ENV = "RBLN_PACKED_LINEAR"
LINEAR = "aten.linear.default"
EMBEDDING = "aten.embedding.default"
ONEDNN, SIXTEEN_BIT = "oneDNN", "16-bit"  # the two packings


def _enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def available() -> bool:
    """Whether this torch has oneDNN's packed linear (for wide weights) and packing is not off."""
    if not _enabled() or not torch.backends.mkldnn.is_available():
        return False
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and \
        hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _form(shape: tuple[int, int], device_dtype: torch.dtype, fewest: int, most: int,
          sixteen_bit: bool = True) -> str | None:
    """How a linear weight of this shape on a die is packed, given the fewest and the most rows
    its readers have (see the module docstring): 16-bit when a decode batch reads it and no
    many-row reader would convert a large weight back each time; else oneDNN when wide."""
    if sixteen_bit and _enabled() and device_dtype in (torch.float16, torch.bfloat16) \
            and linear_rows.available() \
            and fewest <= linear_rows.max_rows() \
            and (most <= linear_rows.max_rows() or shape[0] * shape[1] <= NARROW_MAX_ELEMENTS):
        return SIXTEEN_BIT
    if shape[0] >= WIDE_OUT_FEATURES and available():
        return ONEDNN
    return None


def packed_weights(programs, sixteen_bit: bool = True) -> dict[str, str]:
    """name -> packing (ONEDNN or SIXTEEN_BIT) of the weights the programs' device kernels use as
    a linear's weight (FP32 storage, 2-D) that this machine packs. Every program of a runtime
    binds the same weights, so all of them run such a weight packed, whatever their batch.
    sixteen_bit=False: oneDNN only (the plain copies stay anyway: shared with other runtimes)."""
    rows: dict[str, list[int]] = {}
    where: dict[str, tuple] = {}
    for program in programs:
        for kernel in program.kernels:
            for op in kernel.ops:
                weight = _linear_weight(op, program)
                if weight is not None:
                    rows.setdefault(weight, []).append(_rows(op, program))
                    shape = program.sharding.local_shape(weight, tuple(program.weights[weight].shape))
                    where[weight] = (shape, to_torch_dtype(program.device_dtype))
    forms = {name: _form(*where[name], min(seen), max(seen), sixteen_bit) for name, seen in rows.items()}
    return {name: form for name, form in forms.items() if form is not None}


def _rows(op, program) -> int:
    """The rows of a linear's input (all but its last dim)."""
    x = op.args[0]
    spec = program.values.get(x.name) if isinstance(x, Ref) else None
    return math.prod(spec.shape[:-1]) if spec is not None and spec.shape else 1 << 62


def linear_weight(op, packed: dict) -> str | None:
    """The weight a linear reads in packed form, or None."""
    if op.target != LINEAR or op.kwargs or len(op.args) < 2 or not isinstance(op.args[1], Ref):
        return None
    return op.args[1].name if op.args[1].name in packed else None


def lookup_weight(op, packed: dict) -> str | None:
    """The weight an embedding lookup reads from its 16-bit copy (a tied head's), or None."""
    if op.target != EMBEDDING or op.kwargs or not op.args or not isinstance(op.args[0], Ref):
        return None
    return op.args[0].name if packed.get(op.args[0].name) == SIXTEEN_BIT else None


def lookup(weight: torch.Tensor, indices: torch.Tensor, *args) -> torch.Tensor:
    """`aten.embedding` on the 16-bit copy: the same rows, as float32."""
    return torch.ops.aten.embedding.default(weight, indices, *args).float()


def _linear_weight(op, program) -> str | None:
    if op.target != LINEAR or len(op.args) < 2 or op.kwargs:
        return None
    weight = op.args[1]
    if not isinstance(weight, Ref) or weight.name not in program.weights:
        return None
    spec = program.weights[weight.name]
    if not spec.is_float or len(spec.shape) != 2 or weight.name in program.mutable_buffers:
        return None
    return weight.name


def plain_readers(programs, names: dict[str, str]) -> set[str]:
    """The packed weights in `names` that something other than a packed linear's weight argument
    (or a device lookup of a 16-bit copy) reads (another op, a host segment, a copy to the host,
    an output): their plain copy must stay."""
    needed = set()
    for program in programs:
        for seg in program.segments:
            device = seg.kind == "device"
            ops = [op for k in seg.kernels for op in k.ops] if device else seg.ops
            for op in ops:
                packed_arg = op.args[1] if linear_weight(op, names) else \
                    op.args[0] if device and lookup_weight(op, names) else None
                for arg in _refs(op.args, op.kwargs):
                    if arg.name in names and arg is not packed_arg:
                        needed.add(arg.name)
            needed.update(n for n in seg.copy_out if n in names)
        needed.update(o.name for o in program.outputs if isinstance(o, Ref) and o.name in names)
        needed.update(n for n in program.buffer_updates.values() if n in names)
    return needed


def _refs(args, kwargs):
    stack = list(args) + list(kwargs.values())
    while stack:
        value = stack.pop()
        if isinstance(value, Ref):
            yield value
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())


def pack(weight: torch.Tensor, form: str, device_dtype: torch.dtype) -> torch.Tensor:
    """A die's weight (FP32 storage of `device_dtype` values) packed for its linear: an opaque
    mkldnn tensor (ONEDNN) or the same values in 16-bit storage (SIXTEEN_BIT)."""
    if form == ONEDNN:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    return weight.to(device_dtype).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`aten.linear(x, weight, bias)` against the packed weight."""
    if packed.is_mkldnn:
        if not x.is_contiguous():
            x = x.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    few = linear_rows.linear(x, packed, bias)
    return few if few is not None else linear_on_rows(x, packed.float(), bias)
