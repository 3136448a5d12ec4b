"""The search's estimate against a trace replay, from a config alone: one replica of a planned
deployment serves a Poisson trace through vLLM's scheduler in virtual time
(`rebel.plan.serving.simulate`), each step costed by `Predictor.step_cost()` (1 and 2 layers
compiled, extrapolated), beside the steady-state estimate `rbln-plan --search` uses.

    PYTHONPATH=src python benchmarks/plan_replay.py                 # Llama-3-8B, TP=4, 2.5 req/s
    PYTHONPATH=src python benchmarks/plan_replay.py --slots 32      # the queue at a full batch
"""
from __future__ import annotations

import argparse
import statistics
import time

from rebel.plan import Planner
from rebel.plan.planner import _serve
from rebel.plan.predict import DEFAULT_BATCHES
from rebel.plan.serving import poisson_trace, scheduler_config, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="examples/configs/llama-3-8b")
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--rate", type=float, default=2.5, help="requests/s to one replica")
    parser.add_argument("--slots", type=int, default=64, help="max batch (sequence slots)")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=256)
    args = parser.parse_args()
    start = time.perf_counter()
    planner = Planner(args.config)
    batches = tuple(b for b in DEFAULT_BATCHES if b <= args.slots)
    pred = planner.predictor(args.tp, batches, args.prompt_len + args.output_len)
    memory = pred.memory()
    prefill = pred.ttft(args.prompt_len).seconds
    steps = {b: pred.tpot(b, args.prompt_len, args.output_len).seconds for b in batches}
    est = _serve(args.rate, prefill, steps, list(batches), args.output_len, float("inf"),
                 float("inf"), slots=args.slots)
    vllm_config, kv = scheduler_config(args.config, max_num_seqs=args.slots,
                                       max_model_len=pred.max_seq_len, block_size=pred.block_size,
                                       num_blocks=memory.kv_blocks_total)
    trace = poisson_trace(args.requests, args.rate, args.prompt_len, args.output_len, seed=1)
    result = simulate(trace, pred.step_cost(), vllm_config, kv)
    print(result)
    ttft = statistics.mean(r.ttft_s for r in result.requests)
    tpot = statistics.mean(r.tpot_s for r in result.requests if r.tpot_s is not None)
    print(f"replay:   mean TTFT {ttft * 1e3:.1f} ms, mean TPOT {tpot * 1e3:.2f} ms")
    if est is None:
        print("estimate: the replica cannot keep up at this rate")
    else:
        print(f"estimate: mean TTFT {est[2] * 1e3:.1f} ms, mean TPOT {est[3] * 1e3:.2f} ms "
              f"({est[1]:.1f} running, prefill {est[4]:.0%} busy)")
    print(f"wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
