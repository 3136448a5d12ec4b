"""One Qwen3-30B-A3B MoE block (E=128 experts, top-8, H=2048, I=768) on meta tensors, on one
ATOM die: Task DMA bytes and predicted latency of a batch-1 decode token and a 128-token prefill
chunk, with transformers' `batched_mm` experts (a weight copy gathered per (token, expert) pair)
and with the grouped ops rbln-plan uses (rebel.device.moe: each chosen expert read once).

    PYTHONPATH=src python benchmarks/moe_formulations.py
"""
from __future__ import annotations

import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

import rebel
from rebel.plan.moe import use_grouped_experts


class Block(torch.nn.Module):
    def __init__(self, config, grouped: bool):
        super().__init__()
        with torch.device("meta"):
            self.block = Qwen3MoeSparseMoeBlock(config)
        if grouped:
            use_grouped_experts(self.block)

    def forward(self, x):
        return self.block(x)


def main() -> None:
    config = Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                            num_experts_per_tok=8)
    config._experts_implementation = "batched_mm"
    for tokens in (1, 128):
        for grouped in (False, True):
            x = torch.empty(1, tokens, config.hidden_size, device="meta")
            compiled = rebel.compile_from_torch(Block(config, grouped).eval(), example_inputs=[x],
                                                progress=False)
            kernels = compiled.program.kernels
            moved = sum(t.nbytes for k in kernels for t in (*k.plan.dma_in, *k.plan.dma_out))
            weights = sum(t.nbytes for k in kernels for t in k.plan.dma_in if t.weight)
            print(f"T={tokens:3d} {'grouped   ' if grouped else 'batched_mm'}: Task DMA "
                  f"{moved / 1e9:7.3f} GB (weights read {weights / 1e9:.3f} GB), predicted "
                  f"{compiled.predicted_latency_s() * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
