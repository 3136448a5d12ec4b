"""Profiler cost per run, early vs late: does tracing run 200 cost what tracing run 10 did?

    PYTHONPATH=src .venv/bin/python benchmarks/profiler_overhead.py [--runs 200] [--llm]

Runs a small compiled MLP `--runs` times with and without the profiler and prints, for runs
1..10 and for the last 10, the median and worst wall time per run, the time spent inside the
profiler's `TraceFile.add` (less noisy than on minus off on a shared machine), and the bytes
the trace file grew per run. An appending profiler keeps all of these flat; one that keeps
every event and rewrites the file shows late runs growing (or spiking at each rewrite).
Whether the file on disk already holds the last run, without a flush, is printed too.
`--llm` does the same for decode steps of a small random Llama (tests/test_optimum_llm.py's
shapes), profiled through RBLN_PROFILER=1: one trace file per compiled graph.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import rebel
from rebel.profiler import read_trace
from rebel.profiler.trace_file import TraceFile

ADD_TIMES: list[float] = []  # seconds inside TraceFile.add, per call: the profiler's own cost
_add = TraceFile.add


def _timed_add(self, events, span_s):
    t = time.perf_counter()
    _add(self, events, span_s)
    ADD_TIMES.append(time.perf_counter() - t)


TraceFile.add = _timed_add


def _runs(runtime, x, n: int, path: Path | None) -> tuple[list[float], list[int], list[bool]]:
    times, grown, complete = [], [], []
    for i in range(n):
        size = path.stat().st_size if path is not None and path.exists() else 0
        t = time.perf_counter()
        runtime.run(x)
        times.append(time.perf_counter() - t)
        if path is not None:  # read the file as it is, without asking the runtime to flush
            grown.append(path.stat().st_size - size)
            if i in (9, n - 1):
                launches = sum(s.category == "launch" for s in read_trace(path))
                complete.append(launches == i + 1)
    return times, grown, complete


def _table(n: int, t_off: list[float], t_on: list[float], grown: list[int]) -> None:
    """Run wall times off/on, time inside TraceFile.add (the last n calls) and bytes appended."""
    adds = ADD_TIMES[-n:]
    print(f"{'runs':>10} {'off med us':>11} {'on med us':>10} {'on max us':>10} "
          f"{'add() med us':>13} {'bytes/run':>10}")
    for label, window in (("1..10", slice(0, 10)), (f"{n - 9}..{n}", slice(n - 10, n))):
        off_med = statistics.median(t_off[window]) * 1e6
        on_med = statistics.median(t_on[window]) * 1e6
        print(f"{label:>10} {off_med:11.1f} {on_med:10.1f} {max(t_on[window]) * 1e6:10.1f} "
              f"{statistics.median(adds[window]) * 1e6:13.1f} {statistics.median(grown[window]):10.0f}")


def llm(steps: int) -> None:
    """Decode steps of a small random Llama, profiler off then on (RBLN_PROFILER=1)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from optimum.rbln import RBLNLlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=512)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).eval().save_pretrained(f"{tmp}/llama")
        folder = Path(tmp) / "traces"
        results = {}
        for profile in (False, True):
            os.environ["RBLN_PROFILER"] = "1" if profile else "0"
            os.environ["RBLN_PROFILER_DIR"] = str(folder)
            model = RBLNLlamaForCausalLM.from_pretrained(
                f"{tmp}/llama", export=True, rbln_batch_size=1, rbln_max_seq_len=(steps // 32 + 2) * 32,
                rbln_kvcache_partition_len=32, rbln_prefill_chunk_size=16)
            session = model.start_session([torch.arange(1, 9)])
            token = session.prefill()[0].argmax(-1, keepdim=True)
            times, grown = [], []
            for _ in range(steps):
                size = sum(f.stat().st_size for f in folder.glob("*.pb"))
                t = time.perf_counter()
                token = session.step(token, [0])[0].argmax(-1, keepdim=True)
                times.append(time.perf_counter() - t)
                grown.append(sum(f.stat().st_size for f in folder.glob("*.pb")) - size)
            results[profile] = times, grown
        os.environ.pop("RBLN_PROFILER")
    print(f"{steps} decode steps of a 2-layer random Llama (hidden 64), batch 1")
    _table(steps, results[False][0], results[True][0], results[True][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--llm", action="store_true", help="decode steps of a small Llama instead")
    args = parser.parse_args()
    if args.llm:
        return llm(args.runs)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    x = torch.randn(8, 64)
    with tempfile.TemporaryDirectory() as tmp:
        compiled = rebel.compile_from_torch(model, example_inputs=[x])
        path = Path(tmp) / "trace.pb"
        off = rebel.Runtime(compiled, tensor_type="pt", activate_profiler=False)
        on = rebel.Runtime(compiled, tensor_type="pt", activate_profiler=True, trace_path=path)
        t_off, _, _ = _runs(off, x, args.runs, None)
        t_on, grown, complete = _runs(on, x, args.runs, path)
        size = os.path.getsize(path)
    n = args.runs
    print(f"{n} runs of a {sum(p.numel() for p in model.parameters())}-parameter MLP; "
          f"trace {size / 1024:.1f} KiB")
    _table(n, t_off, t_on, grown)
    print(f"file complete right after run 10 and run {n} (no flush): {all(complete)}")


if __name__ == "__main__":
    main()
