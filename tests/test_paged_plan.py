"""The generated executor's paged attention (`paged_attention_planned`, with the run's block
indices and context computed once in a `PagedPlan`) equals the reference kernel bit for bit:
shuffled block tables, mixed contexts, padding, one and several partitions, sub-blocks."""
from __future__ import annotations

import pytest
import torch

from rebel.device.ops import PagedPlan, paged_attention_inplace, paged_attention_planned

HEADS, KV_HEADS, D, P = 4, 2, 16, 32


@pytest.mark.parametrize("block", [P, P // 4])
@pytest.mark.parametrize("contexts,s", [([5, 0, 17], 1), ([70, 3, 31], 1), ([0], 12), ([40], 30)])
def test_planned_equals_reference(block, contexts, s):
    g = torch.Generator().manual_seed(len(contexts) * 7 + s + block)
    b, per_seq = len(contexts), 4 * P // block
    table = torch.randperm(b * per_seq, generator=g).view(b, per_seq)
    positions = torch.tensor([[c + j for j in range(s)] for c in contexts])
    positions[0, s // 2:] = -1 if s > 1 else positions[0, s // 2:]  # padding in a chunk
    shape = (b * per_seq, KV_HEADS, block, D)
    base_k, base_v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    q = torch.randn(b, HEADS, s, D, generator=g)
    k, v = torch.randn(b, KV_HEADS, s, D, generator=g), torch.randn(b, KV_HEADS, s, D, generator=g)
    ref_k, ref_v, new_k, new_v = base_k.clone(), base_v.clone(), base_k.clone(), base_v.clone()
    want = paged_attention_inplace(q, k, v, ref_k, ref_v, table, positions, P, D ** -0.5)[0]
    plan = PagedPlan(table, positions)
    for _ in range(2):  # the plan serves every layer of a run
        got = paged_attention_planned(plan, q, k, v, new_k, new_v, P, D ** -0.5)[0]
        assert torch.equal(got, want)
        assert torch.equal(new_k, ref_k) and torch.equal(new_v, ref_v)
