"""Predicted time against the roofline bound on one ATOM die (RBLN-CA12), FP16.

bound = max(FLOPs / peak FP16, minimum bytes / DRAM bandwidth), where minimum bytes are the
inputs, weights and outputs each moved once. Efficiency = bound / predicted. A large shape under
80% is a scheduler bug to fix, not a constant to tune: the script flags those rows.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from rebel.compiler.compile import compile_module
from rebel.device.engine import EventEngine
from rebel.device.events import HDMA
from rebel.npu import load_spec
from rebel.runtime.timeline import build_steps

NPU = "RBLN-CA12"
LARGE_FLOPS = 1e10  # shapes above this (or 64 MiB moved) must reach 80% of the bound


def meta(*shape):
    return torch.empty(*shape, dtype=torch.float16, device="meta")


class Gemm(torch.nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(meta(n, k), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.w)


class LlamaLayer(torch.nn.Module):
    """One Llama-3-8B decoder layer (hidden 4096, 32 heads, 8 KV heads, MLP 14336) that reads a
    KV cache of `context` tokens and appends the new tokens' keys/values to it."""

    def __init__(self, hidden=4096, heads=32, kv_heads=8, inter=14336):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, hidden // heads

        def lin(i, o):
            return torch.nn.Linear(i, o, bias=False, device="meta", dtype=torch.float16)

        self.q, self.k, self.v, self.o = (lin(hidden, hidden), lin(hidden, kv_heads * self.d),
                                          lin(hidden, kv_heads * self.d), lin(hidden, hidden))
        self.gate, self.up, self.down = lin(hidden, inter), lin(hidden, inter), lin(inter, hidden)
        self.n1 = torch.nn.RMSNorm(hidden, device="meta", dtype=torch.float16)
        self.n2 = torch.nn.RMSNorm(hidden, device="meta", dtype=torch.float16)

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


def predicted_s(module, inputs, spec) -> float:
    compiled = compile_module(module, inputs, npu=NPU, progress=False)
    events = EventEngine(spec, 0, resident_inputs=True).run(build_steps(compiled.program, spec)).events
    device = [e for e in events if e.device is not None and e.track != HDMA]
    return max(e.end_s for e in device) - min(e.start_s for e in device)


def cases():
    for m, n, k in [(1, 4096, 4096), (1, 14336, 4096), (16, 4096, 4096), (128, 4096, 4096),
                    (512, 4096, 4096), (2048, 4096, 4096), (4096, 14336, 4096),
                    (8192, 8192, 8192), (384, 1024, 1024), (3136, 64, 576)]:
        yield (f"GEMM {m}x{n}x{k}", Gemm(k, n), [meta(m, k)], 2.0 * m * n * k,
               2 * (m * k + k * n + m * n))
    layer = LlamaLayer()
    weights = sum(p.numel() for p in layer.parameters()) * 2
    for name, seq, ctx in [("Llama-3-8B layer decode b1 ctx1024", 1, 1024),
                           ("Llama-3-8B layer prefill 512", 512, 0)]:
        inputs = [meta(1, seq, 4096), meta(1, 8, ctx, 128), meta(1, 8, ctx, 128)]
        linear = 2.0 * seq * weights / 2
        attn = 4.0 * 32 * seq * (ctx + seq) * 128 * (0.5 if seq > 1 else 1.0)
        kv = 2 * 2 * 8 * (ctx + seq) * 128
        yield name, layer, inputs, linear + attn, weights + kv + 2 * 2 * seq * 4096 + kv


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    spec = load_spec(NPU)
    peak = spec.die.compute.peak_flops("float16")
    bw = spec.die.memory.dram_bandwidth
    print(f"{NPU}: {peak / 1e12:g} TFLOPS FP16, {bw / 1e9:g} GB/s DRAM")
    print(f"{'case':38s} {'GFLOP':>9s} {'MiB':>9s} {'bound us':>10s} {'predicted us':>13s} "
          f"{'efficiency':>10s}")
    low = []
    for name, module, inputs, flops, nbytes in cases():
        bound = max(flops / peak, nbytes / bw)
        pred = predicted_s(module, inputs, spec)
        eff = bound / pred
        large = flops >= LARGE_FLOPS or nbytes >= 64 * 2**20
        flag = "  <-- below 80%" if large and eff < 0.8 else ""
        if flag:
            low.append(name)
        print(f"{name:38s} {flops / 1e9:9.2f} {nbytes / 2**20:9.1f} {bound * 1e6:10.1f} "
              f"{pred * 1e6:13.1f} {eff * 100:9.1f}%{flag}")
    print(f"large shapes below 80% of the bound: {len(low)}" + (f" ({', '.join(low)})" if low else ""))


if __name__ == "__main__":
    main()
