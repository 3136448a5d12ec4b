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


@pytest.mark.parametrize("block", [P, P // 4])
@pytest.mark.parametrize("contexts,s", [([9], 1), ([0], 1), ([40, 40], 1), ([1], 1), ([3], 4)])
def test_planned_unmasked_and_single_key_equal_reference(block, contexts, s):
    """Runs where no query has a key hidden (the plan skips the mask), and a first token whose
    partition holds one key (einsum itself, not its bmm), against the reference kernel."""
    g = torch.Generator().manual_seed(sum(contexts) + s + block)
    b, per_seq = len(contexts), 4 * P // block
    table = torch.randperm(b * per_seq, generator=g).view(b, per_seq)
    positions = torch.tensor([[c + j for j in range(s)] for c in contexts])
    shape = (b * per_seq, KV_HEADS, block, D)
    base_k, base_v = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    q = torch.randn(b, s, HEADS, D, generator=g).transpose(1, 2)  # the layout the graphs pass
    k, v = torch.randn(b, KV_HEADS, s, D, generator=g), torch.randn(b, KV_HEADS, s, D, generator=g)
    ref_k, ref_v, new_k, new_v = base_k.clone(), base_v.clone(), base_k.clone(), base_v.clone()
    want = paged_attention_inplace(q, k, v, ref_k, ref_v, table, positions, P, D ** -0.5)[0]
    got = paged_attention_planned(PagedPlan(table, positions), q, k, v, new_k, new_v, P, D ** -0.5)[0]
    assert torch.equal(got, want)
    assert torch.equal(new_k, ref_k) and torch.equal(new_v, ref_v)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("b,kvh,group,s,d,p", [(1, 3, 3, 1, 64, 41), (4, 3, 3, 1, 64, 7),
                                                (1, 3, 3, 64, 64, 64), (2, 1, 1, 5, 32, 300),
                                                (4, 2, 4, 2, 1, 2), (1, 3, 3, 1, 64, 1)])
def test_bmm_forms_equal_einsum(transposed, b, kvh, group, s, d, p):
    """The planned kernel's two products are the bmm einsum reduces them to: equal bit for bit
    to torch.einsum over query layouts (contiguous, or [b, s, h, d] transposed) and sizes."""
    from rebel.device.ops import _scores, _weighted

    g = torch.Generator().manual_seed(b * 1000 + s * 10 + p)
    h = kvh * group
    q = torch.randn(b, s, h, d, generator=g).transpose(1, 2) if transposed else \
        torch.randn(b, h, s, d, generator=g)
    qf = q.view(b, kvh, group, s, d)
    keys = torch.randn(b, kvh, p, d, generator=g)
    weights = torch.rand(b, kvh, group, s, p, generator=g)
    assert torch.equal(_scores(qf, keys), torch.einsum("bhgsd,bhpd->bhgsp", qf, keys))
    assert torch.equal(_weighted(weights, keys), torch.einsum("bhgsp,bhpd->bhgsd", weights, keys))
