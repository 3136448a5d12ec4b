"""Serving SmolLM2-135M-Instruct on a virtual RBLN-CA25: vLLM's continuous batching (vllm_rbln)
against static batches of optimum.rbln's generate, on the same compiled folder and requests.

Requests ask for different numbers of tokens, as real traffic does. A static batch runs until its
longest request ends, while vLLM refills a finished request's slot at once. The script prints
both runs side by side: the predicted NPU time (prefill and decode graphs, from the timing
model), the predicted output tokens/s, and this machine's emulation wall time.

    .venv/bin/python benchmarks/vllm_serving.py [--requests 16]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from optimum.rbln.decoder_only.modeling import left_padded

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from demo import compiled_smollm2  # noqa: E402  (the compiled folder `make demo` caches)


def workload(n: int):
    """n token-id prompts of 20-80 tokens, each wanting 8-96 new tokens (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (int(torch.randint(20, 80, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(n)]
    wants = [int(torch.randint(8, 96, (1,), generator=g)) for _ in range(n)]
    return prompts, wants


def static_batches(model, prompts, wants, size: int):
    """optimum.rbln generate, `size` requests at a time, each batch as long as its longest."""
    predicted = wall = 0.0
    for start in range(0, len(prompts), size):
        ids, mask = left_padded(prompts[start:start + size])
        model.generate(ids, attention_mask=mask, max_new_tokens=max(wants[start:start + size]),
                       eos_token_id=[])
        report = model.last_generation_report
        predicted += report.predicted_s
        wall += report.wall_s
    return predicted, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=16)
    args = parser.parse_args()
    from vllm import LLM, SamplingParams

    model, _, _ = compiled_smollm2()
    prompts, wants = workload(args.requests)
    useful = sum(wants)
    size = model.rbln_config.batch_size

    llm = LLM(model=str(model._source), device="rbln", max_num_seqs=size, max_model_len=2048,
              block_size=model.rbln_config.block_size)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts],
                 [SamplingParams(temperature=0.0, max_tokens=w, ignore_eos=True) for w in wants],
                 use_tqdm=False)
    vllm_wall = time.perf_counter() - start
    [stats] = llm.collective_rpc("rbln_stats")
    vllm_predicted = stats["prefill_s"] + stats["decode_s"]
    static_predicted, static_wall = static_batches(model, prompts, wants, size)

    print(f"{args.requests} requests, {useful} output tokens wanted, batch {size}, "
          f"{model.compiled_models['model'].npu}")
    print(f"{'':34s} {'predicted NPU s':>16s} {'predicted tok/s':>16s} {'emulated wall s':>16s}")
    for name, predicted, wall in (("vLLM continuous batching", vllm_predicted, vllm_wall),
                                  ("static batches (generate)", static_predicted, static_wall)):
        print(f"{name:34s} {predicted:16.3f} {useful / predicted:16.1f} {wall:16.1f}")
    print(f"continuous / static predicted throughput: {static_predicted / vllm_predicted:.2f}x")


if __name__ == "__main__":
    main()
