"""A kernel's tail and its rounding as one call, in the kernels of one generated block.

A kernel rounds its outputs after its last op. Where that op is a linear with a bias, a GELU of
a linear, a layer norm (of a residual sum) or an inference batch norm (and its ReLU), `rewrite`
replaces the chain by one op that computes it and rounds in the same pass over the result
(`ops.linear_tail`, `epilogues.layer_norm_rounded`, `epilogues.batch_norm_rounded`): the GEMM's
output is walked once instead of three times (bias copy, GELU, rounding), a norm's input once
instead of twice. A batch norm also rounds, as it reads it, the convolution output it alone
reads, in place of the convolution kernel's own pass over it. Only the generated executor does
this; the device's ops are the same C code whether fused or not, so the interpreter, running the
chain op by op and rounding at the end, gets the same bits (tests compare).

A chain is fused only when each value in it is read by the next op alone, inside the kernel and
out (the norm's mean and rstd by nobody), and the last one is a kernel output no op of the kernel
reads (the ops after it would read it unrounded). A linear reading a packed weight keeps its
packed form (`packed_linear`).
"""
from __future__ import annotations

import torch

from ..ir import GETITEM, Op, Ref, TensorSpec
from . import epilogues, ops, packed_linear

LINEAR = "aten.linear.default"
GELU = "aten.gelu.default"
NORM = "aten.native_layer_norm.default"
ADD = "aten.add.Tensor"
BATCH_NORM = "aten._native_batch_norm_legit_no_training.default"
RELU = "aten.relu.default"
CONV = "aten.convolution.default"


def _linear(x, weight, bias, dtype):
    return ops.linear_tail(x, weight, bias, dtype=dtype)


def _linear_gelu(x, weight, bias, dtype):
    return ops.linear_tail(x, weight, bias, gelu=True, dtype=dtype)


# The fused ops' targets (the generated executor's only) and what computes them.
FUSED = {"rbln_tail.linear": _linear, "rbln_tail.linear_gelu": _linear_gelu,
         "rbln_tail.layer_norm": epilogues.layer_norm_rounded,
         "rbln_tail.batch_norm": epilogues.batch_norm_rounded}


def rewrite(kernels: list[tuple[list[Op], list[str]]], keep: set[str], dtype: torch.dtype,
            packed: dict | None = None, views: frozenset = frozenset()):
    """`kernels` ((ops, outputs rounded) per kernel) with each fusable tail made one op. views:
    the names of ATen's view ops; a linear whose result the kernel only views (the head split
    of an attention's packed projection) hands on its rounded memory through them, so it is
    fused too."""
    if dtype not in (torch.float16, torch.bfloat16):
        return kernels
    packed = packed or {}
    readers: dict[str, int] = {}
    for block, _ in kernels:
        for op in block:
            for r in op.refs:
                readers[r] = readers.get(r, 0) + 1
    read_inside = [{r for op in block for r in op.refs} for block, _ in kernels]  # per kernel
    # Convolution outputs only a batch norm reads: the norm may round them as it reads them.
    movable = {op.name: index for index, (block, outputs) in enumerate(kernels) for op in block
               if op.target == CONV and op.name in outputs and readers.get(op.name) == 1
               and op.name not in keep and isinstance(op.out, TensorSpec)
               and op.name not in read_inside[index]}
    taken: set[str] = set()  # roundings moved into the kernel that reads them
    out = []
    for index, (block, outputs) in enumerate(kernels):
        by_name, rounded = {op.name: op for op in block}, set(outputs)
        fused: dict[str, Op] = {}
        removed: set[str] = set()
        for op in block:
            if op.name in rounded and op.name not in read_inside[index] or \
                    _only_viewed(op, block, readers, keep, views):
                match = _match(op, by_name, readers, keep, rounded, dtype, packed)
                if match is not None:
                    fused[op.name], gone = match
                    removed |= gone
                    fused[op.name] = _round_on_read(fused[op.name], movable, index, taken)
        if fused:
            block = [fused.get(op.name, op) for op in block if op.name not in removed]
        out.append((block, outputs))
    return [(block, [o for o in outputs if o not in taken]) for block, outputs in out]


def _round_on_read(op: Op, movable: dict, index: int, taken: set) -> Op:
    """A fused batch norm reading a convolution's output that an earlier kernel would round
    and nothing else reads takes that rounding over (its round_input flag)."""
    if op.target != "rbln_tail.batch_norm" or not isinstance(op.args[0], Ref):
        return op
    source = op.args[0].name
    if movable.get(source, index) >= index:
        return op
    taken.add(source)
    args = list(op.args)
    args[7] = True
    return Op(op.name, op.target, tuple(args), {}, op.out, kind=op.kind)


def _only_viewed(op: Op, block: list[Op], readers: dict, keep: set, views: frozenset) -> bool:
    """Whether the kernel reads op's result only through views (and views of those), and
    nothing outside the kernel reads it: rounding it is then rounding what the views show."""
    if op.target != LINEAR or op.name in keep:
        return False
    seen, inside = {op.name}, 0
    for other in block:
        read = [r for r in other.refs if r in seen]
        if not read:
            continue
        inside += other.refs.count(op.name)
        name = other.target.split(".")[1] if other.target.count(".") == 2 else other.target
        if name not in views or other.refs[0] not in seen or len(other.refs) != 1:
            return False
        seen.add(other.name)
    return inside > 0 and inside == readers.get(op.name)


def _match(op: Op, by_name: dict, readers: dict, keep: set, outputs: set, dtype, packed: dict):
    """(the fused op, names of the ops it replaces besides `op`) for a chain ending in op."""
    def only(value) -> Op | None:  # the kernel's op producing value, read by the chain alone
        if not isinstance(value, Ref) or value.name not in by_name or readers.get(value.name) != 1 \
                or value.name in keep or value.name in outputs:
            return None
        return by_name[value.name]

    def plain_linear(lin: Op | None) -> bool:
        return lin is not None and lin.target == LINEAR and not lin.kwargs and 2 <= len(lin.args) <= 3 \
            and packed_linear.linear_weight(lin, packed) is None

    if not isinstance(op.out, TensorSpec) or not op.out.is_float:
        return None
    if op.target == LINEAR and plain_linear(op) and len(op.args) == 3 and op.args[2] is not None:
        return Op(op.name, "rbln_tail.linear", (*op.args, dtype), {}, op.out, kind=op.kind), set()
    if op.target == GELU and op.args and op.kwargs.get("approximate", "none") == "none" and \
            len(op.args) == 1 and plain_linear(lin := only(op.args[0])):
        x, weight, bias = (*lin.args, None)[:3]
        return Op(op.name, "rbln_tail.linear_gelu", (x, weight, bias, dtype), {}, op.out, kind=op.kind), {lin.name}
    if op.target in (GETITEM, RELU) and (bn := _batch_norm(op, only)) is not None:
        x, weight, bias, mean, var, _, eps = bn.args
        gone = {bn.name} | ({op.args[0].name} if op.target == RELU else set())
        return Op(op.name, "rbln_tail.batch_norm", (x, weight, bias, mean, var, eps, op.target == RELU, False, dtype),
                  {}, op.out, kind=op.kind), gone
    if op.target == GETITEM and op.args[1] == 0 and (norm := only(op.args[0])) is not None and \
            norm.target == NORM and not norm.kwargs and len(norm.args) == 5:
        x, shape, weight, bias, eps = norm.args
        gone = {norm.name}
        residual = None
        add = only(x)
        if add is not None and add.target == ADD and not add.kwargs and len(add.args) == 2 and \
                all(isinstance(a, Ref) for a in add.args):
            (x, residual), gone = add.args, gone | {add.name}
        return Op(op.name, "rbln_tail.layer_norm", (x, residual, shape, weight, bias, eps, dtype), {},
                  op.out, kind=op.kind), gone
    return None


def _batch_norm(op: Op, only) -> Op | None:
    """The inference batch norm whose output op is (getitem 0) or whose output op's ReLU reads."""
    if op.target == RELU:
        if len(op.args) != 1 or op.kwargs or (item := only(op.args[0])) is None or item.target != GETITEM:
            return None
        op = item
    if op.args[1] != 0 or (bn := only(op.args[0])) is None or bn.target != BATCH_NORM or bn.kwargs \
            or len(bn.args) != 7:
        return None
    return bn
