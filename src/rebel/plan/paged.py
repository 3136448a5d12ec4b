"""A Hugging Face decoder-only model as the device runs it: a paged KV cache in device DRAM.

`PagedCausalLM` wraps the model's own modules (its layers, rotary embeddings, norms, head run
unchanged) and swaps the attention for `rbln::paged_attention` through transformers'
`AttentionInterface`, so any model that routes attention through that interface (Llama, Qwen2,
Qwen3, Mistral...) works without copying its code. The KV cache is one buffer pair per layer,
[num_blocks, kv_heads, block_size, head_dim], that the graphs update in place; every compiled
graph (the prefill chunk and each decode batch size) shares it, so it lives across runs. A block
may be smaller than the attention partition (a partition is then several blocks of the block
table), so a serving engine's prefix cache can share blocks of a prompt prefix.

It lives in rebel.plan (below optimum in the layers) because the capacity planner compiles the
same model from a config alone; optimum.rbln and vllm_rbln import it from here
(`optimum.rbln.decoder_only.paged_model` re-exports it for older imports).
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..device.ops import paged_attention  # noqa: F401  (registers torch.ops.rbln)

ATTENTION = "rbln_paged"


def kv_heads_and_dim(config) -> tuple[int, int]:
    """(KV heads, head dim) of a transformers decoder config: one KV-cache block holds
    [kv_heads, block_size, head_dim]."""
    heads = config.num_attention_heads
    return (getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads)


class PagedContext:
    """What the attention of every layer needs during one forward: the caches, where each query
    token sits (positions) and which blocks each sequence owns (block tables)."""

    def __init__(self, owner: PagedCausalLM, positions: torch.Tensor, block_tables: torch.Tensor):
        self.owner = owner
        self.positions = positions
        self.block_tables = block_tables
        self.updates: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            rbln_paged: PagedContext | None = None, **kwargs):
    """transformers attention interface: q [b, h, s, d], k/v [b, kv_h, s, d] for the new tokens.
    Returns [b, s, h, d] as the other interfaces do."""
    if rbln_paged is None:
        raise RuntimeError("rbln_paged attention needs the paged KV-cache context (PagedCausalLM)")
    layer = module.layer_idx
    owner = rbln_paged.owner
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    out, k_cache, v_cache = torch.ops.rbln.paged_attention(
        query, key, value, owner.k_cache(layer), owner.v_cache(layer), rbln_paged.block_tables,
        rbln_paged.positions, owner.partition_len, scale)
    rbln_paged.updates[layer] = (k_cache, v_cache)
    return out.transpose(1, 2), None


AttentionInterface.register(ATTENTION, paged_attention_forward)
AttentionMaskInterface.register(ATTENTION, lambda *args, **kwargs: None)  # masking is paged


class PagedCausalLM(torch.nn.Module):
    """forward(input_ids [b, s], positions [b, s], block_tables [b, blocks_per_seq],
    logits_index [b]) -> next-token logits [b, vocab] of the token at logits_index in each row.
    Positions < 0 mark padding: those tokens are neither cached nor attended to."""

    def __init__(self, hf_model, num_blocks: int, block_size: int, partition_len: int | None = None):
        super().__init__()
        config = hf_model.config
        config._attn_implementation = ATTENTION
        self.body = hf_model.get_decoder() if hasattr(hf_model, "get_decoder") else hf_model.model
        self.lm_head = hf_model.get_output_embeddings()
        self.block_size = block_size
        self.partition_len = partition_len or block_size
        if self.partition_len % block_size:
            raise ValueError(f"KV-cache block size {block_size} must divide the attention "
                             f"partition {self.partition_len}")
        self.num_layers = config.num_hidden_layers
        kv_heads, head_dim = kv_heads_and_dim(config)
        shape = (num_blocks, kv_heads, block_size, head_dim)
        device = next(hf_model.parameters()).device
        for i in range(self.num_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(shape, device=device))
            self.register_buffer(f"v_cache_{i}", torch.zeros(shape, device=device))

    def k_cache(self, layer: int) -> torch.Tensor:
        return getattr(self, f"k_cache_{layer}")

    def v_cache(self, layer: int) -> torch.Tensor:
        return getattr(self, f"v_cache_{layer}")

    def forward(self, input_ids, positions, block_tables, logits_index):
        context = PagedContext(self, positions, block_tables)
        hidden = self.body(input_ids=input_ids, position_ids=positions.clamp(min=0),
                           use_cache=False, rbln_paged=context).last_hidden_state
        b, _, width = hidden.shape
        last = hidden.gather(1, logits_index.view(b, 1, 1).expand(b, 1, width)).squeeze(1)
        logits = self.lm_head(last)
        for layer, (k_cache, v_cache) in context.updates.items():
            self.k_cache(layer).copy_(k_cache)
            self.v_cache(layer).copy_(v_cache)
        return logits
