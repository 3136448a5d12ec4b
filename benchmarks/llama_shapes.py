"""Llama-3-8B shapes on the meta device (no weights), for predictions of models too large to run
here: a decoder layer that reads and extends a KV cache, and the whole decode-step model."""
from __future__ import annotations

import torch
import torch.nn.functional as F

HALF = dict(device="meta", dtype=torch.float16)


class LlamaLayer(torch.nn.Module):
    """One decoder layer (default: hidden 4096, 32 heads, 8 KV heads, MLP 14336): attends over a
    KV cache plus the new tokens and returns the hidden state and the extended caches."""

    def __init__(self, hidden=4096, heads=32, kv_heads=8, inter=14336):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, hidden // heads

        def lin(i, o):
            return torch.nn.Linear(i, o, bias=False, **HALF)

        self.q, self.k, self.v, self.o = (lin(hidden, hidden), lin(hidden, kv_heads * self.d),
                                          lin(hidden, kv_heads * self.d), lin(hidden, hidden))
        self.gate, self.up, self.down = lin(hidden, inter), lin(hidden, inter), lin(inter, hidden)
        self.n1 = torch.nn.RMSNorm(hidden, **HALF)
        self.n2 = torch.nn.RMSNorm(hidden, **HALF)

    def forward(self, x, k_cache, v_cache):
        b, s, _ = x.shape
        h = self.n1(x)
        q = self.q(h).view(b, s, self.h, self.d).transpose(1, 2)
        k = torch.cat([k_cache, self.k(h).view(b, s, self.kv, self.d).transpose(1, 2)], 2)
        v = torch.cat([v_cache, self.v(h).view(b, s, self.kv, self.d).transpose(1, 2)], 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h)), k, v


class LlamaDecoder(torch.nn.Module):
    """32 layers, vocab 128256: one decode step embeds the new token, runs every layer over its
    KV cache, and returns next-token logits and the new tokens' keys and values."""

    def __init__(self, layers=32, hidden=4096, heads=32, kv_heads=8, inter=14336, vocab=128256):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden, **HALF)
        self.layers = torch.nn.ModuleList(LlamaLayer(hidden, heads, kv_heads, inter)
                                          for _ in range(layers))
        self.norm = torch.nn.RMSNorm(hidden, **HALF)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False, **HALF)

    def forward(self, ids, k_cache, v_cache):
        x = self.embed(ids)
        s = x.shape[1]
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, k_cache[i], v_cache[i])
            new_k.append(k[:, :, -s:])
            new_v.append(v[:, :, -s:])
        return self.lm_head(self.norm(x)), torch.stack(new_k), torch.stack(new_v)
