"""Predicted effect of weight-only quantization (rebel.device.quant) on decode, from meta tensors.

- 4 linears of 4096 x 4096 at batch 1 (a weight-bound GEMV stack) on one ATOM die
- Llama-3-8B decode step (batch 1, context 1024) on RBLN-CA25, TP=1 and 4
each in FP16, int8 and int4 weights (group 128; the LM head stays FP16). Prints predicted
latency, weight bytes per die and DRAM per die.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import predict_models as pm  # benchmarks/predict_models.py
from optimum.rbln.decoder_only.paged_model import PagedCausalLM
from rebel.compiler.compile import compile_module
from rebel.device.quant import quantize_linears
from rebel.runtime.compiled_model import RBLNCompiledModel

HALF = torch.float16
VARIANTS = ((None, "fp16"), (8, "int8"), (4, "int4"))


def stack(bits):
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(4096, 4096, bias=False) for _ in range(4)]).to(HALF)
    return quantize_linears(model, bits, 128) if bits else model


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    x = pm.meta(1, 4096)
    for bits, label in VARIANTS:
        compiled = RBLNCompiledModel(compile_module(stack(bits), [x], npu="RBLN-CA25", progress=False))
        print(f"4 x linear 4096x4096 b1 {label:5s} RBLN-CA25 die  latency "
              f"{compiled.predicted_latency_s() * 1e6:8.1f} us  weights "
              f"{compiled.program.weight_bytes / 2**20:7.1f} MiB")
    for tp in (1, 4):
        for bits, label in VARIANTS:
            lm = pm.causal_lm("llama3-8b")
            if bits:
                quantize_linears(lm, bits, 128)
            with torch.device("meta"):
                module = PagedCausalLM(lm, num_blocks=1, block_size=1024).to(HALF)
            inputs = [pm.meta(1, 1, dtype=torch.long), pm.meta(1, 1, dtype=torch.long),
                      pm.meta(1, 1, dtype=torch.int32), pm.meta(1, dtype=torch.long)]
            pm.report(f"Llama-3-8B decode step (b1, ctx 1024) {label}", module, inputs, "RBLN-CA25", tp)


if __name__ == "__main__":
    main()
