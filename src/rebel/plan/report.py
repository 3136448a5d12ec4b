"""`rbln-plan --report DIR`: a plan as an HTML page with pictures (matplotlib PNGs beside it).

The page holds what a capacity review asks for: the latency-throughput curve of each deployment
(time per output token against output tokens/s over the decode batch buckets), where a phase's
time goes (compute, weight DMA, KV DMA, activation DMA, collectives, host), what each die's DRAM
holds, the search frontier (cards against throughput per joule, the SLO-meeting deployments
only) and, for a simulated trace, the TTFT and TPOT distributions. It is a static folder: open
index.html in any browser, attach it to a ticket. Each picture is drawn only when the plan has
its data; the page says which are there.
"""
from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from ..npu.spec import GiB

PARTS = ("compute", "weight DMA", "KV DMA", "activation DMA", "collectives", "host")


def write_report(out_dir: str | Path, plans: Sequence = (), search=None, serving=None,
                 title: str | None = None) -> Path:
    """Write index.html and its PNGs into out_dir; returns the page's path. plans: `Plan`s (one
    per deployment to compare); search: a `SearchResult`; serving: a `ServingResult`."""
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans = list(plans)
    figures: list[tuple[str, str]] = []  # (file, caption)

    def save(fig, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        figures.append((name, caption))

    if plans:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for p in plans:
            xs = [d.serving_tokens_per_s for d in p.decode]
            ys = [d.tpot_s * 1e3 for d in p.decode]
            ax.plot(xs, ys, marker="o", label=_label(p))
            for d, x, y in zip(p.decode, xs, ys):
                ax.annotate(f"b{d.batch}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if search is not None:
            ax.axhline(search.tpot_slo_s * 1e3, color="grey", linestyle="--", label="TPOT SLO")
        ax.set(xlabel="output tokens/s (serving, all replicas)", ylabel="time per output token (ms)",
               title="Latency against throughput, per decode batch bucket")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "latency_throughput.png", "Latency-throughput curve of each deployment: every "
             "point a decode batch bucket.")

        p = plans[0]
        phases = [("prefill (TTFT)", p.prefill.as_dict())] + \
                 [(f"decode b{d.batch}", d.breakdown.as_dict()) for d in p.decode]
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(phases) + 1.5))
        for i, (_, parts) in enumerate(phases):
            total = sum(parts.values()) or 1.0
            left = 0.0
            for j, part in enumerate(PARTS):
                share = parts.get(part, 0.0) / total * 100
                ax.barh(i, share, left=left, color=f"C{j}", label=part if i == 0 else None)
                left += share
        ax.set_yticks(range(len(phases)), [name for name, _ in phases])
        ax.invert_yaxis()
        ax.set(xlabel="share of busy time (%)", title=f"Where the time goes: {_label(p)}")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        save(fig, "breakdown.png", "Time breakdown per phase (busy time of each resource; they "
             "overlap, so a phase takes at least its largest).")

        fig, ax = plt.subplots(figsize=(7, 0.5 * len(plans) + 1.6))
        for i, p in enumerate(plans):
            m = p.memory
            kv = p.kv_blocks_needed * m.kv_block
            parts = [("weights", m.weights), ("activations", m.activations), ("KV cache (needed)", kv),
                     ("free", max(0, m.usable - m.weights - m.activations - kv))]
            left = 0.0
            for j, (name, nbytes) in enumerate(parts):
                ax.barh(i, nbytes / GiB, left=left, color=f"C{j}" if name != "free" else "#dddddd",
                        label=name if i == 0 else None)
                left += nbytes / GiB
            ax.axvline(m.usable / GiB, color="black", linewidth=0.8)
        ax.set_yticks(range(len(plans)), [_label(p) for p in plans])
        ax.invert_yaxis()
        ax.set(xlabel="GiB per die (line: usable DRAM)", title="Device DRAM per die")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        save(fig, "dram.png", "What one die's DRAM holds.")

    if search is not None and search.deployments:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for d in search.deployments:
            ax.scatter(d.cards, d.tokens_per_joule, s=60)
            ax.annotate(f"TP{d.tp} x{d.replicas}, b{d.batch}\nTPOT {d.tpot_s * 1e3:.0f} ms",
                        (d.cards, d.tokens_per_joule), textcoords="offset points", xytext=(6, 0), fontsize=7)
        ax.set(xlabel="cards", ylabel="output tokens per joule (at TDP)",
               title=f"Deployments meeting TTFT <= {search.ttft_slo_s * 1e3:g} ms, TPOT <= "
                     f"{search.tpot_slo_s * 1e3:g} ms at {search.rps:g} req/s")
        ax.grid(alpha=0.3)
        save(fig, "frontier.png", "The search frontier: every deployment that meets the SLOs, "
             "cheapest on the left.")

    if serving is not None:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
        for ax, metric, name in ((axes[0], "ttft", "TTFT"), (axes[1], "tpot", "TPOT")):
            values = sorted(v * 1e3 for v in (getattr(r, f"{metric}_s") for r in serving.requests)
                            if v is not None)
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
            ax.set(xlabel=f"{name} (ms)", ylabel="share of requests", title=f"{name} distribution")
            ax.grid(alpha=0.3)
        save(fig, "serving.png", "Simulated trace: TTFT and TPOT over its requests (vLLM's "
             "scheduler, steps costed by the compiled graphs).")

    page = out / "index.html"
    page.write_text(_html(title or _title(plans, search), plans, search, serving, figures))
    return page


def _label(p) -> str:
    return f"{p.hardware} x{p.cards} TP={p.tp}" + (f" x{p.replicas}" if p.replicas > 1 else "")


def _title(plans, search) -> str:
    model = plans[0].model if plans else search.model if search is not None else "model"
    return f"rbln-plan: {model}"


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html(title: str, plans, search, serving, figures) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for p in plans:
        m = p.memory
        fit = (f"fits, {p.kv_blocks_left} KV blocks of {p.block_size} tokens left" if p.fits
               else f"does not fit: {p.over_bytes / GiB:.2f} GiB over per die")
        parts.append(f"<h2>{html.escape(_label(p))}: {html.escape(fit)}</h2>")
        parts.append(f"<p>{p.params / 1e9:.2f}B parameters, {html.escape(p.dtype)}; weights "
                     f"{m.weights / GiB:.2f} GiB per die; TTFT {p.ttft_s * 1e3:.1f} ms for "
                     f"{p.prompt_len} prompt tokens (bound by {html.escape(p.prefill.bottleneck)}); "
                     f"{p.watts:.0f} W at TDP.</p>")
        parts.append(_table(["batch", "TPOT ms", "decode tok/s", "serving tok/s", "tok/J", "bound by", "KV fits"],
                            [(d.batch, f"{d.tpot_s * 1e3:.2f}", f"{d.tokens_per_s:.0f}",
                              f"{d.serving_tokens_per_s:.0f}", f"{d.tokens_per_joule:.2f}",
                              d.bottleneck, "yes" if d.kv_fits else "no") for d in p.decode]))
    if search is not None:
        parts.append(f"<h2>Search: {search.rps:g} req/s of {search.prompt_len} in / "
                     f"{search.output_len} out, TTFT &le; {search.ttft_slo_s * 1e3:g} ms, "
                     f"TPOT &le; {search.tpot_slo_s * 1e3:g} ms</h2>")
        if search.deployments:
            parts.append(_table(["cards", "TP", "replicas", "batch", "TTFT ms", "TPOT ms", "tok/s", "W", "tok/J"],
                                [(d.cards, d.tp, d.replicas, d.batch, f"{d.ttft_s * 1e3:.0f}",
                                  f"{d.tpot_s * 1e3:.1f}", f"{d.tokens_per_s:.0f}", f"{d.watts:.0f}",
                                  f"{d.tokens_per_joule:.2f}") for d in search.deployments]))
        else:
            parts.append("<p>No deployment meets the SLOs.</p>")
        parts.extend(f"<p>{html.escape(n)}</p>" for n in search.notes)
    if serving is not None:
        s = serving.summary()
        parts.append(f"<h2>Simulated trace: {s['requests']} requests, {s['steps']} steps</h2>")
        parts.append(_table(["", "p50", "p90", "p99"],
                            [(name, *(f"{s[f'{key}_p{q}_s'] * 1e3:.2f} ms" for q in (50, 90, 99)))
                             for name, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("queued", "queued"))]))
    for name, caption in figures:
        parts.append(f'<figure><img src="{name}" alt="{html.escape(caption)}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    # the page counts its pictures once they have loaded (a headless browser test reads it)
    script = ("window.addEventListener('load', () => { const imgs = [...document.images];"
              " document.body.dataset.images = imgs.length;"
              " document.body.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length; });")
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}figure{margin:2em 0}img{max-width:100%}figcaption{color:#555}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}<script>{script}</script></body></html>")
