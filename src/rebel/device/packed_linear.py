"""Linear layers against weights packed once, when a runtime is created, for the kernel that
reads them fastest.

Two packings, by the weight's width on a die:

- Wide weights (at least WIDE_OUT_FEATURES output features: in practice an LLM's head) go to
  oneDNN's blocked layout. A language model's head multiplies a few rows (one per sequence in a
  decode batch) by a vocabulary-wide weight: [b, 576] x [576, 49152] for SmolLM2. MKL's sgemm
  reads that weight at about half the memory rate once there are 4 or more rows: measured here
  (torch 2.13, 2 threads), 4 rows took 4.8 ms against 2.4 ms for one; a batch of 8, 8.4 ms.
  oneDNN's inner-product kernel against the weight reordered once
  (`mkldnn._reorder_linear_weight`, the prepacking vLLM's CPU backend does for every linear) took
  2.8 ms for 4 rows, 3.9 ms for 8 and 13.7 ms for 64 (MKL: 17.4 ms); for one row both are
  memory-bound (~2.4 ms). Numerics: oneDNN accumulates in FP32 in another order than MKL: after
  rounding to FP16 about 1 logit in 500 is one unit in the last place apart (SmolLM2's head
  shape). Its result for a row does not depend on how many rows it runs with nor on the thread
  count (checked at 1, 4 and 64 rows, 1 and 2 threads).
- The others, where some graph reads them with a decode batch's rows (1 to 8), are held in the
  device's 16-bit format (the values the device holds, exactly; half the bytes). Those rows run
  in rebel's native kernel (`linear_rows`), which reads them as such: SmolLM2's decode step at
  batch 4 went from ~46 to ~31 ms. More rows (a prefill) convert the weight back to float32 for
  MKL, about 15% on top of the product for SmolLM2's layers; so only weights up to
  NARROW_MAX_ELEMENTS are held so, and a model only ever run with many rows keeps float32 (a
  4096x4096 weight's conversion at 64 rows cost more than the product). Both routes give
  exactly what the interpreter computes from the float32 weight (`ops.linear_on_rows` takes the
  same two), so only the bytes read change.

Memory: a runtime keeps the plain float32 copy only when something else reads it (a tied
embedding's lookup does): an untied head costs nothing extra, a tied one is held twice, and the
other linears' weights take half their float32 bytes. `RBLN_PACKED_LINEAR=0` turns packing off.
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


def _enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def available() -> bool:
    """Whether this torch has oneDNN's packed linear (for wide weights) and packing is not off."""
    if not _enabled() or not torch.backends.mkldnn.is_available():
        return False
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and \
        hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _packs(shape: tuple[int, int], device_dtype: torch.dtype, rows: int) -> bool:
    """Whether a linear weight of this shape on a die, read with `rows` rows here, is packed:
    a wide one for oneDNN whatever the rows; a narrower one in 16 bits when the rows are a decode
    batch's (the native kernel's), and only up to NARROW_MAX_ELEMENTS, since a many-row product
    elsewhere converts it back to FP32 each time (a larger weight's conversion would cost about
    what the product does)."""
    if shape[0] >= WIDE_OUT_FEATURES:
        return available()
    return _enabled() and device_dtype in (torch.float16, torch.bfloat16) and \
        rows <= linear_rows.max_rows() and shape[0] * shape[1] <= NARROW_MAX_ELEMENTS


def packed_weight_names(programs) -> frozenset[str]:
    """Weights some program's device kernel uses as a linear's weight (FP32 storage, 2-D) that
    this machine packs there (`_packs`). Every program of a runtime binds the same weights, so
    all of them run such a weight packed, whatever their batch."""
    names = set()
    for program in programs:
        dtype = to_torch_dtype(program.device_dtype)
        for kernel in program.kernels:
            for op in kernel.ops:
                weight = _linear_weight(op, program)
                if weight is None:
                    continue
                shape = program.sharding.local_shape(weight, tuple(program.weights[weight].shape))
                if _packs(shape, dtype, _rows(op, program)):
                    names.add(weight)
    return frozenset(names)


def _rows(op, program) -> int:
    """The rows of a linear's input (all but its last dim)."""
    x = op.args[0]
    spec = program.values.get(x.name) if isinstance(x, Ref) else None
    return math.prod(spec.shape[:-1]) if spec is not None and spec.shape else 1 << 62


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


def plain_readers(programs, names: frozenset[str]) -> set[str]:
    """The names in `names` that something other than a packed linear's weight argument reads
    (another op, a host segment, a copy to the host, an output): their plain copy must stay."""
    needed = set()
    for program in programs:
        for seg in program.segments:
            ops = [op for k in seg.kernels for op in k.ops] if seg.kind == "device" else seg.ops
            for op in ops:
                packed_arg = op.args[1] if _linear_weight(op, program) in names else None
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


def pack(weight: torch.Tensor, device_dtype: torch.dtype) -> torch.Tensor:
    """A die's weight (FP32 storage of `device_dtype` values) packed for its linear: an opaque
    mkldnn tensor for a wide one, the same values in 16-bit storage for the others."""
    if weight.shape[0] >= WIDE_OUT_FEATURES and available():
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
