"""MultiheadAttention's head split as views, without the layout copies eager's slow path makes.

`F.multi_head_attention_forward`, which `nn.MultiheadAttention` (and so `TransformerEncoderLayer`)
is captured as, splits the packed in-projection into q, k and v by a permute and a contiguous copy
([L, B, 3, E] -> [3, L, B, E]) and then views each as heads; with batch_first it also runs the
block on [L, B, E]: the input transposed (a copy before the in-projection) and the result
transposed back. Eager PyTorch skips all of that on its fused fast path
(`_native_multi_head_attention`), and so does the chip, whose DMA reads q, k and v with strides.
Here those copies were a tenth of an encoder block's time.

`rewrite` replaces that chain, in the kernels of one generated block, by strided views of the
in-projection's result, which scaled_dot_product_attention takes as they are; with batch_first it
also runs both projections on the [B, L, E] rows. Only the layout changes: every value computed,
and every value rounded, is the same element for element (a linear's output row depends only on
its input row; attention reads q, k, v through their strides), so results are bit-identical to
the interpreter's (tests compare). The chain must be exactly the one torch writes, every value in
it read only by the next op and by no code outside the block; anything else is left as it is.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..ir import Op, Ref, TensorSpec

SDPA = "aten.scaled_dot_product_attention.default"
LINEAR = "aten.linear.default"
_CONTIGUOUS = {"memory_format": torch.contiguous_format}


@dataclass
class _Chain:
    """One matched attention: the ops it removes, and what replaces the in-projection and, with
    batch_first, the first op after attention (some new ops reuse a removed op's name)."""
    removed: list[Op]
    at: list[tuple[Op, list[Op]]]            # op -> the ops that take its place
    at_outputs: list[tuple[Op, list[str]]]   # op -> values its kernel now hands on


def rewrite(kernels: list[tuple[list[Op], list[str]]], keep: set[str]):
    """`kernels` ((ops, outputs rounded) per kernel) with each matched attention's head split
    made of views; unchanged when nothing matches."""
    ops = {op.name: op for block, _ in kernels for op in block}
    readers: dict[str, int] = {}
    for block, _ in kernels:
        for op in block:
            for r in op.refs:
                readers[r] = readers.get(r, 0) + 1
    chains = [c for op in ops.values() if op.target == SDPA
              if (c := _match(op, ops, readers, keep)) is not None]
    if not chains:
        return kernels
    removed = {id(op) for c in chains for op in c.removed}
    at = {id(op): v for c in chains for op, v in c.at}
    handed = {id(op): v for c in chains for op, v in c.at_outputs}
    out = []
    for block, outputs in kernels:
        if not block:
            out.append((block, outputs))  # a cast kernel
            continue
        new_ops: list[Op] = []
        extra: list[str] = []
        for op in block:
            if id(op) in at:
                new_ops += at[id(op)]
                extra += handed.get(id(op), [])
            elif id(op) not in removed:
                new_ops.append(op)
        made = {op.name for op in new_ops}
        if new_ops:
            out.append((new_ops, list(dict.fromkeys([o for o in outputs if o in made] + extra))))
    return out


def _match(sdpa: Op, ops: dict, readers: dict, keep: set) -> _Chain | None:
    """The chain ending in this attention, when it is torch's packed in-projection head split."""
    def only(name: str, count: int = 1) -> bool:  # read by the chain alone
        return readers.get(name) == count and name not in keep

    def producer(value, target: str, *args) -> Op | None:
        if not isinstance(value, Ref) or value.name not in ops:
            return None
        op = ops[value.name]
        if op.target != target or len(op.args) != 1 + len(args) or list(op.args[1:]) != list(args):
            return None
        return op

    if len(sdpa.args) < 3 or not isinstance(sdpa.out, TensorSpec):
        return None
    batch, heads, length, head_dim = sdpa.out.shape if len(sdpa.out.shape) == 4 else (0,) * 4
    width = heads * head_dim
    chain: list[Op] = []
    packed = None  # the contiguous [3, L, B, E] copy all three come from
    for index, value in enumerate(sdpa.args[:3]):
        q3 = producer(value, "aten.view.default", [batch, heads, length, head_dim])
        q2 = q3 and producer(q3.args[0], "aten.permute.default", [1, 0, 2])
        q1 = q2 and producer(q2.args[0], "aten.view.default", [length, batch * heads, head_dim])
        q0 = q1 and producer(q1.args[0], "aten.select.int", 0, index)
        if not q0 or not all(only(op.name) for op in (q3, q2, q1, q0)) or q3.kwargs or \
                (packed is not None and q0.args[0] != packed):
            return None
        packed = q0.args[0]
        chain += [q3, q2, q1, q0]
    clone = ops.get(packed.name)
    if clone is None or clone.target != "aten.clone.default" or clone.kwargs != _CONTIGUOUS or \
            len(clone.args) != 1 or not only(clone.name, 3):
        return None
    squeeze = producer(clone.args[0], "aten.squeeze.dims", [-2]) or \
        producer(clone.args[0], "aten.squeeze.dim", -2)
    permute = squeeze and producer(squeeze.args[0], "aten.permute.default", [3, 1, 2, 0, 4])
    unsqueeze = permute and producer(permute.args[0], "aten.unsqueeze.default", 0)
    view = unsqueeze and producer(unsqueeze.args[0], "aten.view.default", [length, batch, 3, width])
    linear = view and isinstance(view.args[0], Ref) and ops.get(view.args[0].name)
    if not linear or linear.target != LINEAR or linear.kwargs or \
            not all(only(op.name) for op in (squeeze, permute, unsqueeze, view, linear)) or \
            not isinstance(linear.out, TensorSpec) or tuple(linear.out.shape) != (length, batch, 3 * width):
        return None
    chain += [clone, squeeze, permute, unsqueeze, view]
    dtype = linear.out.dtype
    first = _batch_first(linear, sdpa, ops, only, producer, (batch, length, width))
    in_rows = (batch, length) if first else (length, batch)
    projected = replace(linear, args=(first[2], *linear.args[1:]),
                        out=TensorSpec((*in_rows, 3 * width), dtype)) if first else linear
    split = Op(f"{sdpa.name}__heads", "aten.view.default", (Ref(linear.name), [*in_rows, 3, heads, head_dim]),
               {}, TensorSpec((*in_rows, 3, heads, head_dim), dtype), kind="alias")
    order = [2, 0, 3, 1, 4] if first else [2, 1, 3, 0, 4]
    qkv = Op(f"{sdpa.name}__qkv", "aten.permute.default", (Ref(split.name), order), {},
             TensorSpec((3, batch, heads, length, head_dim), dtype), kind="alias")
    names = [a.name for a in sdpa.args[:3]]
    selects = [Op(n, "aten.select.int", (Ref(qkv.name), 0, i), {}, ops[n].out, kind="alias")
               for i, n in enumerate(names)]
    at = [(linear, [projected, split, qkv, *selects])]
    handed = [(linear, names)]
    if first:
        first_ops, after, _ = first
        chain += first_ops
        at.append((first_ops[1], after))  # where attention's output is first read
        handed.append((first_ops[1], [after[-1].name]))
    return _Chain(chain, at, handed)


def _batch_first(linear: Op, sdpa: Op, ops: dict, only, producer, shape):
    """With batch_first, (ops removed, the ops that replace them, the block's [B, L, E] input) so both projections run on
    [B, L, E] rows: the transpose in front of the in-projection, and after attention the
    permute, view, out-projection, view and the transpose back, become attention's output
    transposed, its rows projected and viewed as [B, L, E] under the transpose's name."""
    batch, length, width = shape
    source = producer(linear.args[0], "aten.permute.default", [1, 0, 2])
    if source is None or not only(source.name) or not only(sdpa.name):
        return None
    users = {r: op for op in ops.values() for r in op.refs}
    heads_out = users.get(sdpa.name)
    rows = heads_out and users.get(heads_out.name)
    proj = rows and users.get(rows.name)
    back = proj and users.get(proj.name)
    final = back and users.get(back.name)
    if not final or producer(Ref(heads_out.name), "aten.permute.default", [2, 0, 1, 3]) is None or \
            producer(Ref(rows.name), "aten.view.default", [length * batch, width]) is None or \
            proj.target != LINEAR or proj.kwargs or proj.args[0] != Ref(rows.name) or \
            producer(Ref(back.name), "aten.view.default", [length, batch, width]) is None or \
            producer(Ref(final.name), "aten.permute.default", [1, 0, 2]) is None or \
            not all(only(op.name) for op in (heads_out, rows, proj, back)):
        return None
    dtype = proj.out.dtype
    d = sdpa.out.shape[-1]
    transposed = Op(f"{sdpa.name}__rows", "aten.transpose.int", (Ref(sdpa.name), 1, 2), {},
                    TensorSpec((batch, length, width // d, d), dtype), kind="alias")
    flat = Op(f"{sdpa.name}__flat", "aten.reshape.default", (Ref(transposed.name), [batch * length, width]),
              {}, TensorSpec((batch * length, width), dtype), kind="alias")
    projected = replace(proj, args=(Ref(flat.name), *proj.args[1:]))
    viewed = Op(final.name, "aten.view.default", (Ref(proj.name), [batch, length, width]), {},
                final.out, kind="alias")
    return [source, heads_out, rows, proj, back, final], [transposed, flat, projected, viewed], source.args[0]
