"""Compile time grows linearly with graph size: no pass may scan the whole graph per op.

The passes after capture (fold, partition, fusion, scheduling) run on a synthetic IR graph, so
torch.export's own cost does not blur the measurement. Worst case for the scheduler: every
other op falls back to the host, making many small segments."""
from __future__ import annotations

import time

import torch

from rebel.compiler.compile import lower_graph
from rebel.ir import Graph, Op, Ref, TensorSpec
from rebel.npu import load_spec


def _chain(n: int) -> Graph:
    spec = TensorSpec((64, 64), "float32")
    ops, prev = [], "input_1"
    for i in range(n):
        target = "aten.atan.default" if i % 7 == 3 else ("aten.mm.default" if i % 3 == 0 else "aten.relu.default")
        args = (Ref(prev), Ref("w")) if target == "aten.mm.default" else (Ref(prev),)
        ops.append(Op(f"op{i}", target, args, {}, spec, target.split(".")[1]))
        prev = f"op{i}"
    return Graph([("input_1", spec)], {"w": torch.zeros(64, 64)}, ops, [Ref(prev)],
                 torch.utils._pytree.treespec_dumps(torch.utils._pytree.tree_structure(torch.zeros(1))))


def _seconds(n: int) -> float:
    spec = load_spec("RBLN-CA12")
    best = float("inf")
    for _ in range(2):
        graph = _chain(n)
        start = time.perf_counter()
        lower_graph(graph, spec, "float16")
        best = min(best, time.perf_counter() - start)
    return best


def test_lowering_time_is_linear_in_graph_size():
    small, large = _seconds(500), _seconds(4000)
    # 8x the ops: linear passes take ~8x; a quadratic one would take ~64x.
    assert large < 24 * small, (small, large)
