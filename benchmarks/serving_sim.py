"""A request trace served for real and simulated, side by side (SmolLM2-135M-Instruct, the demo's
compiled folder: batch 4, chunk 128, 2048 tokens, on one RBLN-CA25 die).

1. The same Poisson trace served by vllm_rbln in the chip's time (`vllm_rbln.replay`: the model
   computes every token; the clock advances by each step's predicted NPU time) and simulated
   (`rebel.plan.serving.simulate`: vLLM's scheduler alone, each step costed by the compiled graphs'
   predicted time, nothing computed): TTFT and TPOT percentiles and their difference, and the
   wall time each took here; and simulated again with rbln-plan's step costs from the config alone
   (1 and 2 layers compiled on meta tensors, extrapolated; `rebel.plan.Predictor.step_cost`).
2. How long simulating a 10,000-request trace takes (the same scheduler and step costs).

    .venv/bin/python benchmarks/serving_sim.py [--requests 32] [--rate 40] [--big 10000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # replay steps the engine core in this process
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from rebel.plan.serving import PERCENTILES, poisson_trace, simulate  # noqa: E402

PROMPT, OUTPUT = (20, 200), (8, 64)


def table(rows: dict) -> None:
    metrics = [(m, q) for m in ("ttft", "tpot") for q in PERCENTILES]
    print(f"{'':>26s}" + "".join(f"{f'{m.upper()} p{q} ms':>14s}" for m, q in metrics)
          + f"{'tokens/s':>10s}{'wall s':>9s}")
    base = None
    for name, (result, wall) in rows.items():
        values = [result.percentiles(m)[q] * 1e3 for m, q in metrics]
        print(f"{name:>26s}" + "".join(f"{v:14.3f}" for v in values)
              + f"{result.output_tokens_per_s:10.1f}{wall:9.2f}")
        if base is None:
            base = values
        else:
            print(f"{'difference':>26s}" + "".join(f"{(v / b - 1) * 100:+13.2f}%" for v, b in zip(values, base)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s (Poisson)")
    parser.add_argument("--big", type=int, default=10000, help="requests of the timing run (0: skip)")
    args = parser.parse_args()

    from demo import compiled_smollm2
    from vllm import LLM

    from optimum.rbln.decoder_only.step_cost import GraphStepCost
    from vllm_rbln.replay import replay

    model, _, _ = compiled_smollm2()
    folder = model._source
    o = model.rbln_config
    print(f"SmolLM2-135M-Instruct on {model.compiled_models['model'].npu}: batch {o.batch_size}, "
          f"prefill chunks {o.prefill_chunk_sizes}, decode batches {o.decoder_batch_sizes}, "
          f"max_seq_len {o.max_seq_len}")
    trace = poisson_trace(args.requests, args.rate, PROMPT, OUTPUT, seed=0)
    print(f"trace: {len(trace)} requests, Poisson {args.rate:g}/s, prompts {PROMPT[0]}-{PROMPT[1]}, "
          f"outputs {OUTPUT[0]}-{OUTPUT[1]} tokens\n")
    llm = LLM(model=str(folder), device="rbln", max_num_seqs=o.batch_size, max_model_len=o.max_seq_len)
    start = time.perf_counter()
    real = replay(llm, trace)
    real_wall = time.perf_counter() - start
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    cost = GraphStepCost.of(model)
    start = time.perf_counter()
    sim = simulate(trace, cost, scheduler.vllm_config, scheduler.kv_cache_config)
    sim_wall = time.perf_counter() - start
    # rbln-plan's cost from the config alone: 1 and 2 layers compiled on meta tensors with the
    # folder's options, extrapolated to 30 (rebel.plan.Predictor), the same scheduler settings
    from optimum.rbln.offline import smollm2_folder
    from rebel.plan import Predictor
    start = time.perf_counter()
    predictor = Predictor(smollm2_folder(), o.npu or "RBLN-CA25", tp=o.tensor_parallel_size,
                          chunk=o.prefill_chunk_size, chunk_sizes=o.prefill_chunk_sizes,
                          batches=o.decoder_batch_sizes, max_seq_len=o.max_seq_len,
                          block_size=o.kvcache_block_size)
    planned = simulate(trace, predictor.step_cost(), scheduler.vllm_config, scheduler.kv_cache_config)
    plan_wall = time.perf_counter() - start
    table({"served (vllm_rbln)": (real, real_wall), "simulated (graphs)": (sim, sim_wall),
           "simulated (rbln-plan)": (planned, plan_wall)})
    print(f"\nserved: {real}\nsimulated: {sim}")
    if args.big:
        big = poisson_trace(args.big, args.rate, PROMPT, OUTPUT, seed=1)
        start = time.perf_counter()
        result = simulate(big, cost, scheduler.vllm_config, scheduler.kv_cache_config, progress=True)
        print(f"\n{args.big} requests simulated in {time.perf_counter() - start:.1f} s: {result}")


if __name__ == "__main__":
    main()
