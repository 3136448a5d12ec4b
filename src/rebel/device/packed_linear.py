"""Wide linear layers against weights packed once for oneDNN.

A language model's head multiplies a few rows (one per sequence in a decode batch) by a
vocabulary-wide weight: [b, 576] x [576, 49152] for SmolLM2. MKL's sgemm reads that weight at
about half the memory rate once there are 4 or more rows: measured here (torch 2.13, 2 threads),
4 rows took 4.8 ms against 2.4 ms for one; a batch of 8, 8.4 ms. oneDNN's inner-product kernel
against the weight reordered once into its blocked layout (`mkldnn._reorder_linear_weight`, the
prepacking vLLM's CPU backend does for every linear) took 2.8 ms for 4 rows, 3.9 ms for 8 and
13.7 ms for 64 (MKL: 17.4 ms); for one row both are memory-bound (~2.4 ms). Narrower weights
(a 576- or 1536-wide projection) run as fast or faster through MKL, so only weights with at least
WIDE_OUT_FEATURES output features (on one die) are packed.

Numerics: the packed kernel accumulates in FP32 like MKL, in another order: most FP32 results
differ in their last bits, and after rounding to FP16 about 1 logit in 500 is one unit in the
last place apart (measured on SmolLM2's head shape with FP16 values). Neither order is the
chip's. Its result for a row does not depend on how many rows it runs with nor on the thread
count (checked at 1, 4 and 64 rows, 1 and 2 threads), so a sequence gets the same logits in every
decode batch size.

Memory: the packed copy is the weight's FP32 bytes again. A runtime keeps the plain copy only
when something else reads it (a tied embedding's lookup does), so an untied head costs nothing
extra and a tied one is held twice. `RBLN_PACKED_LINEAR=0` turns packing off.
"""
from __future__ import annotations

import os

import torch

from ..ir import Ref

WIDE_OUT_FEATURES = 16384
SUFFIX = "@packed"  # a packed weight's name in a die's environment
ENV = "RBLN_PACKED_LINEAR"
LINEAR = "aten.linear.default"


def available() -> bool:
    """Whether this torch has oneDNN's packed linear and packing is not turned off."""
    if os.environ.get(ENV, "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and \
        hasattr(torch.ops.mkldnn, "_linear_pointwise")


def packed_weight_names(programs) -> frozenset[str]:
    """Weights some program's device kernel uses as a wide linear's weight (FP32 storage, 2-D,
    at least WIDE_OUT_FEATURES outputs on a die). Every program of a runtime binds the same
    weights, so all of them run such a weight packed, whatever their batch."""
    if not available():
        return frozenset()
    names = set()
    for program in programs:
        for kernel in program.kernels:
            for op in kernel.ops:
                weight = _linear_weight(op, program)
                if weight is not None:
                    names.add(weight)
    return frozenset(names)


def _linear_weight(op, program) -> str | None:
    if op.target != LINEAR or len(op.args) < 2 or op.kwargs:
        return None
    weight = op.args[1]
    if not isinstance(weight, Ref) or weight.name not in program.weights:
        return None
    spec = program.weights[weight.name]
    if not spec.is_float or len(spec.shape) != 2 or weight.name in program.mutable_buffers:
        return None
    out_features = program.sharding.local_shape(weight.name, tuple(spec.shape))[0]
    return weight.name if out_features >= WIDE_OUT_FEATURES else None


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


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout for its inner product (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`aten.linear(x, weight, bias)` against the packed weight."""
    if not x.is_contiguous():
        x = x.contiguous()
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
