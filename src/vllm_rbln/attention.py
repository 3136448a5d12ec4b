"""Path B's attention backend: vLLM's own model classes attend through the device's paged
attention op (`torch.ops.rbln_custom_ops.paged_causal_attn_{prefill,decode}`, the op the compiled
optimum graphs use), reading and writing vLLM's paged KV cache in place.

vLLM hands each attention layer the step's tokens flattened ([tokens, heads, head_dim], requests
one after another, `query_start_loc` marking them) and one cache view per layer, [blocks,
kv_heads, block_size, 2 * head_dim] (keys in the first half of the last axis, values in the
second). The device op takes [blocks, kv_heads, 1, block_size, head_dim] caches: slicing the last
axis gives exactly that view of the same memory, so the op's in-place writes land in vLLM's cache
and vLLM's block ids index it directly (block 0, vLLM's null block, is never given to a request).

A step whose requests all bring one token (decode) is one op call over the whole batch; a request
that brings several (a prefill chunk) is one call of its own, as the device runs a chunk of one
sequence at a time. The op writes the new keys and values and attends in one call
(`forward_includes_kv_cache_update`), so vLLM never calls a separate cache-update kernel.

The op runs here on host tensors, outside the compiled graphs, so the graphs' predicted time does
not include it: every call adds the device time the timing model predicts for it (`STATS`), by
the same rules as the op's kernel inside a compiled graph (rebel.runtime.op_timing: the shapes
this worker holds, i.e. its own heads under tensor parallelism, and the context its sequences
have reached). The runner adds it to the step's predicted time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl, AttentionMetadataBuilder,
                                       AttentionType, CommonAttentionMetadata)
from vllm.v1.kv_cache_interface import KVCacheLayout

import rebel.device.vendor_ops  # noqa: F401  (registers torch.ops.rbln_custom_ops.*)
from rebel.runtime.op_timing import attention_seconds

# vLLM names backends by its enum; a plugin's backend is the CUSTOM member, registered to this
# class's path by `register()` (the platform calls it in every process before selecting).
NAME = "CUSTOM"
PATH = "vllm_rbln.attention.RblnAttentionBackend"


def register() -> str:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    register_backend(AttentionBackendEnum.CUSTOM, PATH)
    return PATH


class RblnAttentionError(ValueError):
    """An attention feature the device op does not have."""


@dataclass
class AttentionStats:
    calls: int = 0
    seconds: float = 0.0  # predicted device time of the calls


STATS = AttentionStats()  # this worker process's attention calls (one worker per die)


def _call(name: str, **args) -> torch.Tensor:
    """Run device op `name` and count its predicted device time."""
    out = getattr(torch.ops.rbln_custom_ops, name)(**args)
    STATS.calls += 1
    STATS.seconds += attention_seconds(name, args)
    return out


class RblnAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16", "float32"]

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type["RblnAttentionImpl"]:
        return RblnAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["RblnAttentionMetadataBuilder"]:
        return RblnAttentionMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any: the op is shape-generic

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size > 0

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)  # [blocks, kv_heads, slots, K|V]: the op's block layout


@dataclass
class RblnAttentionMetadata:
    """One step's requests as the device op takes them (host tensors)."""

    num_actual_tokens: int
    query_start_loc: list[int]      # num_reqs + 1 token offsets
    computed: torch.Tensor          # [num_reqs] tokens already in the cache per request
    block_table: torch.Tensor       # [num_reqs, max_blocks] vLLM block ids
    decode_only: bool               # every request brings exactly one token


class RblnAttentionMetadataBuilder(AttentionMetadataBuilder[RblnAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> RblnAttentionMetadata:
        m = common_attn_metadata
        n = m.num_reqs
        starts = m.query_start_loc_cpu[:n + 1].long()
        lengths = starts[1:] - starts[:-1]
        seq_lens = m.seq_lens[:n].cpu().long()
        return RblnAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens, query_start_loc=starts.tolist(),
            computed=seq_lens - lengths, block_table=m.block_table_tensor[:n].cpu().long(),
            decode_only=bool((lengths == 1).all()))


class RblnAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes=None, sliding_window=None, kv_cache_dtype: str = "auto",
                 logits_soft_cap=None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None) -> None:
        unsupported = {"alibi slopes": alibi_slopes is not None,
                       "a sliding window": sliding_window is not None,
                       "logits soft-capping": bool(logits_soft_cap),
                       "KV-cache sharing": kv_sharing_target_layer_name is not None,
                       f"attention type {attn_type}": attn_type != AttentionType.DECODER}
        missing = [what for what, used in unsupported.items() if used]
        if missing:
            raise RblnAttentionError(f"vllm_rbln Path B attention has no {', '.join(missing)}")
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.group = num_heads // num_kv_heads
        self.scale = torch.tensor(float(scale))
        self.sinks = sinks

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: RblnAttentionMetadata | None,
                output: torch.Tensor, output_scale=None, output_block_scale=None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise RblnAttentionError("vllm_rbln Path B attention has no fused output quantization")
        if attn_metadata is None:  # vLLM's profiling / dummy run: nothing to attend
            return output
        m, d = attn_metadata, self.head_size
        kcache, vcache = kv_cache[..., :d].unsqueeze(2), kv_cache[..., d:].unsqueeze(2)
        block_size = kv_cache.shape[2]
        if m.decode_only:
            n = len(m.query_start_loc) - 1
            q = query[:n].reshape(n, self.num_kv_heads, self.group, 1, d)
            k = key[:n].reshape(n, self.num_kv_heads, 1, 1, d)
            v = value[:n].reshape(n, self.num_kv_heads, 1, 1, d)
            out = _call("paged_causal_attn_decode", q=q, k=k, v=v, kcache=kcache, vcache=vcache,
                        seq=m.computed.view(n, 1), scale=self.scale, block_table=m.block_table,
                        block_size=block_size, s_aux=self.sinks)
            output[:n] = out.reshape(n, self.num_heads, d).to(output.dtype)
            return output
        for i in range(len(m.query_start_loc) - 1):
            a, b = m.query_start_loc[i], m.query_start_loc[i + 1]
            s = b - a
            q = query[a:b].reshape(s, self.num_kv_heads, self.group, d).permute(1, 2, 0, 3)[None]
            k = key[a:b].reshape(s, 1, self.num_kv_heads, d).permute(2, 1, 0, 3)[None]
            v = value[a:b].reshape(s, 1, self.num_kv_heads, d).permute(2, 1, 0, 3)[None]
            out = _call("paged_causal_attn_prefill", q=q.contiguous(), k=k.contiguous(),
                        v=v.contiguous(), kcache=kcache, vcache=vcache,
                        seq=m.computed[i].view(1, 1), scale=self.scale,
                        block_table=m.block_table[i:i + 1], block_size=block_size,
                        s_aux=self.sinks)
            output[a:b] = out[0].permute(2, 0, 1, 3).reshape(s, self.num_heads, d).to(output.dtype)
        return output
