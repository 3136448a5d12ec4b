"""`rbln-plan` for encoder configs and diffusers pipeline folders (the decoder path is plan.py).

    rbln-plan examples/configs/bert-large --seq-len 128 384 --batch 1 8 32
    rbln-plan examples/configs/bert-large --search --rps 500 --latency-ms 50 --seq-len 384
    rbln-plan examples/configs/cosmos-7b-text2world --tp 32
    rbln-plan examples/configs/sd15-shaped --height 512 --width 512 --steps 50

`family()` says which planner a config goes to: a folder with model_index.json is a pipeline,
a config whose model_type is a tested encoder (or, with --allow-untested, any base model
transformers' AutoModel maps that is not a causal LM) is an encoder, anything else the decoder
planner's (which names what it does not support).
"""
from __future__ import annotations

import json

from ..errors import PlanError
from ..npu.spec import GiB

NOTE = "Predicted by open-rbln's timing model from the config alone (meta tensors), not measured."


def family(config: str, allow_untested: bool = False) -> str:
    """"pipeline", "encoder" or "decoder" for the path given to rbln-plan."""
    from ..plan.encoder import ENCODERS, is_encoder, read_table, untested_encoder_class
    from ..plan.model import SUPPORTED
    from ..plan.pipeline import is_pipeline

    if is_pipeline(config):
        return "pipeline"
    try:
        table = read_table(config)
    except PlanError:
        return "decoder"  # the decoder planner reports the unreadable path
    model_type = table.get("model_type")
    if model_type in SUPPORTED:
        return "decoder"
    if is_encoder(table, allow_untested):
        return "encoder"
    if isinstance(model_type, str) and not allow_untested and untested_encoder_class(model_type):
        raise PlanError(f"model_type {model_type!r} is neither a supported decoder LLM "
                        f"({', '.join(sorted(SUPPORTED))}) nor a tested encoder "
                        f"({', '.join(sorted(ENCODERS))}); transformers builds it as an encoder: "
                        "--allow-untested plans it, and names the op if the compiler cannot lower it")
    return "decoder"


def _unsupported(args, kind: str) -> None:
    for flag, value in (("--report", args.report), ("--simulate", args.simulate),
                        ("--trace", args.trace), ("--verify", args.verify),
                        ("--weights", args.weights)):
        if value:
            raise PlanError(f"{flag} applies to decoder LLM plans; {kind} plans do not take it yet")


# ---- encoders ---------------------------------------------------------------------------------

def run_encoder(args, console) -> int:
    from ..plan.encoder import DEFAULT_BATCHES, EncoderPlanner

    _unsupported(args, "encoder")
    planner = EncoderPlanner(args.config, args.hardware, args.dtype, exact=args.exact,
                             allow_untested=args.allow_untested)
    seq_lens = args.seq_len or [128]
    if args.search:
        if len(seq_lens) != 1:
            raise PlanError("--search takes one --seq-len (the requests' length)")
        result = planner.search(args.rps, args.latency_ms, seq_lens[0],
                                batches=args.batch or DEFAULT_BATCHES,
                                max_cards=8 if args.cards is None else args.cards,
                                tp_sizes=[args.tp] if args.tp else None, top=args.top)
        if args.json:
            print(json.dumps(result.to_dict(), indent=2))
        else:
            _print_encoder_search(result, console)
        return 0
    plan = planner.plan(args.tp or 1, args.batch or [1], seq_lens, args.cards)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        _print_encoder_plan(plan, console)
    return 0 if plan.fits else 1


def _print_encoder_plan(p, console) -> None:
    from rich.table import Table

    m = p.memory
    console.print(f"{p.model}: {p.model_class} ({p.model_type}), {p.dtype}, on {p.cards} x "
                  f"{p.hardware}, TP={p.tp}, {p.replicas} replica(s)")
    console.print(NOTE)
    mem = Table(title="DRAM per die")
    for col in ("weights GiB", "activations GiB", "usable GiB", "fits"):
        mem.add_column(col, justify="right")
    mem.add_row(f"{m.weights / GiB:.2f}", f"{m.activations / GiB:.2f}", f"{m.usable / GiB:.2f}",
                "yes" if m.fits else f"NO: {m.over_bytes / GiB:.2f} GiB over")
    console.print(mem)
    t = Table(title=f"One call per bucket ({p.replicas} replica(s) for the rates)")
    for col in ("batch", "seq len", "latency ms", "seq/s", "tok/s", "seq/J", "tok/J", "bound by"):
        t.add_column(col, justify="right")
    for q in p.points:
        t.add_row(str(q.batch), str(q.seq_len), f"{q.latency_s * 1e3:.2f}",
                  f"{q.sequences_per_s:.1f}", f"{q.tokens_per_s:.0f}",
                  f"{q.sequences_per_joule:.3f}", f"{q.tokens_per_joule:.1f}", q.bottleneck)
    console.print(t)
    phases = Table(title="Busy time per call, ms (resources overlap)")
    phases.add_column("bucket")
    for n in p.points[0].breakdown.as_dict():
        phases.add_column(n, justify="right")
    for q in p.points:
        phases.add_row(f"{q.batch} x {q.seq_len}",
                       *(f"{v * 1e3:.2f}" for v in q.breakdown.as_dict().values()))
    console.print(phases)
    console.print(f"Power: {p.watts:.0f} W at TDP ({p.cards} card(s); spec {p.spec_file})",
                  soft_wrap=True)


def _print_encoder_search(r, console) -> None:
    from rich.table import Table

    console.print(f"{r.model} on {r.hardware}: {r.rps:g} req/s of {r.seq_len} tokens; SLO mean "
                  f"latency <= {r.latency_slo_s * 1e3:g} ms")
    console.print(NOTE)
    if not r.deployments:
        console.print("No deployment meets the SLO.")
    else:
        t = Table(title="Cheapest deployments meeting the SLO")
        for col in ("cards", "TP", "replicas", "batch", "latency ms", "util", "tok/s", "W",
                    "seq/J", "tok/J"):
            t.add_column(col, justify="right")
        for d in r.deployments:
            t.add_row(str(d.cards), str(d.tp), str(d.replicas), str(d.batch),
                      f"{d.latency_s * 1e3:.1f}", f"{d.utilization:.0%}", f"{d.tokens_per_s:.0f}",
                      f"{d.watts:.0f}", f"{d.sequences_per_joule:.3f}", f"{d.tokens_per_joule:.1f}")
        console.print(t)
    for n in r.notes:
        console.print(f"note: {n}")


# ---- pipelines --------------------------------------------------------------------------------

def run_pipeline(args, console) -> int:
    from ..plan.pipeline import plan_pipeline

    _unsupported(args, "pipeline")
    if args.search:
        raise PlanError("--search applies to decoder and encoder plans; for a pipeline give --tp "
                        "(the denoiser's dies) and compare plans")
    plan = plan_pipeline(args.config, args.hardware, height=args.height, width=args.width,
                         frames=args.frames, steps=args.steps, guidance=not args.no_guidance,
                         batch=(args.batch or [1])[-1], prompt_tokens=args.prompt_tokens,
                         dtype=args.dtype, tp=args.tp,
                         max_dies=(args.cards or 8) * _dies(args.hardware))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        _print_pipeline(plan, console)
    return 0 if plan.fits else 1


def _dies(hardware: str) -> int:
    from ..npu import load_spec

    return load_spec(hardware).dies


def _print_pipeline(p, console) -> None:
    from rich.table import Table

    what = f"{p.frames}-frame video" if p.frames > 1 else "image"
    console.print(f"{p.model}: {p.pipeline}, {p.height}x{p.width} {what}, {p.steps} steps, "
                  f"classifier-free guidance {'on' if p.guidance else 'off'}, {p.batch} per prompt, "
                  f"on {p.hardware}")
    console.print(NOTE)
    t = Table(title=f"Stages, one {what}")
    console.print("Stages: " + ", ".join(f"{s.component} = {s.class_name}" for s in p.stages),
                  soft_wrap=True)
    for col in ("stage", "dies (TP)", "calls x batch", "call ms", "total s", "share",
                "GiB/die w + act", "fits", "bound by"):
        t.add_column(col, justify="right")
    total = p.total_s
    for s in p.stages:
        st = s.stage
        t.add_row(s.component, str(st.tp), f"{s.calls} x {s.batch}",
                  f"{st.latency_s * 1e3:.2f}", f"{s.total_s:.3f}", f"{s.total_s / total:.0%}",
                  f"{st.weights_bytes / GiB:.2f} + {st.activation_bytes / GiB:.2f}",
                  "yes" if st.fits else "NO", st.bottleneck)
    console.print(t)
    d = p.dominant
    console.print(f"Total {total:.3f} s per {what} ({p.batch / total:.4f} per s); {d.component} "
                  f"dominates ({d.total_s / total:.0%}). Each stage on dies of its own: {p.dies} "
                  f"dies, {p.cards} card(s), {p.watts:.0f} W at TDP, {p.joules_per_output:.0f} J "
                  f"per {what}; overlapped across prompts, {p.outputs_per_s_pipelined * 3600:.1f} "
                  f"per hour.", soft_wrap=True)
    if p.host_components:
        console.print(f"On the host, not compiled: {', '.join(p.host_components)}", soft_wrap=True)
    for n in p.notes:
        console.print(f"note: {n}", soft_wrap=True)

