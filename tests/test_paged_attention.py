"""`rbln::paged_attention` with KV-cache blocks smaller than the attention partition: the same
tokens cached in blocks of P / 4 (scattered over the cache in any order) give the same attention
as blocks of a whole partition, and both agree with plain causal attention."""
from __future__ import annotations

import pytest
import torch

from rebel.device.ops import paged_attention_inplace

HEADS, KV_HEADS, D, P = 4, 2, 16, 32
SEQ = 4 * P  # four partitions per sequence


def tables(batch: int, block: int, seed: int) -> torch.Tensor:
    """Each sequence's blocks, drawn in a shuffled order from one shared cache."""
    per_seq = SEQ // block
    order = torch.randperm(batch * per_seq, generator=torch.Generator().manual_seed(seed))
    return order.view(batch, per_seq)


def caches(batch: int, block: int):
    shape = (batch * SEQ // block, KV_HEADS, block, D)
    return torch.zeros(shape), torch.zeros(shape)


def run(q, k, v, cache, table, positions):
    out, _, _ = paged_attention_inplace(q, k, v, *cache, table, positions, P, D ** -0.5)
    return out


def reference(q, keys, values, positions):
    """Softmax attention of each query over keys 0..its position, in float64."""
    group = HEADS // KV_HEADS
    keys, values = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)
    scores = torch.einsum("bhsd,bhtd->bhst", q.double(), keys) * D ** -0.5
    visible = torch.arange(keys.shape[2]).view(1, 1, 1, -1) <= positions.view(q.shape[0], 1, -1, 1)
    return torch.einsum("bhst,bhtd->bhsd", scores.masked_fill(~visible, float("-inf")).softmax(-1),
                        values)


@pytest.mark.parametrize("block", [P // 4, P // 2])
def test_sub_blocks_attend_as_whole_partition_blocks(block):
    """A prefill of 70 tokens (past two partitions) in two chunks, then decode steps of a batch
    of 3 at different contexts: outputs of blocks of `block` tokens equal those of blocks of P."""
    g = torch.Generator().manual_seed(0)
    batch, length = 3, 70
    keys = torch.randn(batch, KV_HEADS, SEQ, D, generator=g)
    values = torch.randn(batch, KV_HEADS, SEQ, D, generator=g)
    queries = torch.randn(batch, HEADS, SEQ, D, generator=g)
    whole, small = caches(batch, P), caches(batch, block)
    t_whole, t_small = tables(batch, P, 1), tables(batch, block, 2)
    for b in range(batch):  # prefill: one sequence, chunks of 40 and 30 tokens
        for start, end in ((0, 40), (40, length)):
            args = (queries[b:b + 1, :, start:end], keys[b:b + 1, :, start:end],
                    values[b:b + 1, :, start:end])
            positions = torch.arange(start, end).view(1, -1)
            a = run(*args, whole, t_whole[b:b + 1], positions)
            c = run(*args, small, t_small[b:b + 1], positions)
            assert torch.equal(a, c)
            expected = reference(queries[b:b + 1, :, start:end], keys[b:b + 1, :, :end],
                                 values[b:b + 1, :, :end], positions)
            assert (a.double() - expected).abs().max() < 1e-5
    contexts = torch.tensor([length, length + 20, length + 1])  # rows reach different partitions
    for step in range(3):
        positions = (contexts + step).clamp(max=SEQ - 1).view(batch, 1)
        index = positions.view(batch, 1, 1, 1).expand(batch, HEADS, 1, D)
        kv_index = positions.view(batch, 1, 1, 1).expand(batch, KV_HEADS, 1, D)
        args = (queries.gather(2, index), keys.gather(2, kv_index), values.gather(2, kv_index))
        if step == 0:  # rows whose decode skips ahead: fill the positions they skipped
            for b in range(batch):
                gap = torch.arange(length, int(positions[b])).view(1, -1)
                if gap.numel():
                    fill = (queries[b:b + 1, :, gap[0]], keys[b:b + 1, :, gap[0]], values[b:b + 1, :, gap[0]])
                    run(*fill, whole, t_whole[b:b + 1], gap)
                    run(*fill, small, t_small[b:b + 1], gap)
        a = run(*args, whole, t_whole, positions)
        c = run(*args, small, t_small, positions)
        assert torch.equal(a, c)
        for b in range(batch):
            end = int(positions[b]) + 1
            expected = reference(args[0][b:b + 1], keys[b:b + 1, :, :end], values[b:b + 1, :, :end],
                                 positions[b:b + 1])
            assert (a[b:b + 1].double() - expected).abs().max() < 1e-5


def test_token_lands_in_its_sub_block():
    """Position p goes to block table[p // bs], slot p % bs."""
    block = P // 4
    cache = caches(1, block)
    table = tables(1, block, 3)
    k = torch.randn(1, KV_HEADS, 1, D)
    for p in (0, block - 1, block, P + 3, SEQ - 1):
        run(torch.randn(1, HEADS, 1, D), k, k, cache, table, torch.tensor([[p]]))
        assert torch.equal(cache[0][table[0, p // block], :, p % block], k[0, :, 0])


def test_block_that_does_not_divide_the_partition_is_refused():
    cache = (torch.zeros(8, KV_HEADS, 12, D),) * 2
    with pytest.raises(ValueError, match="blocks of 12 tokens must divide the partition length 32"):
        run(torch.randn(1, HEADS, 1, D), torch.randn(1, KV_HEADS, 1, D), torch.randn(1, KV_HEADS, 1, D),
            cache, torch.zeros(1, 8, dtype=torch.long), torch.tensor([[0]]))
