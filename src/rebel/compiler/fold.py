"""Constant folding: ops whose inputs are all weights run once at compile time.

`nn.Linear` exports as addmm(bias, x, permute(weight)); folding stores the transposed weight, so
the device never spends a kernel on it at run time. Ops that create tensors from nothing (full,
arange) are left alone: they cost little on the device and could be large to store.
"""
from __future__ import annotations

import torch

from ..ir import Graph, resolve_target, substitute

# Ops whose result depends on more than their inputs must never be folded.
_NONDETERMINISTIC = ("rand", "randn", "randint", "bernoulli", "dropout", "normal", "uniform",
                     "multinomial", "empty")


def fold_constants(graph: Graph) -> Graph:
    constant = set(graph.weights) - graph.mutable_buffers
    ops = []
    for op in graph.ops:
        refs = op.refs
        foldable = (refs and all(r in constant for r in refs)
                    and not op.target.split(".")[1].startswith(_NONDETERMINISTIC))
        if foldable:
            value = resolve_target(op.target)(*substitute(op.args, graph.weights),
                                              **substitute(op.kwargs, graph.weights))
            if isinstance(value, torch.Tensor):
                graph.weights[op.name] = value.detach().contiguous()
                constant.add(op.name)
                continue
        ops.append(op)
    graph.ops = ops
    _drop_unused_weights(graph)
    return graph


def _drop_unused_weights(graph: Graph) -> None:
    used = {r for op in graph.ops for r in op.refs}
    used |= {o.name for o in graph.outputs if hasattr(o, "name")}
    used |= set(graph.mutable_buffers)
    for name in list(graph.weights):
        if name not in used:
            del graph.weights[name]
