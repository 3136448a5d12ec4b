"""Llama-3-8B (and Qwen3-4B) shapes on the meta device (no weights), for predictions of models too
large to run here: a decoder layer that reads and extends a KV cache, and the whole model for one
decode step or one prefill chunk. Qwen3 differs from Llama only where these classes take options:
a head dim that is not hidden / heads, RMSNorm on each head's queries and keys, tied embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F

HALF = dict(device="meta", dtype=torch.float16)


class LlamaLayer(torch.nn.Module):
    """One decoder layer (default: hidden 4096, 32 heads, 8 KV heads, MLP 14336): attends over a
    KV cache plus the new tokens and returns the hidden state and the extended caches."""

    def __init__(self, hidden=4096, heads=32, kv_heads=8, inter=14336, head_dim=None,
                 qk_norm=False):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, head_dim or hidden // heads

        def lin(i, o):
            return torch.nn.Linear(i, o, bias=False, **HALF)

        self.q, self.k, self.v, self.o = (lin(hidden, heads * self.d), lin(hidden, kv_heads * self.d),
                                          lin(hidden, kv_heads * self.d), lin(heads * self.d, hidden))
        self.q_norm = torch.nn.RMSNorm(self.d, **HALF) if qk_norm else torch.nn.Identity()
        self.k_norm = torch.nn.RMSNorm(self.d, **HALF) if qk_norm else torch.nn.Identity()
        self.gate, self.up, self.down = lin(hidden, inter), lin(hidden, inter), lin(inter, hidden)
        self.n1 = torch.nn.RMSNorm(hidden, **HALF)
        self.n2 = torch.nn.RMSNorm(hidden, **HALF)

    def forward(self, x, k_cache=None, v_cache=None):
        """k_cache/v_cache None: the first prefill chunk of a sequence (nothing cached yet)."""
        b, s, _ = x.shape
        h = self.n1(x)
        q = self.q_norm(self.q(h).view(b, s, self.h, self.d)).transpose(1, 2)
        k = self.k_norm(self.k(h).view(b, s, self.kv, self.d)).transpose(1, 2)
        v = self.v(h).view(b, s, self.kv, self.d).transpose(1, 2)
        if k_cache is not None:
            k, v = torch.cat([k_cache, k], 2), torch.cat([v_cache, v], 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h)), k, v


class LlamaDecoder(torch.nn.Module):
    """32 layers, vocab 128256: one step embeds the new tokens, runs every layer over its KV cache
    (none for a first prefill chunk), and returns logits and the new tokens' keys and values."""

    def __init__(self, layers=32, hidden=4096, heads=32, kv_heads=8, inter=14336, vocab=128256,
                 head_dim=None, qk_norm=False, tied=False):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden, **HALF)
        self.layers = torch.nn.ModuleList(LlamaLayer(hidden, heads, kv_heads, inter, head_dim, qk_norm)
                                          for _ in range(layers))
        self.norm = torch.nn.RMSNorm(hidden, **HALF)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False, **HALF)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids, k_cache=None, v_cache=None):
        x = self.embed(ids)
        s = x.shape[1]
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            cached = (None, None) if k_cache is None else (k_cache[i], v_cache[i])
            x, k, v = layer(x, *cached)
            new_k.append(k[:, :, -s:])
            new_v.append(v[:, :, -s:])
        # logits of the last token only, as a serving engine keeps (a prefill chunk needs no more)
        return self.lm_head(self.norm(x[:, -1:])), torch.stack(new_k), torch.stack(new_v)


def qwen3_4b() -> LlamaDecoder:
    """Qwen3-4B: hidden 2560, 36 layers, 32 heads x 128, 8 KV heads, MLP 9728, vocab 151936, tied."""
    return LlamaDecoder(layers=36, hidden=2560, heads=32, kv_heads=8, inter=9728, vocab=151936,
                        head_dim=128, qk_norm=True, tied=True)
