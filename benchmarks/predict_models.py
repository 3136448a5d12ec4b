"""Predicted figures for models too large to run here, from meta tensors (shapes, no weights).

- Llama-3-8B decode step (batch 1, context 1024) on one RBLN-CA25 (ATOM-Max) card, TP=1 and 4,
  its KV cache resident in device DRAM (as a serving engine keeps it)
- BERT-large (seq 384, batch 1) and ResNet-50 (batch 1, 224x224) on one ATOM die (RBLN-CA12)
all FP16. Prints per-run latency, device DRAM per die, and the share of time per kernel class.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from rebel.compiler.compile import compile_module
from rebel.device.engine import EventEngine
from rebel.device.events import LINK, NEURAL_ENGINE
from rebel.npu import load_spec
from rebel.runtime.runtime import activation_bytes
from rebel.runtime.timeline import build_steps

HALF = torch.float16


def meta(*shape, dtype=HALF):
    return torch.empty(*shape, dtype=dtype, device="meta")


class LlamaDecoder(torch.nn.Module):
    """Llama-3-8B shapes: 32 layers, hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocab 128256.
    One decode step: embed the new token, attend over a KV cache, return next-token logits and
    the extended caches."""

    def __init__(self, layers=32, hidden=4096, heads=32, kv_heads=8, inter=14336, vocab=128256):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, hidden // heads
        kw = dict(device="meta", dtype=HALF)
        self.embed = torch.nn.Embedding(vocab, hidden, **kw)
        self.layers = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.Module()
            block.q = torch.nn.Linear(hidden, hidden, bias=False, **kw)
            block.k = torch.nn.Linear(hidden, kv_heads * self.d, bias=False, **kw)
            block.v = torch.nn.Linear(hidden, kv_heads * self.d, bias=False, **kw)
            block.o = torch.nn.Linear(hidden, hidden, bias=False, **kw)
            block.gate = torch.nn.Linear(hidden, inter, bias=False, **kw)
            block.up = torch.nn.Linear(hidden, inter, bias=False, **kw)
            block.down = torch.nn.Linear(inter, hidden, bias=False, **kw)
            block.n1 = torch.nn.RMSNorm(hidden, **kw)
            block.n2 = torch.nn.RMSNorm(hidden, **kw)
            self.layers.append(block)
        self.norm = torch.nn.RMSNorm(hidden, **kw)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False, **kw)

    def forward(self, ids, k_cache, v_cache):
        x = self.embed(ids)
        b, s, _ = x.shape
        new_k, new_v = [], []
        for i, blk in enumerate(self.layers):
            h = blk.n1(x)
            q = blk.q(h).view(b, s, self.h, self.d).transpose(1, 2)
            k = torch.cat([k_cache[i], blk.k(h).view(b, s, self.kv, self.d).transpose(1, 2)], 2)
            v = torch.cat([v_cache[i], blk.v(h).view(b, s, self.kv, self.d).transpose(1, 2)], 2)
            a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            x = x + blk.o(a.transpose(1, 2).reshape(b, s, -1))
            h = blk.n2(x)
            x = x + blk.down(F.silu(blk.gate(h)) * blk.up(h))
            new_k.append(k[:, :, -s:])
            new_v.append(v[:, :, -s:])
        return self.lm_head(self.norm(x)), torch.stack(new_k), torch.stack(new_v)


def bert_large():
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, attn_implementation="sdpa")
    with torch.device("meta"):
        model = BertModel(config).to(HALF).eval()
    return model, [meta(1, 384, dtype=torch.long), meta(1, 384, dtype=torch.long)]


def resnet50():
    from transformers import ResNetConfig, ResNetModel

    with torch.device("meta"):
        model = ResNetModel(ResNetConfig()).to(HALF).eval()  # defaults are ResNet-50
    return model, [meta(1, 3, 224, 224)]


def report(name: str, module, inputs, npu: str, tp: int = 1, resident: bool = False) -> None:
    """resident: inputs are already in device DRAM (a KV cache kept on the device)."""
    spec = load_spec(npu)
    start = time.perf_counter()
    compiled = compile_module(module, inputs, npu=npu, tensor_parallel_size=tp, progress=False)
    compile_s = time.perf_counter() - start
    program = compiled.program
    engine = EventEngine(spec, 0, group=tuple(range(tp)), resident_inputs=resident)
    timeline = engine.run(build_steps(program, spec))
    busy = defaultdict(float)
    kinds = {k.name: k.kind for k in program.kernels}
    for e in timeline.events:
        if e.device == 0 and e.track in (NEURAL_ENGINE, LINK):
            busy[kinds.get(e.name, e.track)] += e.dur_s
    total = sum(busy.values()) or 1.0
    mix = ", ".join(f"{k} {v / total * 100:.0f}%" for k, v in sorted(busy.items(), key=lambda kv: -kv[1])[:4])
    dram = program.weight_bytes + activation_bytes(program)
    print(f"{name:44s} {npu:10s} TP={tp}  latency {timeline.latency_s * 1e3:8.3f} ms  "
          f"DRAM/die {dram / 2**30:6.2f} GiB  compile {compile_s:5.1f} s  [{mix}]")


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    ctx = 1024
    for tp in (1, 4):
        decoder = LlamaDecoder()
        inputs = [meta(1, 1, dtype=torch.long), meta(32, 1, 8, ctx, 128), meta(32, 1, 8, ctx, 128)]
        report(f"Llama-3-8B decode step (b1, ctx {ctx})", decoder, inputs, "RBLN-CA25", tp,
               resident=True)
    model, inputs = bert_large()
    report("BERT-large (seq 384, b1)", model, inputs, "RBLN-CA12")
    model, inputs = resnet50()
    report("ResNet-50 (224x224, b1)", model, inputs, "RBLN-CA12")


if __name__ == "__main__":
    main()
