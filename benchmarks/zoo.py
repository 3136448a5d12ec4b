"""The zoo benchmark: per model, ops, device share, host fallbacks, compile time, emulated run
wall time against PyTorch CPU eager, predicted device latency; then the meta Llama-3-8B decode.

    PYTHONPATH=src python benchmarks/zoo.py [name ...] [--no-llama]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import rebel  # noqa: E402
from zoo.llm import llama3_8b_config, llama_decode_step  # noqa: E402
from zoo.models import ZOO  # noqa: E402


def _best(fn, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench(entry) -> dict:
    torch.random.default_generator.manual_seed(0)
    model, inputs = entry.build()
    model.eval()
    with torch.no_grad():
        ref = model(*inputs)
        eager = _best(lambda: model(*inputs))
    start = time.perf_counter()
    compiled = rebel.compile_from_torch(model, inputs)
    compile_s = time.perf_counter() - start
    report = rebel.explain(compiled).buckets[0]
    runtime = compiled.create_runtime()
    out = runtime.run(*inputs)
    wall = _best(lambda: runtime.run(*inputs))
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    return {"model": entry.name, "family": entry.family, "ops": report.device_ops + report.host_ops,
            "kernels": sum(len(s.kernels) for s in report.segments),
            "device": report.device_share, "host": report.host_ops, "compile_s": compile_s,
            "run_ms": wall * 1e3, "eager_ms": eager * 1e3, "pred_us": report.predicted_latency_s * 1e6,
            "err": err}


def main(argv: list[str]) -> None:
    names = [a for a in argv if not a.startswith("--")]
    rows = [bench(z) for z in ZOO if not names or z.name in names]
    head = (f"{'model':<18}{'family':<16}{'ops':>5}{'kernels':>8}{'device':>8}{'host':>5}"
            f"{'compile s':>10}{'run ms':>8}{'eager ms':>9}{'slowdown':>9}{'pred us':>9}{'rel err':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<18}{r['family']:<16}{r['ops']:>5}{r['kernels']:>8}{r['device']:>8.0%}"
              f"{r['host']:>5}{r['compile_s']:>10.2f}{r['run_ms']:>8.2f}{r['eager_ms']:>9.2f}"
              f"{r['run_ms'] / r['eager_ms']:>8.1f}x{r['pred_us']:>9.1f}{r['err']:>9.1e}")
    if "--no-llama" not in argv:
        step, inputs = llama_decode_step(llama3_8b_config(), past=1024, device="meta")
        start = time.perf_counter()
        compiled = rebel.compile_from_torch(step, inputs, npu="RBLN-CA25")
        seconds = time.perf_counter() - start
        report = rebel.explain(compiled).buckets[0]
        print(f"\nLlama-3-8B decode step on meta (1 token after 1024, FP16, one ATOM die of "
              f"{compiled.npu}): compile {seconds:.1f} s, {report.device_ops} device ops, "
              f"{report.host_ops} host; device memory {compiled.device_memory_bytes() / 2**30:.2f} "
              f"GiB (weights + KV cache {compiled.program.weight_bytes / 2**30:.2f} GiB); predicted "
              f"decode latency {compiled.predicted_latency_s() * 1e3:.2f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
