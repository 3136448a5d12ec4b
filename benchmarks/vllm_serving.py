"""Serving SmolLM2-135M-Instruct with vLLM three ways, on the same requests, max_num_seqs and
max_tokens, side by side:

- Path A, vllm_rbln on the folder compiled by optimum.rbln (its prefill and decode graphs);
- Path B, vllm_rbln with VLLM_RBLN_USE_VLLM_MODEL=1: vLLM's own Llama class on the Hugging Face
  folder, compiled by torch.compile(backend="rbln"), attending through the device's paged
  attention op between the graphs;
- stock vLLM on this CPU (the plugin off: RBLN_VLLM_PLATFORM=0), eager (no Inductor compile);

and, on Path A's compiled folder, static batches of optimum.rbln's generate (no vLLM).

vLLM picks its platform once per process, so each vLLM run is a subprocess of this script. For
each the script prints the output tokens/s of this machine's wall time (an emulation for the
RBLN paths: it says nothing about the chip) and, for the RBLN paths, the predicted NPU time of
the steps (timing model of a virtual RBLN-CA25 die) and the output tokens/s it implies; for
Path B the share of that time spent in attention, which runs between the compiled graphs. Engine
start (loading, compiling or loading graphs from the compile cache, warm-up) is not in the wall
time. Requests ask for different numbers of tokens, as real traffic does: a static batch runs
until its longest request ends, while vLLM refills a finished request's slot at once.

    .venv/bin/python benchmarks/vllm_serving.py [--requests 16] [--paths A,B,cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

PATHS = {"A": "vLLM + vllm_rbln, Path A (compiled folder)",
         "B": "vLLM + vllm_rbln, Path B (vLLM's Llama)",
         "cpu": "stock vLLM on the CPU (plugin off)"}
# A step's token budget: Path A's compiled prefill chunk, and Path B's largest graph bucket
# (every prefill step pads up to it), so the three runs schedule the same steps.
MAX_BATCHED_TOKENS = 128


def workload(n: int):
    """n token-id prompts of 20-80 tokens, each wanting 8-96 new tokens (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (int(torch.randint(20, 80, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(n)]
    wants = [int(torch.randint(8, 96, (1,), generator=g)) for _ in range(n)]
    return prompts, wants


def static_batches(model, prompts, wants, size: int):
    """optimum.rbln generate, `size` requests at a time, each batch as long as its longest."""
    from optimum.rbln.decoder_only.modeling import left_padded

    predicted = wall = 0.0
    for start in range(0, len(prompts), size):
        ids, mask = left_padded(prompts[start:start + size])
        model.generate(ids, attention_mask=mask, max_new_tokens=max(wants[start:start + size]),
                       eos_token_id=[])
        report = model.last_generation_report
        predicted += report.predicted_s
        wall += report.wall_s
    return predicted, wall


# --- one vLLM run (a subprocess) -------------------------------------------------------------

def serve(job: dict) -> dict:
    """Start the engine of `job["llm"]`, generate the workload greedily, return the figures."""
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(**job["llm"])
    engine_s = time.perf_counter() - start
    prompts, wants = workload(job["requests"])
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           [SamplingParams(temperature=0.0, max_tokens=w, ignore_eos=True)
                            for w in wants], use_tqdm=False)
    wall_s = time.perf_counter() - start
    stats = llm.collective_rpc("rbln_stats") if job["path"] != "cpu" else []
    return {"engine_s": engine_s, "wall_s": wall_s, "stats": stats,
            "tokens": [list(o.outputs[0].token_ids) for o in outputs]}


def run_path(path: str, requests: int, compiled: Path, block_size: int, max_len: int,
             size: int, b_block_size: int | None = None) -> dict:
    from optimum.rbln.offline import smollm2_folder

    llm = {"max_num_seqs": size, "max_model_len": max_len,
           "max_num_batched_tokens": MAX_BATCHED_TOKENS}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")}
    if path == "A":
        llm.update(model=str(compiled), device="rbln", block_size=block_size)
        env.update(RBLN_VLLM_PLATFORM="1", VLLM_RBLN_USE_VLLM_MODEL="0")
    elif path == "B":
        # by default the compiled folder's KV block size: attention reads the same blocks (the
        # timing model counts whole blocks, so a sequence in one 2048-token block costs 2048)
        llm.update(model=str(smollm2_folder()), device="rbln",
                   block_size=b_block_size or block_size)
        env.update(RBLN_VLLM_PLATFORM="1", VLLM_RBLN_USE_VLLM_MODEL="1")
    else:
        # its CPU worker reserves this share of host memory for the KV cache (default 0.92)
        llm.update(model=str(smollm2_folder()), enforce_eager=True, gpu_memory_utilization=0.2)
        # vLLM finds its CPU platform from its version string ("+cpu") unless told
        env.update(RBLN_VLLM_PLATFORM="0", VLLM_TARGET_DEVICE="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        job, result = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"path": path, "requests": requests, "llm": llm}))
        run = subprocess.run([sys.executable, __file__, "--job", str(job), "--result", str(result)],
                             env=env, capture_output=True, text=True)
        if run.returncode != 0 or not result.is_file():
            raise RuntimeError(f"{PATHS[path]} failed (exit {run.returncode}):\n"
                               f"{run.stdout[-2000:]}\n{run.stderr[-6000:]}")
        return json.loads(result.read_text())


def predicted(path: str, stats: list[dict]) -> tuple[float, float | None]:
    """(predicted NPU seconds of the run's steps, attention's share of them or None). Path B's
    dies work in lockstep: rank 0's steps are the run's."""
    s = stats[0]
    if path == "A":
        return s["prefill_s"] + s["decode_s"], None
    return s["step_s"], s["attention_s"] / s["step_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--paths", default="A,B,cpu", help="comma-separated, of A, B, cpu")
    parser.add_argument("--no-static", action="store_true", help="skip optimum.rbln's generate")
    parser.add_argument("--b-block-size", type=int,
                        help="Path B's KV block size (default: the compiled folder's)")
    parser.add_argument("--job", help=argparse.SUPPRESS)     # a subprocess's vLLM run
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        Path(args.result).write_text(json.dumps(serve(json.loads(Path(args.job).read_text()))))
        return
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        parser.error(f"unknown path(s) {unknown}; choose from {list(PATHS)}")

    from demo import compiled_smollm2  # the compiled folder `make demo` caches
    model, _, how = compiled_smollm2()
    if how == "compiled":  # reload from the folder it saved: vLLM's Path A serves that folder
        model, _, _ = compiled_smollm2()
    o = model.rbln_config
    prompts, wants = workload(args.requests)
    useful = sum(wants)
    results, failed = {}, {}
    for path in paths:
        print(f"running {PATHS[path]} ...", file=sys.stderr, flush=True)
        try:
            results[path] = run_path(path, args.requests, model._source, o.block_size,
                                     o.max_seq_len, o.batch_size, args.b_block_size)
        except RuntimeError as error:  # the other paths' figures still print
            failed[path] = str(error)
            print(error, file=sys.stderr)
    paths = [p for p in paths if p in results]

    print(f"{args.requests} requests, {useful} output tokens wanted, max_num_seqs "
          f"{o.batch_size}, max_num_batched_tokens {MAX_BATCHED_TOKENS}, KV block "
          f"{o.block_size} (Path B {args.b_block_size or o.block_size}), "
          f"{model.compiled_models['model'].npu}")
    head = (f"{'':44s} {'engine s':>9s} {'wall s':>8s} {'wall tok/s':>11s} "
            f"{'pred NPU s':>11s} {'pred tok/s':>11s} {'attn share':>10s}")
    print(head)
    for path in paths:
        r = results[path]
        made = sum(len(t) for t in r["tokens"])
        line = (f"{PATHS[path]:44s} {r['engine_s']:9.1f} {r['wall_s']:8.1f} "
                f"{made / r['wall_s']:11.1f}")
        if path != "cpu":
            seconds, share = predicted(path, r["stats"])
            line += f" {seconds:11.3f} {made / seconds:11.1f}"
            line += f" {share:10.1%}" if share is not None else f" {'(in graphs)':>10s}"
        print(line)
    if not args.no_static:
        static_predicted, static_wall = static_batches(model, prompts, wants, o.batch_size)
        print(f"{'static batches (optimum.rbln generate)':44s} {'':9s} {static_wall:8.1f} "
              f"{useful / static_wall:11.1f} {static_predicted:11.3f} "
              f"{useful / static_predicted:11.1f}")
    if "A" in results:
        reference = results["A"]["tokens"]
        for path in [p for p in paths if p != "A"]:
            same = sum(a == b for a, b in zip(results[path]["tokens"], reference))
            print(f"{PATHS[path]}: greedy tokens equal to Path A's for {same}/{len(reference)} "
                  "requests (16-bit device vs FP32 host numerics may break near-ties)")
    for path, error in failed.items():
        print(f"{PATHS[path]}: FAILED ({error.splitlines()[-1] if error else ''})")
    if "B" in results:
        s = results["B"]["stats"][0]
        print(f"Path B predicted NPU time: graphs {s['device_time_s']:.3f} s, attention "
              f"{s['attention_s']:.3f} s in {s['attention_calls']} calls, collectives "
              f"{s['collective_s']:.3f} s; warm-up {s.get('graphs_compiled', 0)} graphs compiled, "
              f"{s.get('graphs_from_cache', 0)} from the cache")


if __name__ == "__main__":
    main()
