"""Constant folding: ops whose inputs are all weights run once at compile time.

A weight scaled, cast or combined with another becomes one stored weight, so the device never
spends a kernel on it at run time. Folding never stores more bytes than the op reads: an
`expand` (or `repeat`) of a weight stays an op, since the device reads the small weight and
broadcasts it for free while a folded copy would take DRAM per broadcast row. Ops that create
tensors from nothing (full, arange) are left alone for the same reason.
"""
from __future__ import annotations

import torch

from ..ir import Graph, TensorSpec, resolve_target, substitute

# Ops whose result depends on more than their inputs must never be folded.
_NONDETERMINISTIC = ("rand", "randn", "randint", "bernoulli", "dropout", "normal", "uniform",
                     "multinomial", "empty")


_DEVICE_FLOAT = "float16"  # every device float format is 16 bits wide


def fold_constants(graph: Graph) -> Graph:
    constant = set(graph.weights) - graph.mutable_buffers
    ops = []
    for op in graph.ops:
        refs = op.refs
        foldable = (refs and all(r in constant for r in refs)
                    and not op.target.split(".")[1].startswith(_NONDETERMINISTIC)
                    and not _grows(op, graph.weights))
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


def _grows(op, weights: dict[str, torch.Tensor]) -> bool:
    """Whether the op's results hold more bytes than the weights it reads, as the device stores
    them (floats in 16 bits, so a cast to FP32 does not count as growth). From the traced output
    specs, so nothing large is computed to find out."""
    specs = op.out_specs
    if not specs:
        return False
    read = sum(TensorSpec.of(weights[r]).nbytes(_DEVICE_FLOAT) for r in set(op.refs))
    return sum(s.nbytes(_DEVICE_FLOAT) for s in specs) > read


def _drop_unused_weights(graph: Graph) -> None:
    used = {r for op in graph.ops for r in op.refs}
    used |= {o.name for o in graph.outputs if hasattr(o, "name")}
    used |= set(graph.mutable_buffers)
    for name in list(graph.weights):
        if name not in used:
            del graph.weights[name]
