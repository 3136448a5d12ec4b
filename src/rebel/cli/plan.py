"""`rbln-plan`: capacity planning from a Hugging Face config.json, on the command line.

    rbln-plan examples/configs/llama-3-8b --tp 4 --batch 1 8 64
    rbln-plan examples/configs/llama-3-8b --search --ttft-ms 500 --tpot-ms 50 --rps 10
    rbln-plan examples/configs/qwen3-32b --cards 0      # the fewest cards it fits on
    rbln-plan examples/configs/llama-3-8b --tp 4 --batch 1 8 32 64 --simulate 1000 --rps 2.5
    rbln-plan examples/configs/llama-3-8b --tp 4 --batch 1 8 32 --report out/   # HTML + plots
    rbln-plan examples/configs/llama-3-8b --search --rps 10 --verify 300  # tails, by replay
    rbln-plan examples/configs/bert-large --seq-len 128 384 --batch 1 8   # encoders
    rbln-plan examples/configs/cosmos-7b-text2world --tp 32               # diffusers folders

Without --search it prints one plan (fits?, TTFT, TPOT per batch bucket, tokens/s, watts,
tokens per joule, the bottleneck of each phase); --search tries TP sizes, batch buckets and
replica counts and prints the cheapest deployments meeting the SLOs. `--simulate N` (or
`--trace FILE.jsonl`) replays N Poisson requests at --rps (or the trace) through vLLM's own
scheduler in virtual time on one replica of the plan, each step costed by the predicted graphs,
and prints TTFT / TPOT percentiles, queueing and preemptions (needs vLLM: the `vllm` extra).
`--report DIR` writes an HTML page with plots of all of it. `--json` prints the same answers as
one JSON object for scripts. Every figure is predicted (rebel.plan), not measured.
Encoder configs and diffusers pipeline folders are planned by `plan_families` (docs/planning.md).
The exit status is 1 when the plan does not fit, 2 on an error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from ..errors import RBLNError
from ..npu.spec import GiB

PROG = "rbln-plan"
NOTE = "Predicted by open-rbln's timing model from the config alone (meta tensors), not measured."


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return _run(args)
    except (RBLNError, ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="How many RBLN cards, which TP and batch, "
                                "at what latency and cost, for a Hugging Face decoder LLM or encoder config or a "
                                "diffusers pipeline folder.")
    p.add_argument("config", help="config.json or a folder holding one (or model_index.json)")
    p.add_argument("--hardware", default="RBLN-CA25", help="product name or spec .toml (default RBLN-CA25)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--weights", default=None, choices=("int8", "int4"),
                   help="weight-only quantized linears (the LM head stays in --dtype)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: one card's dies)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="decode batch bucket(s) (plan default: 1; search default: 1 2 4 ... 128)")
    p.add_argument("--cards", type=int, default=None,
                   help="cards to deploy on (plan; 0: the fewest one replica fits on) or the most "
                        "to consider (search, default 8)")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--search", action="store_true", help="search TP, batch and cards for the SLOs")
    p.add_argument("--ttft-ms", type=float, default=500.0, help="search: time-to-first-token SLO")
    p.add_argument("--tpot-ms", type=float, default=50.0, help="search: time-per-output-token SLO")
    p.add_argument("--rps", type=float, default=1.0, help="search: requests per second to serve")
    p.add_argument("--top", type=int, default=10, help="search: deployments to print")
    p.add_argument("--exact", action="store_true",
                   help="compile every layer instead of extrapolating from 1 and 2 (slow)")
    p.add_argument("--simulate", type=int, default=0, metavar="N",
                   help="replay N Poisson requests at --rps through vLLM's scheduler (one replica)")
    p.add_argument("--trace", default=None, metavar="FILE",
                   help="replay this JSONL trace instead (arrival_s, prompt_len, output_len per line)")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="search: replay N Poisson requests on each deployment found (vLLM's "
                        "scheduler) and report its TTFT / TPOT p90, which the search estimates as means")
    p.add_argument("--report", default=None, metavar="DIR", help="write an HTML report with plots")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    e = p.add_argument_group("encoders (bert, roberta, xlm-roberta, distilbert, t5 encoder, ...)")
    e.add_argument("--seq-len", type=int, nargs="+", default=None,
                   help="sequence length bucket(s) (default 128)")
    e.add_argument("--latency-ms", type=float, default=100.0, help="search: mean latency SLO")
    e.add_argument("--allow-untested", action="store_true",
                   help="plan any base model transformers' AutoModel builds for the config")
    d = p.add_argument_group("diffusers pipelines (a folder holding model_index.json)")
    d.add_argument("--height", type=int, default=None)
    d.add_argument("--width", type=int, default=None)
    d.add_argument("--frames", type=int, default=None)
    d.add_argument("--steps", type=int, default=None, help="denoising steps")
    d.add_argument("--no-guidance", action="store_true",
                   help="no classifier-free guidance (one denoiser half, no negative prompt)")
    d.add_argument("--prompt-tokens", type=int, default=None,
                   help="text encoder tokens (default: 512 for T5, the position limit for CLIP)")
    return p


def _run(args) -> int:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the simulation's scheduler: no INFO chatter
    from ..plan import Planner
    from ..plan.predict import DEFAULT_BATCHES
    from .plan_families import family, run_encoder, run_pipeline

    kind = family(args.config, args.allow_untested)
    if kind != "decoder":
        return (run_pipeline if kind == "pipeline" else run_encoder)(args, _console())
    planner = Planner(args.config, args.hardware, args.dtype, exact=args.exact, weights=args.weights)
    if args.search:
        if args.tp is not None and args.tp < 1:
            raise RBLNError(f"--tp must be positive, got {args.tp}")
        result = _with_progress(args.json, lambda progress: planner.search(
            args.rps, args.ttft_ms, args.tpot_ms, args.prompt_len, args.output_len,
            batches=args.batch or DEFAULT_BATCHES,
            max_cards=8 if args.cards is None else args.cards,
            tp_sizes=[args.tp] if args.tp else None, progress=progress, top=args.top))
        verified = _verify(planner, result, args) if args.verify and result.deployments else []
        if args.json:
            out = result.to_dict()
            for d, v in zip(out["deployments"], verified):
                d["verified"] = v.summary()
            print(json.dumps(out, indent=2))
        else:
            _print_search(result)
            if verified:
                _print_verified(result, verified)
        if args.report:
            _report(args, search=result)
        return 0
    if args.cards == 0:
        result = planner.min_cards(args.prompt_len, args.output_len, (args.batch or [1])[-1])
    else:
        result = planner.plan(args.tp, args.batch or [1], args.prompt_len, args.output_len,
                              args.cards)
    fewest = None
    if not result.fits:  # say how many cards it needs, or by how much it misses everywhere
        try:
            best = planner.min_cards(args.prompt_len, args.output_len, (args.batch or [1])[-1])
            fewest = {"cards": best.cards, "tp": best.tp, "weights_per_die_bytes": best.memory.weights,
                      "kv_blocks_left": best.kv_blocks_left}
        except RBLNError as e:
            fewest = {"error": str(e)}
    serving = None
    if result.fits and (args.simulate or args.trace):
        serving = _simulate(planner, result, args)
    if args.json:
        out = {**result.to_dict(), "fewest_cards": fewest}
        if serving is not None:
            out["serving"] = serving.summary()
        print(json.dumps(out, indent=2))
    else:
        _print_plan(result)
        if fewest is not None:
            _console().print(fewest["error"] if "error" in fewest else
                             f"It fits on {fewest['cards']} card(s) at TP={fewest['tp']} "
                             f"({fewest['kv_blocks_left']} KV blocks left): rbln-plan "
                             f"{args.config} --tp {fewest['tp']}", soft_wrap=True)
        if serving is not None:
            _print_serving(serving)
    if args.report:
        _report(args, plans=[result], serving=serving)
    return 0 if result.fits else 1


def _verify(planner, result, args) -> list:
    """Each deployment's replica serving `--verify` Poisson requests through vLLM's scheduler."""
    from ..plan.predict import DEFAULT_BATCHES
    from ..plan.serving import poisson_trace

    folder = _config_folder(args.config)
    return [_replay(planner, folder, d.tp, [b for b in (args.batch or DEFAULT_BATCHES) if b <= d.batch],
                    args.prompt_len + args.output_len,
                    poisson_trace(args.verify, args.rps / d.replicas, args.prompt_len,
                                  args.output_len, seed=0))
            for d in result.deployments]


def _print_verified(result, verified) -> None:
    from rich.table import Table

    t = Table(title="Replayed through vLLM's scheduler (one replica each)")
    for col in ("cards", "TP", "replicas", "TTFT p50 / p90 ms", "TPOT p50 / p90 ms", "p90 meets SLOs"):
        t.add_column(col, justify="right")
    for d, v in zip(result.deployments, verified):
        ttft, tpot = v.percentiles("ttft"), v.percentiles("tpot")
        ok = ttft[90] <= result.ttft_slo_s and tpot[90] <= result.tpot_slo_s
        t.add_row(str(d.cards), str(d.tp), str(d.replicas), f"{ttft[50] * 1e3:.0f} / {ttft[90] * 1e3:.0f}",
                  f"{tpot[50] * 1e3:.1f} / {tpot[90] * 1e3:.1f}", "yes" if ok else "no")
    _console().print(t)


def _simulate(planner, plan, args):
    """The plan's trace replay: one replica (the request rate split over the replicas)."""
    from ..plan.serving import load_trace, poisson_trace

    if args.trace:
        trace = load_trace(args.trace)
    else:
        if args.simulate < 1:
            raise RBLNError(f"--simulate takes a number of requests >= 1, got {args.simulate}")
        trace = poisson_trace(args.simulate, args.rps / plan.replicas, args.prompt_len,
                              args.output_len, seed=0)
    longest = max(r.prompt_len + r.output_len for r in trace)
    return _replay(planner, _config_folder(args.config), plan.tp, [d.batch for d in plan.decode],
                   max(longest, args.prompt_len + args.output_len), trace,
                   progress=not args.json and sys.stderr.isatty())


def _replay(planner, folder: str, tp: int, batches: list[int], max_seq_len: int, trace,
            progress: bool = False):
    """One replica at `tp` with these batch buckets (the largest: its sequence slots) and the
    KV blocks its dies hold, serving `trace` through vLLM's scheduler."""
    from ..plan.serving import scheduler_config, simulate

    pred = planner.predictor(tp, batches, max_seq_len)
    blocks = pred.memory().kv_blocks_total
    if blocks < pred.blocks_per_seq:
        raise RBLNError(f"the KV cache holds {blocks} blocks, fewer than one sequence of "
                        f"{pred.max_seq_len} tokens needs ({pred.blocks_per_seq})")
    with contextlib.redirect_stdout(sys.stderr):  # vLLM logs to stdout: keep it for the answer
        vllm_config, kv = scheduler_config(folder, max_num_seqs=max(batches),
                                           max_model_len=pred.max_seq_len,
                                           block_size=pred.block_size, num_blocks=blocks)
        return simulate(trace, pred.step_cost(), vllm_config, kv, progress=progress)


def _config_folder(config: str) -> str:
    """vLLM reads a model folder: the config's own, or a temporary one holding a copy of it."""
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(config)
    if path.is_dir() or path.name == "config.json":
        return str(path if path.is_dir() else path.parent)
    folder = Path(tempfile.mkdtemp(prefix="rbln-plan-"))
    shutil.copy(path, folder / "config.json")
    return str(folder)


def _report(args, plans=(), search=None, serving=None) -> None:
    from ..plan.report import write_report

    page = write_report(args.report, plans, search, serving)
    print(f"report: {page}", file=sys.stderr if args.json else sys.stdout)


def _print_serving(result) -> None:
    from rich.table import Table

    console = _console()
    s = result.summary()
    console.print(f"Simulated trace (vLLM's scheduler, predicted step times): {s['requests']} "
                  f"requests, {s['steps']} engine steps, {s['preemptions']} preemptions, "
                  f"{s['output_tokens_per_s']:.0f} output tok/s", soft_wrap=True)
    t = Table(title="Latency over the trace")
    for col in ("", "p50 ms", "p90 ms", "p99 ms"):
        t.add_column(col, justify="right")
    for name, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("queued", "queued")):
        t.add_row(name, *(f"{s[f'{key}_p{q}_s'] * 1e3:.2f}" for q in (50, 90, 99)))
    console.print(t)


def _with_progress(quiet: bool, work):
    """Run `work(progress)` with a rich bar on stderr (none for --json or a non-terminal)."""
    if quiet or not sys.stderr.isatty():
        return work(None)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=True) as bar:
        task = bar.add_task("search", total=1)

        def progress(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        return work(progress)


def _console():
    from rich.console import Console

    tty = sys.stdout.isatty()
    return Console(file=sys.stdout, markup=False, highlight=False, width=None if tty else 120)


def _print_plan(p) -> None:
    from rich.table import Table

    console = _console()
    m = p.memory
    console.print(f"{p.model}: {p.params_label('parameters')}, {p.dtype}, on {p.cards} x "
                  f"{p.hardware}, TP={p.tp}, {p.replicas} replica(s)")
    console.print(NOTE)
    mem = Table(title="DRAM per die")
    for col in ("weights GiB", "activations GiB", "KV GiB (largest batch)", "usable GiB",
                "KV block MiB", "KV blocks left", "fits"):
        mem.add_column(col, justify="right")
    mem.add_row(f"{m.weights / GiB:.2f}", f"{m.activations / GiB:.2f}",
                f"{p.kv_blocks_needed * m.kv_block / GiB:.2f}", f"{m.usable / GiB:.2f}",
                f"{m.kv_block / 2**20:.1f}", str(p.kv_blocks_left) if p.fits else "-",
                "yes" if p.fits else f"NO: {p.over_bytes / GiB:.2f} GiB over")
    console.print(mem)
    console.print(f"TTFT {p.ttft_s * 1e3:.1f} ms for a {p.prompt_len}-token prompt "
                  f"(bound by {p.prefill.bottleneck})")
    dec = Table(title=f"Decode, {p.prompt_len} in / {p.output_len} out")
    for col in ("batch", "TPOT ms", "decode tok/s", "serving tok/s", "tok/J", "bound by", "KV fits"):
        dec.add_column(col, justify="right")
    for d in p.decode:
        dec.add_row(str(d.batch), f"{d.tpot_s * 1e3:.2f}", f"{d.tokens_per_s:.0f}",
                    f"{d.serving_tokens_per_s:.0f}", f"{d.tokens_per_joule:.2f}", d.bottleneck,
                    "yes" if d.kv_fits else "no")
    console.print(dec)
    phases = Table(title="Busy time per phase, ms (resources overlap)")
    phases.add_column("phase")
    names = list(p.prefill.as_dict())
    for n in names:
        phases.add_column(n, justify="right")
    phases.add_row("prefill (whole prompt)", *(f"{v * 1e3:.2f}" for v in p.prefill.as_dict().values()))
    for d in p.decode:
        phases.add_row(f"decode step, batch {d.batch}",
                       *(f"{v * 1e3:.2f}" for v in d.breakdown.as_dict().values()))
    console.print(phases)
    console.print(f"Power: {p.watts:.0f} W at TDP ({p.cards} card(s); spec {p.spec_file})",
                  soft_wrap=True)


def _print_search(r) -> None:
    from rich.table import Table

    console = _console()
    console.print(f"{r.model} on {r.hardware}: {r.rps:g} req/s of {r.prompt_len} in / "
                  f"{r.output_len} out; SLOs TTFT <= {r.ttft_slo_s * 1e3:g} ms, "
                  f"TPOT <= {r.tpot_slo_s * 1e3:g} ms")
    console.print(NOTE)
    if not r.deployments:
        console.print("No deployment meets the SLOs.")
    else:
        t = Table(title="Cheapest deployments meeting the SLOs")
        for col in ("cards", "TP", "replicas", "batch", "running", "TTFT ms", "TPOT ms",
                    "prefill util", "tok/s", "W", "tok/J"):
            t.add_column(col, justify="right")
        for d in r.deployments:
            t.add_row(str(d.cards), str(d.tp), str(d.replicas), str(d.batch), f"{d.running:.1f}",
                      f"{d.ttft_s * 1e3:.0f}", f"{d.tpot_s * 1e3:.1f}",
                      f"{d.prefill_utilization:.0%}", f"{d.tokens_per_s:.0f}", f"{d.watts:.0f}",
                      f"{d.tokens_per_joule:.2f}")
        console.print(t)
    for n in r.notes:
        console.print(f"note: {n}")


if __name__ == "__main__":
    sys.exit(main())
