"""Predicted time against the roofline bound on one ATOM die (RBLN-CA12), FP16.

bound = max(FLOPs / peak FP16, minimum bytes / DRAM bandwidth), where minimum bytes are the
inputs, weights and outputs each moved once. Efficiency = bound / predicted. A large shape under
80% is a scheduler bug to fix, not a constant to tune: the script flags those rows.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from llama_shapes import LlamaLayer  # benchmarks/llama_shapes.py
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
