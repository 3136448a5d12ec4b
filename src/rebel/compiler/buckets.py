"""Shape buckets: one compiled model, several static input shapes.

The chip runs static shapes, so a model that must serve several shapes (batch sizes, sequence
lengths, a prefill and a decode step) is compiled once per shape: each shape is a *bucket* with
its own program. The buckets share one set of weights in device DRAM and one set of persistent
buffers (a KV cache written by a prefill bucket is read by a decode bucket). At run time the
bucket whose input specs equal the inputs' runs; no padding is implied.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import CompileError, InputError
from ..ir import Graph, Ref, TensorSpec


def split_buckets(example_inputs) -> list[list]:
    """`[t1, t2]` is one bucket; `[[t1, t2], [u1, u2]]` (a list of input lists) is two."""
    if isinstance(example_inputs, (list, tuple)) and example_inputs and all(
            isinstance(x, (list, tuple)) for x in example_inputs):
        return [list(x) for x in example_inputs]
    return [example_inputs]


def merge_weights(graph: Graph, shared: dict[str, torch.Tensor], index: int) -> None:
    """Add `graph`'s weights to `shared` (the weights of earlier buckets).

    Parameters are the same tensors in every bucket, so they are stored once. A constant the
    compiler folded at one bucket's shape (e.g. a position table sliced to the sequence length)
    may share its name with a different tensor in another bucket: it is renamed, in this
    bucket's graph, to `<name>@bucket<index>`. Persistent (mutable) buffers are shared state and
    must agree across buckets.
    """
    renames: dict[str, str] = {}
    for name, tensor in list(graph.weights.items()):
        other = shared.get(name)
        if other is None:
            shared[name] = tensor
        elif not _same(other, tensor):
            if name in graph.mutable_buffers:
                raise CompileError(f"persistent buffer {name!r} is {TensorSpec.of(tensor)} in bucket "
                                   f"{index} but {TensorSpec.of(other)} in an earlier bucket; "
                                   "buckets share persistent buffers, so they must agree")
            renames[name] = f"{name}@bucket{index}"
    if renames:
        _rename(graph, renames)
        for old, new in renames.items():
            shared[new] = graph.weights[new]


def check_distinct(specs: list[list[TensorSpec]]) -> None:
    seen: dict[tuple, int] = {}
    for i, bucket in enumerate(specs):
        key = tuple(bucket)
        if key in seen:
            raise CompileError(f"buckets {seen[key]} and {i} have the same input shapes "
                               f"{[str(s) for s in bucket]}; give each bucket different shapes")
        seen[key] = i


def select_bucket(buckets: Sequence[list[tuple[str, TensorSpec]]], got: list[TensorSpec]) -> int:
    """Index of the bucket whose input specs equal `got`; InputError listing them all if none."""
    for i, inputs in enumerate(buckets):
        if [s for _, s in inputs] == got:
            return i
    listed = "; ".join(f"bucket {i}: ({', '.join(str(s) for _, s in inputs)})"
                       for i, inputs in enumerate(buckets))
    raise InputError(f"inputs ({', '.join(str(s) for s in got)}) match no compiled shape bucket. "
                     f"Compiled buckets: {listed}. Shapes are static on the device: pad the "
                     "inputs to a bucket's shape or compile with an example-input set of this shape")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_meta or b.is_meta:
        return True  # no values to compare: same name and spec is the same weight
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return bool(torch.equal(a, b))


def _rename(graph: Graph, renames: dict[str, str]) -> None:
    def sub(value):
        if isinstance(value, Ref):
            return Ref(renames.get(value.name, value.name))
        if isinstance(value, list):
            return [sub(v) for v in value]
        if isinstance(value, tuple):
            return tuple(sub(v) for v in value)
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        return value

    for op in graph.ops:
        op.args, op.kwargs = sub(op.args), sub(op.kwargs)
    graph.outputs = [sub(o) for o in graph.outputs]
    graph.weights = {renames.get(n, n): t for n, t in graph.weights.items()}
