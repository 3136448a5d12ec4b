"""The vendor compiler's custom ops, `torch.ops.rbln_custom_ops.*`, as the virtual NPU runs them.

The vendor's optimum-rbln calls these from its model wrappers (decoder-only, seq2seq, Whisper,
T5, MoE) and expects them to exist once `rebel` is imported. Each is a torch.library op with a
fake kernel (torch.export keeps it as one node; meta tensors compile) and an FP32 reference
kernel. Attention ops update their KV caches in place, as the vendor's callers rely on.

Calling convention (shapes as the vendor passes them):
  q [B, kv_heads, group, S, D]; k, v [B, kv_heads, 1, S, D];
  kcache, vcache [num_blocks, kv_heads, 1, block_size, D] (updated in place);
  seq [B, 1]: position of the first of the S new tokens; scale: 0-d tensor;
  block_table [B, blocks_per_seq] (or [blocks_per_seq] for a one-sequence prefill);
  block_size: tokens per cache block. The result is shaped like q.
Token i of sequence b sits at position p = seq[b] + i, in block block_table[b, p // block_size]
at slot p % block_size. Keys beyond the sequence's context (seq[b] + S) are never attended.

Visibility per family:
  paged_attn_*           mask (0/1, broadcast to [B, kv_heads, group, S, keys]) decides;
  paged_causal_attn_*    key j visible to token i iff j <= seq + i (every chunk key if
                         is_bidirectional), and also mask != 0 where a padding mask is given;
  paged_add_softmax_*    every key of the context, scores plus an additive mask (T5's bias);
  paged_sliding_window_* a rolling cache of the last block_size tokens (see _sliding).
`paged_flash_*` compute the same thing partition by partition (`partition` keys at a time,
partial softmaxes combined), as flash-decoding does on the chip. `_kv_fp8` variants keep
caches in float8_e4m3fn, storing k / k_scale and reading cache * k_scale. `s_aux` (attention
sinks, one logit per query head) joins every softmax's denominator.

The compiler lowers each mutating op to a functional IR op returning (out, kcache, vcache); its
device kernel (`DEVICE_IMPLS`) writes the caches in place and returns them (`INPLACE_RESULTS`),
like `rbln::paged_attention` in rebel.device.ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NAMESPACE = "rbln_custom_ops"
NEG_INF = float("-inf")
FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class AttentionSpec:
    """One vendor attention op: its schema and what its arguments mean."""

    name: str
    family: str          # "masked", "causal", "additive", "sliding"
    phase: str           # "prefill" or "decode"
    flash: bool = False
    fp8: bool = False

    @property
    def params(self) -> list[str]:
        """Argument names in schema order (positional callers rely on it)."""
        if self.family == "sliding":
            head = ["q", "k", "v", "kcache", "vcache", "cache_seq_len", "cache_offset", "scale",
                    "block_table", "block_size"]
            return head + ["is_bidirectional", "attn_mask", "s_aux"]
        head = ["q", "k", "v", "mask", "kcache", "vcache"] if self.family in ("masked", "additive") \
            else ["q", "k", "v", "kcache", "vcache"]
        head += ["seq", "scale", "block_table", "block_size"]
        if self.flash:
            head.append("partition")
        if self.fp8:
            head += ["k_scale", "v_scale"]
        tail = ["is_bidirectional"] if self.phase == "prefill" else []
        if self.family == "causal":
            tail.append("mask")
        return head + tail + ["s_aux"]

    def schema(self) -> str:
        types = {"kcache": "Tensor(a!)", "vcache": "Tensor(b!)", "block_size": "int",
                 "partition": "int", "is_bidirectional": "bool"}
        defaults = {"is_bidirectional": "=False"}
        optional = {"mask", "attn_mask", "s_aux"} if self.family != "masked" else {"s_aux"}
        if self.family == "additive":
            optional = set()
        args = []
        for p in self.params:
            if p in types:
                args.append(f"{types[p]} {p}{defaults.get(p, '')}")
            elif p in optional:
                args.append(f"Tensor? {p}=None")
            else:
                args.append(f"Tensor {p}")
        return f"{self.name}({', '.join(args)}) -> Tensor"


def _attention_specs() -> list[AttentionSpec]:
    specs = []
    for phase in ("prefill", "decode"):
        for fp8 in (False, True):
            suffix = f"_{phase}" + ("_kv_fp8" if fp8 else "")
            specs += [AttentionSpec(f"paged_attn{suffix}", "masked", phase, fp8=fp8),
                      AttentionSpec(f"paged_causal_attn{suffix}", "causal", phase, fp8=fp8),
                      AttentionSpec(f"paged_flash_attn{suffix}", "masked", phase, True, fp8),
                      AttentionSpec(f"paged_flash_causal_attn{suffix}", "causal", phase, True, fp8)]
        specs.append(AttentionSpec(f"paged_sliding_window_attn_{phase}", "sliding", phase))
    specs.append(AttentionSpec("paged_add_softmax_attn_decode", "additive", "decode"))
    return specs


ATTENTION = {s.name: s for s in _attention_specs()}


# --- reference kernels (FP32) -------------------------------------------------------------------

def _tables(block_table: torch.Tensor, batch: int) -> torch.Tensor:
    table = block_table.long()
    if table.dim() == 1:
        table = table.unsqueeze(0)
    if table.shape[0] != batch:
        table = table.expand(batch, -1) if table.shape[0] == 1 else table
    return table


def _start(seq: torch.Tensor, batch: int) -> torch.Tensor:
    start = seq.long().reshape(seq.shape[0], -1)[:, 0] if seq.dim() else seq.long().reshape(1)
    return start.expand(batch) if start.numel() == 1 and batch > 1 else start


def _store(value: torch.Tensor, scale, fp8: bool, cache_dtype: torch.dtype) -> torch.Tensor:
    """Keys/values as the cache holds them: FP8 caches hold value / scale rounded to FP8."""
    if not fp8:
        return value.to(cache_dtype)
    return (value.float() / scale.float()).to(FP8).to(cache_dtype)


def _load(cache_rows: torch.Tensor, scale, fp8: bool) -> torch.Tensor:
    rows = cache_rows.float()
    return rows * scale.float() if fp8 else rows


def _write(cache, new, start, table, block_size, scale=None, fp8=False, count=None):
    """Scatter new[b, :, 0, i] to position start[b] + i (i < count[b]) of sequence b's blocks."""
    batch, _, _, s, _ = new.shape
    capacity = table.shape[1] * block_size
    for b in range(batch):
        n = s if count is None else int(count[b])
        pos = int(start[b]) + torch.arange(n)
        keep = (pos >= 0) & (pos < capacity)
        pos, idx = pos[keep], torch.arange(n)[keep]
        if pos.numel():
            blocks = table[b, pos // block_size]
            cache[blocks, :, 0, pos % block_size] = _store(
                new[b, :, 0, idx].transpose(0, 1), scale, fp8, cache.dtype)


def _gather(cache, table, scale=None, fp8=False) -> torch.Tensor:
    """Every key slot of each sequence, in position order: [B, kv_heads, blocks*block_size, D]."""
    rows = cache[table][:, :, :, 0]            # [B, n, kvh, bs, D]
    b, n, h, bs, d = rows.shape
    return _load(rows.permute(0, 2, 1, 3, 4).reshape(b, h, n * bs, d), scale, fp8)


def _softmax_attend(q, keys, values, visible, scale, additive=None, s_aux=None, partition=None):
    """softmax(q k^T * scale [+ additive]) v over visible keys, in FP32; with `partition`, key
    partitions are reduced one at a time and their partial softmaxes combined (flash-style).
    q [B,H,G,S,D], keys/values [B,H,L,D], visible broadcastable to [B,H,G,S,L]."""
    b, h, g, s, d = q.shape
    length = keys.shape[2]
    qf = q.float()
    m = torch.full((b, h, g, s, 1), NEG_INF)
    denom = torch.zeros((b, h, g, s, 1))
    acc = torch.zeros((b, h, g, s, d))
    if s_aux is not None:  # a sink: one extra logit per query head, attending to nothing
        m = s_aux.float().reshape(1, h, g, 1, 1).expand(b, h, g, s, 1).clone()
        denom = torch.ones((b, h, g, s, 1))
    step = partition or max(length, 1)
    visible = visible.expand(b, h, g, s, length)
    for lo in range(0, length, step):
        hi = min(length, lo + step)
        scores = torch.einsum("bhgsd,bhld->bhgsl", qf, keys[:, :, lo:hi]) * float(scale)
        if additive is not None:
            scores = scores + additive[..., lo:hi].float()
        scores = scores.masked_fill(~visible[..., lo:hi], NEG_INF)
        m_new = torch.maximum(m, scores.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        weights = torch.exp(scores - safe)
        correction = torch.exp(torch.where(torch.isinf(m), torch.full_like(m, NEG_INF), m - safe))
        denom = denom * correction + weights.sum(-1, keepdim=True)
        acc = acc * correction + torch.einsum("bhgsl,bhld->bhgsd", weights, values[:, :, lo:hi])
        m = m_new
    return torch.where(denom > 0, acc / denom.clamp_min(1e-30), torch.zeros_like(acc))


def _mask5(mask: torch.Tensor, length: int) -> torch.Tensor:
    """A vendor mask ([B, L], [B, 1, S, L] or [B, 1, 1|G, S, L]) as [B, 1, 1|G, S|1, length]."""
    if mask.dim() == 2:
        mask = mask[:, None, None, None, :]
    elif mask.dim() == 3:
        mask = mask[:, None, None]
    elif mask.dim() == 4:
        mask = mask.unsqueeze(2)
    width = mask.shape[-1]
    if width >= length:
        return mask[..., :length]
    pad = torch.zeros((*mask.shape[:-1], length - width), dtype=mask.dtype)
    return torch.cat([mask, pad], -1)


def paged_attention_kernel(spec: AttentionSpec, a: dict) -> torch.Tensor:
    """Write the new keys/values into the caches (in place) and attend; returns the output."""
    if spec.family == "sliding":
        return _sliding(spec, a)
    q, k, v, kcache, vcache = a["q"], a["k"], a["v"], a["kcache"], a["vcache"]
    b, h, g, s, d = q.shape
    table, start = _tables(a["block_table"], b), _start(a["seq"], b)
    block_size = int(a["block_size"])
    ks, vs = a.get("k_scale"), a.get("v_scale")
    _write(kcache, k, start, table, block_size, ks, spec.fp8)
    _write(vcache, v, start, table, block_size, vs, spec.fp8)
    keys, values = _gather(kcache, table, ks, spec.fp8), _gather(vcache, table, vs, spec.fp8)
    length = keys.shape[2]
    key_pos = torch.arange(length).view(1, 1, 1, 1, -1)
    context = (start + s).view(b, 1, 1, 1, 1)
    visible = key_pos < context
    additive = None
    if spec.family == "causal":
        if not a.get("is_bidirectional", False):
            visible = visible & (key_pos <= (start.view(b, 1, 1, 1, 1) + torch.arange(s).view(1, 1, 1, -1, 1)))
        if a.get("mask") is not None:
            visible = visible & (_mask5(a["mask"], length) != 0)
    elif spec.family == "masked":
        visible = visible & (_mask5(a["mask"], length) != 0)
    else:  # additive: T5's position bias plus its inverted padding mask
        additive = _mask5(a["mask"], length)
    out = _softmax_attend(q, keys, values, visible, a["scale"], additive, a.get("s_aux"),
                          int(a["partition"]) if spec.flash else None)
    return out.to(q.dtype)


def _sliding(spec: AttentionSpec, a: dict) -> torch.Tensor:
    """Sliding-window attention over a rolling cache of W = block_size slots per sequence
    (block block_table[b, 0]): slots 0..cache_seq_len-1 hold the latest past tokens, oldest
    first. The new tokens are cache_offset - cache_seq_len of the S given (the rest is chunk
    padding). Token i sees past slot j when it lies within the window (cache_seq_len + i - j <
    W) and chunk token t <= i (every valid chunk token if is_bidirectional); a given attn_mask
    (decode: over the W slots after the update; prefill: over past + chunk) decides instead.
    Afterwards the cache holds the last W tokens of past + new, oldest first."""
    q, k, v, kcache, vcache = a["q"], a["k"], a["v"], a["kcache"], a["vcache"]
    b, h, g, s, d = q.shape
    window = int(a["block_size"])
    table = _tables(a["block_table"], b)[:, 0]
    past_len, offset = _start(a["cache_seq_len"], b), _start(a["cache_offset"], b)
    mask = a.get("attn_mask")
    outs = []
    for i in range(b):
        n_past, n_new = int(past_len[i]), int(offset[i] - past_len[i])
        slot = int(table[i])
        keys = torch.cat([kcache[slot, :, 0, :n_past].float(), k[i, :, 0].float()], 1)  # [h, P+S, d]
        values = torch.cat([vcache[slot, :, 0, :n_past].float(), v[i, :, 0].float()], 1)
        idx = torch.arange(n_past + s)
        qi = torch.arange(s).view(-1, 1)
        if spec.phase == "decode" and mask is not None:
            kept = torch.cat([idx[:n_past], idx[n_past:n_past + n_new]])[-window:]
            keys_used, values_used = keys[:, kept], values[:, kept]
            visible = (_mask5(mask[i:i + 1], kept.numel()) != 0).reshape(1, 1, 1, 1, -1)
        else:
            keys_used, values_used = keys, values
            if mask is not None:
                visible = (_mask5(mask[i:i + 1], n_past + s) != 0)
            else:
                rel = idx.view(1, -1) - n_past              # key position relative to the chunk start
                in_chunk = (rel >= 0) & (rel < n_new)
                if a.get("is_bidirectional", False):
                    seen = (rel < 0) | in_chunk
                else:
                    seen = (rel <= qi) & ((rel < 0) | in_chunk)
                visible = (seen & (qi - rel < window)).view(1, 1, 1, s, -1)
        out = _softmax_attend(q[i:i + 1], keys_used.unsqueeze(0), values_used.unsqueeze(0), visible,
                              a["scale"], s_aux=a.get("s_aux"))
        outs.append(out)
        for cache, new in ((kcache, k), (vcache, v)):  # roll: keep the last W tokens
            rows = torch.cat([cache[slot, :, 0, :n_past], new[i, :, 0, :n_new].to(cache.dtype)], 1)
            rows = rows[:, -window:]
            cache[slot, :, 0, :rows.shape[1]] = rows
    return torch.cat(outs).to(q.dtype)


def cache_update(cache: torch.Tensor, state: torch.Tensor, position, axis) -> torch.Tensor:
    """Write `state` into `cache` (in place) at `position` along `axis`; returns the new cache."""
    dim, start = int(axis), int(position)
    cache.narrow(dim, start, state.shape[dim]).copy_(state.to(cache.dtype))
    return cache


_ACTIVATIONS = {"silu": torch.nn.functional.silu, "relu": torch.relu,
                "gelu": torch.nn.functional.gelu,
                "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}


def moe_glu(hidden_states, gate_proj_weight, up_proj_weight, down_proj_weight,
            masked_routing_weight, hidden_act: str = "silu") -> torch.Tensor:
    """Experts of a MoE block, gated-linear-unit style, in FP32:
    out[t] = sum_e w[e, t] * down_e(act(gate_e x_t) * up_e x_t); weights gate/up [E, I, H],
    down [E, H, I], routing [E, T] (zero for experts a token does not use)."""
    act = _ACTIVATIONS.get(hidden_act)
    if act is None:
        raise ValueError(f"custom_moe_glu: hidden_act {hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
    x = hidden_states.float()
    gate = torch.einsum("th,eih->eti", x, gate_proj_weight.float())
    up = torch.einsum("th,eih->eti", x, up_proj_weight.float())
    down = torch.einsum("eti,ehi->eth", act(gate) * up, down_proj_weight.float())
    out = (down * masked_routing_weight.float().unsqueeze(-1)).sum(0)
    return out.to(hidden_states.dtype)


def tri_recur_update(attn: torch.Tensor) -> torch.Tensor:
    """The chunked gated-delta-rule recurrence over a strictly lower-triangular [.., C, C]
    matrix: row i += sum_j attn[i, j] * row j (rows j < i already updated), as Qwen3.5's
    linear attention does inside each chunk."""
    out = attn.float().clone()
    for i in range(1, out.shape[-1]):
        row = out[..., i, :i].clone()
        out[..., i, :i] = row + (row.unsqueeze(-1) * out[..., :i, :i]).sum(-2)
    return out.to(attn.dtype)


# --- registration -------------------------------------------------------------------------------

_lib = torch.library.Library(NAMESPACE, "DEF")
_rbln_lib = torch.library.Library("rbln", "FRAGMENT")


def _bind(spec: AttentionSpec, args: tuple, kwargs: dict) -> dict:
    bound = dict(zip(spec.params, args))
    bound.update(kwargs)
    return bound


def _register_attention(spec: AttentionSpec) -> None:
    _lib.define(spec.schema())

    def kernel(*args, **kwargs):
        return paged_attention_kernel(spec, _bind(spec, args, kwargs))

    def fake(*args, **kwargs):
        q = _bind(spec, args, kwargs)["q"]
        return q.new_empty(q.shape)

    _lib.impl(spec.name, kernel, "CPU")
    torch.library.register_fake(f"{NAMESPACE}::{spec.name}", fake, lib=_lib)


for _spec in ATTENTION.values():
    _register_attention(_spec)

_lib.define("linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor")
_lib.define("rbln_cache_update(Tensor(a!) cache, Tensor state, Tensor position, Tensor axis) -> Tensor")
_lib.define("custom_moe_glu(Tensor hidden_states, Tensor gate_proj_weight, Tensor up_proj_weight, "
            "Tensor down_proj_weight, Tensor masked_routing_weight, str hidden_act='silu') -> Tensor")
_rbln_lib.define("tri_recur_update(Tensor attn) -> Tensor")


def _linear(input, weight, bias=None):
    """The vendor patches F.linear with this during compiles: a plain x W^T + b (FP32 on
    the host; quantized layers arrive here with dequantized weights)."""
    out = torch.matmul(input.float(), weight.float().t())
    if bias is not None:
        out = out + bias.float()
    return out.to(torch.promote_types(input.dtype, weight.dtype) if weight.is_floating_point()
                  else input.dtype)


def _linear_fake(input, weight, bias=None):
    dtype = torch.promote_types(input.dtype, weight.dtype) if weight.is_floating_point() else input.dtype
    return input.new_empty((*input.shape[:-1], weight.shape[0]), dtype=dtype)


_lib.impl("linear", _linear, "CPU")
torch.library.register_fake(f"{NAMESPACE}::linear", _linear_fake, lib=_lib)
_lib.impl("rbln_cache_update", lambda cache, state, position, axis:
          cache_update(cache, state, position, axis).clone(), "CPU")
torch.library.register_fake(f"{NAMESPACE}::rbln_cache_update",
                            lambda cache, state, position, axis: torch.empty_like(cache), lib=_lib)
_lib.impl("custom_moe_glu", moe_glu, "CPU")
torch.library.register_fake(f"{NAMESPACE}::custom_moe_glu",
                            lambda hidden_states, *rest, **kw: torch.empty_like(hidden_states), lib=_lib)
_rbln_lib.impl("tri_recur_update", tri_recur_update, "CPU")
torch.library.register_fake("rbln::tri_recur_update", lambda attn: torch.empty_like(attn), lib=_rbln_lib)


# --- device kernels of the functional IR form ----------------------------------------------------

def _target(name: str) -> str:
    return f"{NAMESPACE}.{name}.default"


def _device_attention(spec: AttentionSpec):
    def run(*args, **kwargs):
        bound = _bind(spec, args, kwargs)
        out = paged_attention_kernel(spec, bound)
        return out, bound["kcache"], bound["vcache"]
    return run


# Mutating ops: which arguments they update in place (the IR form returns them after `out`).
MUTATED = {**{_target(s.name): ("kcache", "vcache") for s in ATTENTION.values()},
           _target("rbln_cache_update"): ("cache",)}
DEVICE_IMPLS = {**{_target(s.name): _device_attention(s) for s in ATTENTION.values()},
                _target("rbln_cache_update"): lambda cache, state, position, axis: (
                    cache_update(cache, state, position, axis).clone(), cache)}
INPLACE_RESULTS = {target: tuple(range(1, 1 + len(names))) for target, names in MUTATED.items()}
ATTENTION_TARGETS = {_target(s.name): s for s in ATTENTION.values()}
