"""Compile time of SmolLM2-135M-Instruct, one-pass capture against two-pass, in one run.

The call is the demo's (examples/demo.py `compiled_smollm2`): `RBLNLlamaForCausalLM.from_pretrained
(folder, export=True, ...)` for batch 4 with decode graphs for 1 and 4 sequences, 2048 tokens and
prefill chunks of 64 and 128, i.e. four graphs, each captured with torch.export. Capture either
traces each graph once with the decomposition table applied (`rebel.compiler.one_pass`, the
default) or twice (`RBLN_CAPTURE_ONE_PASS=0`: export, then `run_decompositions`). The two modes
alternate, `--repeat` times each, so machine noise hits both alike; the figures are the best and
the median seconds per mode and their ratio. The compiled programs and weights of the two modes
are then compared: they must be identical, or the run fails.

--profile: the top phases by cumulative time of one compile per mode (cProfile).

Usage: python benchmarks/compile_time.py [--repeat 3] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import torch

from optimum.rbln import RBLNLlamaForCausalLM
from optimum.rbln.offline import smollm2_folder
from rebel.compiler.capture import ONE_PASS_ENV

# the demo's options (examples/demo.py compiled_smollm2)
OPTIONS = dict(rbln_batch_size=4, rbln_max_seq_len=2048, rbln_prefill_chunk_size=128,
               rbln_decoder_batch_sizes=[1, 4])
MODES = {"one-pass": "1", "two-pass": "0"}


def compile_once(folder, mode: str, profile: bool):
    """(seconds, model, profile text or None) for one compile in `mode`."""
    previous = os.environ.get(ONE_PASS_ENV)
    os.environ[ONE_PASS_ENV] = MODES[mode]
    profiler = cProfile.Profile() if profile else None
    try:
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        model = RBLNLlamaForCausalLM.from_pretrained(folder, export=True, **OPTIONS)
        if profiler:
            profiler.disable()
        seconds = time.perf_counter() - start
    finally:
        if previous is None:
            os.environ.pop(ONE_PASS_ENV, None)
        else:
            os.environ[ONE_PASS_ENV] = previous
    text = None
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
        text = out.getvalue()
    return seconds, model, text


def differences(a, b) -> list[str]:
    """Where two compiled models differ: graph names, programs (every bucket), weights."""
    found = []
    if sorted(a.compiled_models) != sorted(b.compiled_models):
        return [f"graphs {sorted(a.compiled_models)} vs {sorted(b.compiled_models)}"]
    for name in sorted(a.compiled_models):
        ca, cb = a.compiled_models[name].compiled, b.compiled_models[name].compiled
        if [p.to_json() for p in ca.buckets] != [p.to_json() for p in cb.buckets]:
            found.append(f"{name}: programs differ")
        if list(ca.weights) != list(cb.weights):
            found.append(f"{name}: weight names or order differ")
        else:
            bad = [w for w in ca.weights if ca.weights[w].dtype != cb.weights[w].dtype
                   or not torch.equal(ca.weights[w], cb.weights[w])]
            if bad:
                found.append(f"{name}: {len(bad)} weights differ (first {bad[0]})")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="compiles per mode (default 1)")
    parser.add_argument("--profile", action="store_true",
                        help="print the top phases by cumulative time of one compile per mode")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    folder = smollm2_folder()
    times = {mode: [] for mode in MODES}
    models, profiles = {}, {}
    for i in range(args.repeat):
        for mode in MODES:
            seconds, models[mode], text = compile_once(folder, mode, args.profile and i == 0)
            times[mode].append(seconds)
            if text:
                profiles[mode] = text
            print(f"  {mode} compile {i + 1}: {seconds:.1f} s", flush=True)
    for mode, text in profiles.items():
        print(f"\n=== {mode}: top phases by cumulative time ===\n{text}")
    graphs = sum(len(c.buckets) for c in models["one-pass"].compiled_models.values())
    print(f"\nSmolLM2-135M compile ({graphs} graphs, "
          f"{args.repeat} run(s) per mode, {torch.get_num_threads()} threads)")
    for mode, values in times.items():
        print(f"  {mode:9s} best {min(values):6.1f} s   median {statistics.median(values):6.1f} s")
    ratio = min(times["two-pass"]) / min(times["one-pass"])
    print(f"  two-pass / one-pass (best): {ratio:.2f}x")
    found = differences(models["one-pass"], models["two-pass"])
    if found:
        print("artifacts DIFFER:\n  " + "\n  ".join(found))
        return 1
    print("artifacts identical (programs of every bucket, weight names, order and values)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
