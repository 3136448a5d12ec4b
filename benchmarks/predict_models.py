"""Predicted figures for models too large to run here, from meta tensors (shapes, no weights).

- Llama-3-8B decode step (batch 1, context 1024) on one RBLN-CA25 (ATOM-Max) card, TP=1 and 4
- Qwen3-4B on one RBLN-CA25 with TP=4: decode step at batch 1 and 8 (context 1024) and one
  128-token prefill chunk (the first of a prompt: nothing cached yet)

The decoders are transformers' own `LlamaForCausalLM` / `Qwen3ForCausalLM`. A decode step is
the capacity planner's (`rebel.plan.Predictor` with every layer compiled, `exact=True`): the
model as the serving path runs it (`rebel.plan.paged.PagedCausalLM`: `rbln::paged_attention`
over a KV cache held on the device as a persistent buffer, split by KV heads under tensor
parallelism, one block of 1024 tokens per sequence, every position filled), and DRAM per die as
the planner counts it (weights, the KV cache once, activations). A prefill chunk is the plain
forward with the last token's logits only.
- BERT-large (seq 384, batch 1) and ResNet-50 (batch 1, 224x224) on one ATOM die (RBLN-CA12)
all FP16. Prints per-run latency, device DRAM per die, and the share of time per kernel class.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from timing_models import LLAMA3_8B, LastLogits  # benchmarks/timing_models.py
from rebel.compiler.compile import compile_module
from rebel.device.engine import EventEngine
from rebel.device.events import LINK, NEURAL_ENGINE
from rebel.npu import load_spec
from rebel.plan import Predictor
from rebel.runtime.runtime import activation_bytes
from rebel.runtime.timeline import build_steps

HALF = torch.float16


def meta(*shape, dtype=HALF):
    return torch.empty(*shape, dtype=dtype, device="meta")


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


QWEN3_4B = dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, intermediate_size=9728, vocab_size=151936,
                tie_word_embeddings=True)


def causal_lm(name: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_class, model_class, shape = {"llama3-8b": (LlamaConfig, LlamaForCausalLM, LLAMA3_8B),
                                        "qwen3-4b": (Qwen3Config, Qwen3ForCausalLM, QWEN3_4B)}[name]
    with torch.device("meta"):
        return model_class(config_class(**shape, attn_implementation="sdpa")).to(HALF).eval()


CONFIGS = {"llama3-8b": {"model_type": "llama", "_name": "Llama-3-8B", **LLAMA3_8B},
           "qwen3-4b": {"model_type": "qwen3", "_name": "Qwen3-4B", **QWEN3_4B}}


def report_decode(name: str, model: str, batch: int, context: int, npu: str, tp: int) -> None:
    """One decode step at `context` tokens (the new one included) for `batch` sequences."""
    start = time.perf_counter()
    predictor = Predictor(CONFIGS[model], npu, tp, chunk=None, batches=(batch,),
                          max_seq_len=context, block_size=context, exact=True)
    step = predictor.decode_step(batch, context)
    compile_s = time.perf_counter() - start
    memory = predictor.memory()
    dram = memory.weights + memory.activations + batch * predictor.blocks_per_seq * memory.kv_block
    _print(name, npu, tp, step.seconds, dram, compile_s, step.kinds)


def report(name: str, module, inputs, npu: str, tp: int = 1) -> None:
    spec = load_spec(npu)
    start = time.perf_counter()
    compiled = compile_module(module, inputs, npu=npu, tensor_parallel_size=tp, progress=False)
    compile_s = time.perf_counter() - start
    program = compiled.program
    engine = EventEngine(spec, 0, group=tuple(range(tp)))
    timeline = engine.run(build_steps(program, spec))
    busy = defaultdict(float)
    kinds = {k.name: k.kind for k in program.kernels}
    for e in timeline.events:
        if e.device == 0 and e.track in (NEURAL_ENGINE, LINK):
            busy[kinds.get(e.name, e.track)] += e.dur_s
    dram = program.weight_bytes + activation_bytes(program)
    _print(name, npu, tp, timeline.latency_s, dram, compile_s, busy)


def _print(name, npu, tp, latency_s, dram, compile_s, busy) -> None:
    total = sum(busy.values()) or 1.0
    mix = ", ".join(f"{k} {v / total * 100:.0f}%" for k, v in sorted(busy.items(), key=lambda kv: -kv[1])[:4])
    print(f"{name:44s} {npu:10s} TP={tp}  latency {latency_s * 1e3:8.3f} ms  "
          f"DRAM/die {dram / 2**30:6.2f} GiB  compile {compile_s:5.1f} s  [{mix}]")


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    ctx = 1024
    for tp in (1, 4):
        report_decode(f"Llama-3-8B decode step (b1, ctx {ctx})", "llama3-8b", 1, ctx, "RBLN-CA25", tp)
    for batch in (1, 8):
        report_decode(f"Qwen3-4B decode step (b{batch}, ctx {ctx})", "qwen3-4b", batch, ctx,
                      "RBLN-CA25", 4)
    report("Qwen3-4B prefill chunk (128 tokens)", LastLogits(causal_lm("qwen3-4b")),
           [meta(1, 128, dtype=torch.long)], "RBLN-CA25", 4)
    model, inputs = bert_large()
    report("BERT-large (seq 384, b1)", model, inputs, "RBLN-CA12")
    model, inputs = resnet50()
    report("ResNet-50 (224x224, b1)", model, inputs, "RBLN-CA12")


if __name__ == "__main__":
    main()
