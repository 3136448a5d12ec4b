"""Device ops that are not ATen ops: paged attention over a block-table KV cache.

`rbln::paged_attention` is registered with torch.library so that torch.export keeps it as one
node (it becomes one fused attention kernel on the device). Its reference implementation is
functional (returns updated copies of the caches); the device kernel writes the caches in place,
which is equivalent because a compiled graph never reads a cache again after updating it.

Semantics, per sequence b and query token j with absolute position p = positions[b, j]
(p < 0 marks padding), with cache blocks of bs = k_cache.shape[2] tokens and the attention
partition P (a multiple of bs):
  1. the token's key/value go to block block_table[b, p // bs], slot p % bs;
  2. the query attends to every cached position <= p of its sequence (causal within a chunk),
     computed partition by partition: partition i gathers its P / bs blocks (block-table
     entries i * P / bs ...) into P consecutive keys, yields a partial softmax (max, sum,
     weighted values), and the partials are combined, as flash-decoding does on the chip.
Blocks smaller than a partition are what lets a serving engine's prefix cache share a prompt
prefix block by block; the arithmetic per partition is the same whatever the block size.
"""
from __future__ import annotations

import torch

from ..ir import resolve_target
from . import epilogues, gemm_threads, linear_rows, moe, quant, vendor_ops  # noqa: F401  register rbln::linear_weight_only, rbln::moe_*, rbln_custom_ops

NEG_INF = float("-inf")


@torch.library.custom_op("rbln::paged_attention", mutates_args=())
def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, block_table: torch.Tensor, positions: torch.Tensor,
                    partition_len: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    out = paged_attention_inplace(q, k, v, k_cache, v_cache, block_table, positions, partition_len, scale)
    return out[0], k_cache, v_cache


@paged_attention.register_fake
def _(q, k, v, k_cache, v_cache, block_table, positions, partition_len, scale):
    return q.new_empty(q.shape), torch.empty_like(k_cache), torch.empty_like(v_cache)


def _paged_shapes(q, k_cache, partition_len: int):
    """(b, heads, s, d, kv_heads, block_size, blocks per partition, query heads per KV head)."""
    b, heads, s, d = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    if partition_len % block_size:
        raise ValueError(f"paged_attention: cache blocks of {block_size} tokens must divide the "
                         f"partition length {partition_len}")
    return b, heads, s, d, kv_heads, block_size, partition_len // block_size, heads // kv_heads


def paged_attention_inplace(q, k, v, k_cache, v_cache, block_table, positions, partition_len: int,
                            scale: float):
    """Write the new keys/values into the caches (in place) and attend; returns
    (out, k_cache, v_cache) with the caches being the same tensors that were passed in."""
    b, heads, s, d, kv_heads, block_size, per_partition, group = _paged_shapes(q, k_cache, partition_len)
    positions = positions.long()
    block_table = block_table.long()
    valid = positions >= 0
    # 1. scatter the new tokens into their blocks
    bi, ji = valid.nonzero(as_tuple=True)
    if bi.numel():
        pos = positions[bi, ji]
        blocks = block_table[bi, pos // block_size]
        slots = pos % block_size
        k_cache[blocks, :, slots] = k[bi, :, ji].to(k_cache.dtype)
        v_cache[blocks, :, slots] = v[bi, :, ji].to(v_cache.dtype)
    # 2. attend partition by partition, combining partial softmaxes
    context = int(positions.max().item()) + 1 if bi.numel() else 0
    parts = max(1, -(-context // partition_len))
    if parts == 1 and context:
        keys, values = (_partition(cache, block_table, 0, per_partition, context).float()
                        for cache in (k_cache, v_cache))
        visible = torch.arange(context).view(1, 1, 1, -1) <= positions.view(b, 1, s, 1)
        out = one_partition_attention(q.float(), keys, values, visible, scale, blind_queries(visible))
        return out.to(q.dtype), k_cache, v_cache
    qf = q.float().view(b, kv_heads, group, s, d)
    m = torch.full((b, kv_heads, group, s, 1), NEG_INF)
    denom = torch.zeros((b, kv_heads, group, s, 1))
    acc = torch.zeros((b, kv_heads, group, s, d))
    for p in range(parts):
        width = min(partition_len, context - p * partition_len)        # keys anyone can see
        keys, values = (_partition(cache, block_table, p, per_partition, width).float()
                        for cache in (k_cache, v_cache))                # [b, kvh, width, d]
        key_pos = p * partition_len + torch.arange(width)
        scores = torch.einsum("bhgsd,bhpd->bhgsp", qf, keys) * scale
        visible = key_pos.view(1, 1, 1, 1, -1) <= positions.view(b, 1, 1, s, 1)
        scores = scores.masked_fill(~visible, NEG_INF)
        m, denom, acc = _merge_partition(m, denom, acc, scores, values, torch.einsum)
    out = torch.where(denom > 0, acc / denom.clamp_min(1e-30), torch.zeros_like(acc))
    return out.view(b, heads, s, d).to(q.dtype), k_cache, v_cache


def blind_queries(visible: torch.Tensor) -> torch.Tensor | None:
    """[b, 1, s, 1]: the queries that see no key of the partition (padding), or None if none."""
    blind = ~visible.any(-1, keepdim=True)
    return blind if bool(blind.any()) else None


def one_partition_attention(q, keys, values, visible, scale: float, blind=None) -> torch.Tensor:
    """Attention of queries whose keys all lie in the first partition: one partial softmax and
    nothing to combine, i.e. plain softmax attention, computed by PyTorch's fused CPU kernel
    (SDPA: flash attention, grouped-query heads without repeating K/V) in one call instead of
    about twenty small ops. q [b, heads, s, d]; keys, values [b, kv_heads, width, d]; visible
    [b, 1, s, width] (True: the query sees the key) or None when every query sees every key.
    A query that sees no key (padding: `blind`, from `blind_queries`) gets zeros, as the
    partitioned combination gives."""
    if visible is None:
        return _sdpa(q, keys, values, scale=scale, enable_gqa=True)
    out = _sdpa(q, keys, values, attn_mask=visible, scale=scale, enable_gqa=True)
    return out if blind is None else out.masked_fill_(blind, 0.0)


def _merge_partition(m, denom, acc, scores, values, einsum):
    """One partition's scores folded into the running softmax (max m, sum denom, output acc)."""
    m_new = torch.maximum(m, scores.amax(-1, keepdim=True))
    safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    weights = torch.exp(scores - safe)
    correction = torch.exp(torch.where(torch.isinf(m), torch.full_like(m, NEG_INF), m - safe))
    denom = denom * correction + weights.sum(-1, keepdim=True)
    acc = acc * correction + einsum("bhgsp,bhpd->bhgsd", weights, values)
    return m_new, denom, acc


def _partition(cache, block_table, p: int, per_partition: int, width: int) -> torch.Tensor:
    """The first `width` keys (or values) of partition p of every sequence, [b, kvh, width, d]:
    its blocks' slots laid end to end."""
    if per_partition == 1:
        return cache[block_table[:, p], :, :width]
    block_size = cache.shape[2]
    used = -(-width // block_size)                                      # blocks holding them
    blocks = block_table[:, p * per_partition:p * per_partition + used]  # [b, used]
    gathered = cache[blocks]                                            # [b, used, kvh, bs, d]
    b, _, kvh, _, d = gathered.shape
    return gathered.transpose(1, 2).reshape(b, kvh, used * block_size, d)[:, :, :width].contiguous()


class PagedPlan:
    """What every layer's paged attention in one run shares, derived once from the block tables
    and positions (the graph's inputs; every layer reads the same ones): which tokens are new
    and where they go, the context reached (the one host sync of the run), and per partition
    the blocks to gather and the keys each query must not see. The generated executor builds
    one per run (`PLANNED` below) and hands it to every layer's kernel; before, each layer
    re-derived all of it, syncing with the host each time. Pieces that depend on the cache's
    block size or the partition length are made at first use and kept by those."""

    def __init__(self, block_table: torch.Tensor, positions: torch.Tensor):
        self.positions = positions.long()
        self.block_table = block_table.long()
        self.bi, self.ji = (self.positions >= 0).nonzero(as_tuple=True)
        self.any = self.bi.numel() > 0
        self.new_pos = self.positions[self.bi, self.ji]
        # every row's every position is a new token (no padding): the new keys in nonzero order
        # are the rows laid end to end, a reshape instead of an index (a view for one token)
        self.dense = self.bi.numel() == self.positions.numel()
        self.context = int(self.positions.max().item()) + 1 if self.any else 0
        self._writes: dict[int, tuple] = {}
        self._parts: dict[tuple[int, int], list] = {}

    def writes(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(blocks, slots) of the new tokens (in nonzero order) for caches of this block size."""
        got = self._writes.get(block_size)
        if got is None:
            got = self._writes[block_size] = (
                self.block_table[self.bi, self.new_pos // block_size], self.new_pos % block_size)
        return got

    def partitions(self, block_size: int, partition_len: int) -> list:
        """(width, gather, hidden) per partition: the keys anyone can see, the block-table
        entries (per_partition 1) or columns to gather, and the mask of keys hidden from each
        query, [b, 1, 1, s, width] (None when it hides nothing)."""
        key = (block_size, partition_len)
        got = self._parts.get(key)
        if got is None:
            b, s = self.positions.shape
            per_partition = partition_len // block_size
            parts = max(1, -(-self.context // partition_len))
            got = []
            for p in range(parts):
                width = min(partition_len, self.context - p * partition_len)
                if per_partition == 1:
                    gather = self.block_table[:, p]
                else:
                    used = -(-width // block_size)
                    gather = self.block_table[:, p * per_partition:p * per_partition + used]
                key_pos = p * partition_len + torch.arange(width)
                visible = key_pos.view(1, 1, 1, 1, -1) <= self.positions.view(b, 1, 1, s, 1)
                hidden = ~visible
                # None when every query sees every key of the partition (the common decode
                # case): masking would change nothing, so the kernel skips it
                got.append((width, gather, hidden if bool(hidden.any()) else None))
            self._parts[key] = got
        return got

    def block(self, gather: torch.Tensor) -> int:
        """The one block id in `gather` (a partition's entry of a one-sequence table) as a
        Python int, read once per run: the single-partition kernel of a batch of one then views
        that block instead of copying it out with index_select. SDPA reads the strided keys and
        values to the same results (tests compare with torch.equal) and skips a copy per layer
        that grows with the context (at 1000 keys: 180 -> 100 us a layer, 1 thread)."""
        got = self._parts.get(("block", id(gather)))
        if got is None:
            got = self._parts[("block", id(gather))] = int(gather.reshape(-1)[0])
        return got

    def visible(self, block_size: int, partition_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first partition's mask as `one_partition_attention` takes it, [b, 1, s, width],
        and its queries that see no key (`blind_queries`), once per run for every layer."""
        key = ("visible", block_size, partition_len)
        got = self._parts.get(key)
        if got is None:
            width, _, hidden = self.partitions(block_size, partition_len)[0]
            b, s = self.positions.shape
            visible = ~hidden.view(b, 1, s, width)
            got = self._parts[key] = (visible, blind_queries(visible))
        return got


def paged_attention_planned(plan: PagedPlan, q, k, v, k_cache, v_cache, partition_len: int,
                            scale: float):
    """`paged_attention_inplace` with the run's shared work done once (`plan`): the same ATen
    arithmetic in the same order, so bit-identical results (tests compare with torch.equal).
    With one partition (a context within the first partition: short prompts, decode at small
    context) both take `one_partition_attention`."""
    b, heads, s, d, kv_heads, block_size, per_partition, group = _paged_shapes(q, k_cache, partition_len)
    if plan.any:
        blocks, slots = plan.writes(block_size)
        if k.dtype is not k_cache.dtype:
            k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        # the same writes as `cache[blocks, :, slots] = new[bi, :, ji]`, one call each
        _index_put_(k_cache, (blocks, None, slots), _new_tokens(plan, k))
        _index_put_(v_cache, (blocks, None, slots), _new_tokens(plan, v))
    parts = plan.partitions(block_size, partition_len)
    if len(parts) == 1 and plan.context:
        width, gather, hidden = parts[0]
        if per_partition == 1 and b == 1:  # one sequence, one block: attend to the block itself
            block = plan.block(gather)
            keys = k_cache[block].narrow(1, 0, width).unsqueeze(0).float()
            values = v_cache[block].narrow(1, 0, width).unsqueeze(0).float()
        else:
            keys = _gathered(k_cache, gather, per_partition, width).float()
            values = _gathered(v_cache, gather, per_partition, width).float()
        visible, blind = (None, None) if hidden is None else plan.visible(block_size, partition_len)
        out = one_partition_attention(q.float(), keys, values, visible, scale, blind)
        return out.to(q.dtype), k_cache, v_cache
    qf = q.float().view(b, kv_heads, group, s, d)
    m = torch.full((b, kv_heads, group, s, 1), NEG_INF)
    denom = torch.zeros((b, kv_heads, group, s, 1))
    acc = torch.zeros((b, kv_heads, group, s, d))
    for width, gather, hidden in parts:
        keys, values = (_gathered(cache, gather, per_partition, width).float()
                        for cache in (k_cache, v_cache))
        scores = _scores(qf, keys).mul_(scale)
        if hidden is not None:
            scores.masked_fill_(hidden, NEG_INF)
        m, denom, acc = _merge_partition(m, denom, acc, scores, values, _pair_einsum)
    out = torch.where(denom > 0, acc / denom.clamp_min(1e-30), _ZERO)
    return out.view(b, heads, s, d).to(q.dtype), k_cache, v_cache


_sdpa = torch.nn.functional.scaled_dot_product_attention
_linear = torch.ops.aten.linear.default._op
_convolution = torch.ops.aten.convolution.default._op
_max_pool2d = torch.ops.aten.max_pool2d_with_indices.default._op
_MKL_LOCAL = gemm_threads._mkl_local()
_einsum = torch._VF.einsum  # torch.einsum without its Python wrapper (two operands: no path search)
_ZERO = torch.zeros(())  # where()'s zeros: a 0-d float32 broadcasts as zeros_like did, no allocation
_index = torch.ops.aten.index.Tensor._op  # what `t[bi, :, ji]` calls, without the indexing parse
_index_put_ = torch.ops.aten.index_put_.default._op  # `t[blocks, :, slots] = ...` likewise


def _scores(qf, keys):
    """einsum("bhgsd,bhpd->bhgsp", qf, keys) as the one bmm einsum reduces it to: the same
    kernel on the same operands (tests/test_paged_plan.py checks torch.equal over layouts and
    sizes), without einsum's equation parsing. A single key (p == 1) takes einsum itself, which
    then multiplies instead of calling bmm."""
    b, h, g, s, d = qf.shape
    p = keys.shape[2]
    if p == 1:
        return _einsum("bhgsd,bhpd->bhgsp", (qf, keys))
    return torch.bmm(qf.reshape(b * h, g * s, d),
                     keys.reshape(b * h, p, d).transpose(1, 2)).view(b, h, g, s, p)


def _weighted(weights, values):
    """einsum("bhgsp,bhpd->bhgsd", weights, values) as its bmm (see `_scores`)."""
    b, h, g, s, p = weights.shape
    if p == 1:
        return _einsum("bhgsp,bhpd->bhgsd", (weights, values))
    d = values.shape[3]
    return torch.bmm(weights.reshape(b * h, g * s, p),
                     values.reshape(b * h, p, d)).view(b, h, g, s, d)


def _pair_einsum(equation: str, a, b):
    return _weighted(a, b) if equation == "bhgsp,bhpd->bhgsd" else _einsum(equation, (a, b))


def _new_tokens(plan: PagedPlan, new: torch.Tensor) -> torch.Tensor:
    """`new[bi, :, ji]` ([tokens, kvh, d], in nonzero order) of a [b, kvh, s, d] tensor."""
    if plan.dense:
        b, kvh, s, d = new.shape
        return new.transpose(1, 2).reshape(b * s, kvh, d)
    return _index(new, (plan.bi, None, plan.ji))


def _gathered(cache, gather, per_partition: int, width: int) -> torch.Tensor:
    """`_partition` with the partition's block-table entries already selected. One block per
    partition: `cache[gather, :, :width]` as index_select of the first `width` slots, the same
    contiguous copy without advanced indexing's overhead."""
    if per_partition == 1:
        return cache.narrow(2, 0, width).index_select(0, gather)
    block_size = cache.shape[2]
    gathered = cache[gather]                                            # [b, used, kvh, bs, d]
    b, used, kvh, _, d = gathered.shape
    return gathered.transpose(1, 2).reshape(b, kvh, used * block_size, d)[:, :, :width].contiguous()


def scalar_index(t: torch.Tensor) -> torch.Tensor:
    """`.item()` on the device: the scalar stays a 0-d tensor that the dynamic index (select,
    slice) reading it takes at run time."""
    return t.reshape(()).clone()


# Device kernels whose implementation differs from the op's reference one (same results).
DEVICE_IMPLS = {"rbln.paged_attention.default": paged_attention_inplace,
                "aten._local_scalar_dense.default": scalar_index,
                quant.TARGET: quant.linear_weight_only_device, **vendor_ops.DEVICE_IMPLS}


def linear_on_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`aten.linear` with the input's rows made contiguous first. ATen runs a linear whose 3-d
    input is a transposed view (MultiheadAttention's in-projection, batch_first) as a `bmm`
    against the weight expanded once per batch row, 1.5x slower here than copying the input
    and calling one `addmm` (1.10 vs 0.73 ms for a [64, 4, 256] x [256, 768] projection). The
    chip's DMA lays the operand out for the MAC array either way; only the FP32 accumulation
    order differs (max |diff| ~5e-5 before rounding to 16 bits), and neither order is the chip's.
    One to eight rows (decode) run in rebel's native kernel (linear_rows): one summation order
    for every row count, thread count and weight storage. The bias is added to the finished sum,
    as the chip's accumulator hands it on (`linear_tail`)."""
    return linear_tail(x, weight, bias)


def linear_tail(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                gelu: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`linear_on_rows`, then GELU when asked, then the rounding to dtype when given: the product
    first, then bias, GELU and rounding in one pass over it (`epilogues.tail`), where addmm would
    copy the bias into the output before the GEMM and GELU and the rounding take a pass each. The
    generated executor calls this for a kernel that ends so (`tail_fusion`); the interpreter's
    op-by-op result is the same bit for bit."""
    few = linear_rows.linear(x, weight, bias)
    if few is not None:
        return epilogues.tail(few, None, gelu, dtype) if gelu or dtype is not None else few
    if x.dim() > 2 and not x.is_contiguous():
        x = x.contiguous()
    count = gemm_threads.COUNT
    if count is not None and _MKL_LOCAL is not None and x.numel() > x.shape[-1]:
        previous = _MKL_LOCAL(count)  # more than one row: a machine-fixed count (gemm_threads)
        try:
            y = _linear(x, weight)
        finally:
            _MKL_LOCAL(previous)
    else:
        y = _linear(x, weight)
    return epilogues.tail(y, bias, gelu, dtype) if bias is not None or gelu or dtype is not None else y


def convolution_at_fixed_threads(*args):
    """`aten.convolution` at the machine-fixed thread count multi-row products use
    (gemm_threads): oneDNN blocks a convolution by the thread count, and measured here a
    [1, 320, 8, 8] x [320, 320, 3, 3] convolution differs in its last bits at 1 and 2 threads, so
    a UNet's output followed the machine's load. On an idle machine the run's count is that
    count already and nothing changes."""
    count, now = gemm_threads.COUNT, torch.get_num_threads()
    if count is None or count == now:
        return _convolution(*args)
    torch.set_num_threads(count)
    try:
        return _convolution(*args)
    finally:
        torch.set_num_threads(now)


def max_pool2d_with_indices(x: torch.Tensor, *args, **kwargs):
    """`aten.max_pool2d_with_indices` through ATen's channels-last kernel: its NCHW one is 1.5-3x
    slower (measured here: [1, 32, 64, 64] 2x2 299 vs 186 us with both layout copies, ResNet's
    [8, 64, 56, 56] 3x3/2 5.7 vs 1.9 ms). A maximum picks an input value and its index, so the
    results are the same. Below 8 channels (an image's 3) the two are even, and NCHW stays."""
    if x.dim() == 4 and x.shape[1] >= 8 and x.dtype is torch.float32 and x.is_contiguous():
        values, indices = _max_pool2d(x.contiguous(memory_format=torch.channels_last), *args, **kwargs)
        return values.contiguous(), indices.contiguous()
    return _max_pool2d(x, *args, **kwargs)


# Kernels that compute what their op computes, a faster way (to float32 ulps: the linear adds its
# bias last, GELU and the norms are rebel's own, see epilogues): a new tensor like the op's, so the
# op's rounding and aliasing rules still hold (unlike DEVICE_IMPLS, which may update in place).
FASTER_IMPLS = {"aten.linear.default": linear_on_rows, "aten.gelu.default": epilogues.gelu,
                "aten.native_layer_norm.default": epilogues.native_layer_norm,
                "aten._native_batch_norm_legit_no_training.default": epilogues.batch_norm,
                "aten.convolution.default": convolution_at_fixed_threads,
                "aten.max_pool2d_with_indices.default": max_pool2d_with_indices}
# In-place forms of FASTER_IMPLS that generated code may write over a dying operand with.
FASTER_IN_PLACE = {"aten.gelu.default": epilogues.gelu_}


def device_fn(target: str):
    """The callable a device kernel runs for `target`."""
    return DEVICE_IMPLS.get(target) or FASTER_IMPLS.get(target) or resolve_target(target)


# Results of those kernels that are their inputs updated in place (indices into the output tuple).
INPLACE_RESULTS = {"rbln.paged_attention.default": (1, 2), **vendor_ops.INPLACE_RESULTS}
# Results that are new memory no input shares (attention's output: SDPA's or the partitions'
# combination), which generated code may round where they lie instead of copying them.
FRESH_RESULTS = {"rbln.paged_attention.default": (0,)}
# Kernels whose per-run shared work the generated executor does once per run: target ->
# (make the plan from these argument positions, kernel(plan, other arguments in order)).
PLANNED = {"rbln.paged_attention.default": (PagedPlan, (5, 6), paged_attention_planned)}
