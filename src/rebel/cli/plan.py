"""`rbln-plan`: capacity planning from a Hugging Face config.json, on the command line.

    rbln-plan examples/configs/llama-3-8b --tp 4 --batch 1 8 64
    rbln-plan examples/configs/llama-3-8b --search --ttft-ms 500 --tpot-ms 50 --rps 10
    rbln-plan examples/configs/qwen3-32b --cards 0      # the fewest cards it fits on
    rbln-plan examples/configs/llama-3-8b --tp 4 --batch 1 8 32 64 --simulate 1000 --rps 2.5
    rbln-plan examples/configs/llama-3-8b --tp 4 --batch 1 8 32 --report out/   # HTML + plots
    rbln-plan examples/configs/llama-3-8b --search --rps 10 --verify 300  # tails, by replay
    rbln-plan examples/configs/bert-large --seq-len 128 384 --batch 1 8   # encoders
    rbln-plan examples/configs/cosmos-7b-text2world --tp 32               # diffusers folders
    rbln-plan examples/configs/llama-3-8b --search --rps 10 --slo-percentile 90  # SLOs at p90
    rbln-plan examples/configs/llama-3-8b --search --rps 40 --servers 2 --prompt-len 512:2048

Without --search it prints one plan (fits?, TTFT, TPOT per batch bucket, tokens/s, watts,
tokens per joule, the bottleneck of each phase); --search tries TP sizes, batch buckets, prefill
chunks and card counts (over --servers servers of --cards-per-server cards) and prints the
cheapest deployments meeting the SLOs, on means or, with --slo-percentile, at that percentile
of a replay of each candidate. `--simulate N` (or
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
                        "to consider (search, default: --servers x --cards-per-server)")
    p.add_argument("--cards-per-server", type=int, default=8, metavar="N",
                   help="cards one server holds, 1-8 (default 8); a TP group never spans servers")
    p.add_argument("--servers", type=int, default=None, metavar="N",
                   help="search: the most servers to use (default 1, or as --cards needs)")
    p.add_argument("--prompt-len", default="1024", metavar="LEN",
                   help="prompt tokens: N, LOW:HIGH (uniform), exp:MEAN[:MAX] or normal:MEAN:STD "
                        "(plans use the mean, --simulate / --verify / percentile searches draw)")
    p.add_argument("--output-len", default="256", metavar="LEN", help="output tokens, as --prompt-len")
    p.add_argument("--chunk", type=int, nargs="+", default=None, metavar="TOKENS",
                   help="prefill chunk (plan, default 128) or the chunks to search "
                        "(default 128 256 512 1024)")
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
                        "scheduler) and report its TTFT / TPOT p90, which the search estimates as "
                        "means; with --slo-percentile, the requests per replay (default 200)")
    p.add_argument("--slo-percentile", default=None, metavar="P", type=_percentile,
                   help="search: meet the SLOs at this percentile (50, 90, 99 or p50 / p90 / p99) of "
                        "a replay through vLLM's scheduler instead of on means")
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


def _percentile(text: str) -> int:
    value = text.strip().lower().removeprefix("p")
    if value not in ("50", "90", "99"):
        raise argparse.ArgumentTypeError(f"{text!r}: give 50, 90 or 99 (or p50, p90, p99)")
    return int(value)


def _run(args) -> int:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the simulation's scheduler: no INFO chatter
    from ..plan import Planner
    from ..plan.planner import DEFAULT_CHUNKS
    from ..plan.predict import DEFAULT_BATCHES
    from .plan_families import family, run_encoder, run_pipeline

    kind = family(args.config, args.allow_untested)
    if kind != "decoder":
        return (run_pipeline if kind == "pipeline" else run_encoder)(args, _console())
    from ..plan.serving import parse_lengths

    args.prompt_lengths = parse_lengths(args.prompt_len, "--prompt-len")
    args.output_lengths = parse_lengths(args.output_len, "--output-len")
    # plans and the estimate take the means; sequences may reach the longest of each
    args.prompt_len = max(1, round(args.prompt_lengths.mean))
    args.output_len = max(1, round(args.output_lengths.mean))
    args.max_seq_len = args.prompt_lengths.high + args.output_lengths.high
    for name in ("servers", "verify"):
        if getattr(args, name) is not None and getattr(args, name) < (1 if name == "servers" else 0):
            raise RBLNError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.chunk and min(args.chunk) < 1:
        raise RBLNError(f"--chunk takes positive token counts, got {args.chunk}")
    planner = Planner(args.config, args.hardware, args.dtype, exact=args.exact, weights=args.weights,
                      cards_per_server=args.cards_per_server,
                      **({"chunk": args.chunk[0]} if args.chunk and not args.search else {}))
    if args.search:
        if args.tp is not None and args.tp < 1:
            raise RBLNError(f"--tp must be positive, got {args.tp}")
        result = _with_progress(args.json, lambda progress: planner.search(
            args.rps, args.ttft_ms, args.tpot_ms, args.prompt_lengths, args.output_lengths,
            batches=args.batch or DEFAULT_BATCHES, max_cards=args.cards, servers=args.servers,
            tp_sizes=[args.tp] if args.tp else None, progress=progress, top=args.top,
            chunks=args.chunk or DEFAULT_CHUNKS, percentile=args.slo_percentile,
            replay_requests=args.verify or 200))
        verified = _verify(planner, result, args) \
            if args.verify and result.deployments and not args.slo_percentile else []
        if args.json:
            out = result.to_dict()
            for d, v in zip(out["deployments"], verified):
                d["verified"] = v.summary()
            print(json.dumps(out, indent=2))
        else:
            _print_search(result)
            if verified:
                _print_verified(result, [v.summary() for v in verified])
            elif result.percentile and result.deployments:
                _print_verified(result, [d.replayed for d in result.deployments], result.percentile)
        if args.report:
            _report(args, search=result)
        return 0
    if args.cards == 0:
        result = planner.min_cards(args.prompt_len, args.output_len, (args.batch or [1])[-1])
    else:
        result = planner.plan(args.tp, args.batch or [1], args.prompt_len, args.output_len,
                              args.cards, max_seq_len=args.max_seq_len)
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
    """Each deployment's replica serving `--verify` Poisson requests through vLLM's scheduler,
    at its prefill chunk and sequence slots, on the search's compiled predictor."""
    from ..plan.predict import DEFAULT_BATCHES
    from ..plan.serving import poisson_trace

    return [planner.replay(d.tp, args.batch or DEFAULT_BATCHES, args.max_seq_len,
                           poisson_trace(args.verify, args.rps / d.replicas, args.prompt_lengths,
                                         args.output_lengths, seed=0),
                           chunk=d.chunk, chunks=result.chunks, slots=d.batch)
            for d in result.deployments]


def _print_verified(result, summaries, q: int = 90) -> None:
    from rich.table import Table

    title = ("Replayed through vLLM's scheduler (one replica each)" if result.percentile is None else
             f"Confirmed by replay through vLLM's scheduler ({result.replays} replays of "
             f"{result.replay_requests} requests, one replica each)")
    t = Table(title=title)
    for col in ("cards", "TP", "replicas", "chunk", "TTFT p50 / p90 / p99 ms",
                "TPOT p50 / p90 / p99 ms", f"p{q} meets SLOs"):
        t.add_column(col, justify="right")
    for d, s in zip(result.deployments, summaries):
        ok = s[f"ttft_p{q}_s"] <= result.ttft_slo_s and s[f"tpot_p{q}_s"] <= result.tpot_slo_s
        t.add_row(str(d.cards), str(d.tp), str(d.replicas), str(d.chunk),
                  " / ".join(f"{s[f'ttft_p{p}_s'] * 1e3:.0f}" for p in (50, 90, 99)),
                  " / ".join(f"{s[f'tpot_p{p}_s'] * 1e3:.1f}" for p in (50, 90, 99)),
                  "yes" if ok else "no")
    _console().print(t)


def _simulate(planner, plan, args):
    """The plan's trace replay: one replica (the request rate split over the replicas)."""
    from ..plan.serving import load_trace, poisson_trace

    if args.trace:
        trace = load_trace(args.trace)
    else:
        if args.simulate < 1:
            raise RBLNError(f"--simulate takes a number of requests >= 1, got {args.simulate}")
        trace = poisson_trace(args.simulate, args.rps / plan.replicas, args.prompt_lengths,
                              args.output_lengths, seed=0)
    longest = max(r.prompt_len + r.output_len for r in trace)
    return planner.replay(plan.tp, [d.batch for d in plan.decode],
                          max(longest, args.max_seq_len), trace,
                          progress=not args.json and sys.stderr.isatty())


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
                  f"{p.hardware}, TP={p.tp}, {p.replicas} replica(s)"
                  + (f", {p.servers} servers" if p.servers > 1 else ""))
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
    per_server = "" if p.servers < 2 else " per server: " + ", ".join(
        f"{c} card(s) {w:.0f} W" for c, w in zip(p.server_cards, p.watts_per_server))
    console.print(f"Power: {p.watts:.0f} W at TDP ({p.cards} card(s) on {p.servers} server(s)"
                  f"{per_server}; spec {p.spec_file})", soft_wrap=True)


def _print_search(r) -> None:
    from rich.table import Table

    console = _console()
    def lengths(text, mean):
        return text if text in ("", str(mean)) or ":" not in text else f"{text} (mean {mean})"

    at = "on means" if r.percentile is None else f"at p{r.percentile} of a replay"
    console.print(f"{r.model} on {r.hardware} (up to {r.max_cards} card(s), {r.cards_per_server} per "
                  f"server): {r.rps:g} req/s of {lengths(r.prompt_lengths, r.prompt_len) or r.prompt_len} "
                  f"in / {lengths(r.output_lengths, r.output_len) or r.output_len} out; SLOs "
                  f"TTFT <= {r.ttft_slo_s * 1e3:g} ms, TPOT <= {r.tpot_slo_s * 1e3:g} ms {at}",
                  soft_wrap=True)
    console.print(NOTE)
    if not r.deployments:
        console.print("No deployment meets the SLOs.")
    else:
        t = Table(title="Cheapest deployments meeting the SLOs"
                  + ("" if r.percentile is None else f" at p{r.percentile}")
                  + " (TTFT / TPOT: the steady-state estimate, means)")
        several = any(d.servers > 1 for d in r.deployments)
        for col in ("cards", "servers", "TP", "replicas", "batch", "chunk", "running", "TTFT ms",
                    "TPOT ms", "prefill", "W", *(("W per server",) if several else ()), "tok/J"):
            t.add_column(col, justify="right")
        for d in r.deployments:
            per_server = (" + ".join(f"{w:.0f}" for w in d.watts_per_server),) if several else ()
            t.add_row(str(d.cards), str(d.servers) if d.servers == 1 else
                      f"{d.servers} ({'+'.join(map(str, d.server_cards))})",
                      str(d.tp), str(d.replicas), str(d.batch), str(d.chunk), f"{d.running:.1f}",
                      f"{d.ttft_s * 1e3:.0f}", f"{d.tpot_s * 1e3:.1f}",
                      f"{d.prefill_utilization:.0%}", f"{d.watts:.0f}", *per_server,
                      f"{d.tokens_per_joule:.2f}")
        console.print(t)
        console.print(f"Each serves {r.deployments[0].tokens_per_s:.0f} output tok/s; servers: "
                      "cards on each server; prefill: the share of a replica's time prefilling; "
                      "chunk: prompt tokens per step and request (prefill graph)", soft_wrap=True)
    for n in r.notes:
        console.print(f"note: {n}", soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
