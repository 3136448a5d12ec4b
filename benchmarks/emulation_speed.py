"""Emulation speed, side by side in one run: `Runtime.run` against PyTorch CPU eager.

Rows: a transformer encoder block (batch_first MultiheadAttention, LayerNorm, GELU MLP), an MLP,
and (with --llm, when the offline SmolLM2-135M fixture loads) SmolLM2 `generate` tokens/s
against Hugging Face eager. Each figure is a ratio measured in one process with eager and the
emulation interleaved, repeated, medians taken (the machine is shared and noisy).

--tree PATH (repeatable) measures other source trees too, e.g. `--tree /work/main/src` for the
code before a change: each tree runs in its own worker process, workers alternate, and the
table shows every tree's medians side by side. `--interpret` adds this tree's reference
interpreter (RBLN_EXECUTOR=interpret) as a column.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "src"


def _encoder():
    import torch

    return torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True, activation="gelu",
                                            dropout=0.0).eval(), torch.randn(4, 64, 256)


def _mlp():
    import torch

    layers = []
    for _ in range(4):
        layers += [torch.nn.Linear(1024, 1024), torch.nn.GELU()]
    return torch.nn.Sequential(*layers).eval(), torch.randn(64, 1024)


def _median_time(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _module_ratio(make, repeats: int) -> dict:
    import torch

    import rebel

    torch.manual_seed(0)
    model, x = make()
    runtime = rebel.Runtime(rebel.compile_from_torch(model, example_inputs=[x]), tensor_type="pt")
    eager, emulated = [], []
    with torch.inference_mode():
        for _ in range(3):  # interleaved, so noise hits both alike
            eager.append(_median_time(lambda: model(x), repeats))
            emulated.append(_median_time(lambda: runtime.run(x), repeats))
    e, r = statistics.median(eager), statistics.median(emulated)
    return {"eager_ms": e * 1e3, "rbln_ms": r * 1e3, "ratio": r / e,
            "weight_MiB": runtime.program.weight_bytes / 2**20}


def _llm(new_tokens: int) -> dict | None:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        from optimum.rbln import RBLNLlamaForCausalLM
        from optimum.rbln.offline import smollm2_folder

        folder = smollm2_folder()
    except Exception as e:  # the offline fixture is optional
        return {"skipped": f"{type(e).__name__}: {e}"[:120]}
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    rbln = RBLNLlamaForCausalLM.from_pretrained(folder, export=True, rbln_batch_size=1,
                                               rbln_max_seq_len=512, rbln_prefill_chunk_size=64,
                                               rbln_decoder_batch_sizes=[1])
    ids = torch.randint(100, 10000, (1, 36), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    hf_s, rbln_s = [], []
    with torch.no_grad():
        hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=2)
        rbln.generate(ids, attention_mask=mask, max_new_tokens=2, eos_token_id=[])
        for _ in range(3):
            t0 = time.perf_counter()
            hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, pad_token_id=0)
            hf_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rbln.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=[])
            rbln_s.append(time.perf_counter() - t0)
    h, r = statistics.median(hf_s), statistics.median(rbln_s)
    return {"hf_tok_s": new_tokens / h, "rbln_tok_s": new_tokens / r, "ratio": h / r}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)  # one thread: less exposed to other load on the machine
    os.environ["RBLN_NUM_THREADS"] = str(args.threads)  # the runtime's runs too (else: the free cores)
    out = {"encoder block 4x64x256": _module_ratio(_encoder, args.repeats),
           "MLP 1024x4, batch 64": _module_ratio(_mlp, args.repeats)}
    if args.llm:
        out["SmolLM2 generate b1"] = _llm(args.new_tokens)
    print("RESULT " + json.dumps(out))


def _run_worker(src: str, args, interpret: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=src, TORCH_DEVICE_BACKEND_AUTOLOAD="0")  # rebel only
    if interpret:
        env["RBLN_EXECUTOR"] = "interpret"
    cmd = [sys.executable, __file__, "--worker", "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--new-tokens", str(args.new_tokens)] + (["--llm"] if args.llm else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker for {src} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="worker runs per tree (alternating)")
    parser.add_argument("--tree", action="append", default=[], help="another src/ to measure")
    parser.add_argument("--interpret", action="store_true", help="add this tree's interpreter")
    parser.add_argument("--llm", action="store_true", help="add SmolLM2 generate (slow)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each worker")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    columns = [(f"{t}", t, False) for t in args.tree] + [("this tree", str(HERE), False)]
    if args.interpret:
        columns.append(("this tree, interpreter", str(HERE), True))
    results: dict[str, list[dict]] = {c[0]: [] for c in columns}
    for _ in range(args.rounds):
        for label, src, interpret in columns:
            results[label].append(_run_worker(src, args, interpret))
    rows = list(results[columns[-1][0]][0])
    print(f"ratios: emulated time / eager time for modules, emulated tok/s / HF tok/s for the LLM "
          f"(median of {args.rounds} workers x 3 interleaved sets x {args.repeats} runs)")
    for row in rows:
        print(f"\n{row}")
        for label, _, _ in columns:
            runs = [r[row] for r in results[label] if r.get(row)]
            if not runs or "skipped" in runs[0]:
                print(f"  {label:40s} skipped: {runs[0]['skipped'] if runs else 'no result'}")
                continue
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            figures = "  ".join(f"{k} {v:8.2f}" for k, v in med.items())
            print(f"  {label:40s} {figures}")


if __name__ == "__main__":
    main()
