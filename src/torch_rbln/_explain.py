"""torch.rbln.explain(): a plain-text account of what ran since the last reset.

Answers the questions a user has when eager or compiled code is slower than expected: which ops
fell back to the host (and why), which graphs and kernels were compiled (and why they recompiled),
how many host<->device copies ran, and the predicted device time on the modelled NPU.
"""
from __future__ import annotations

from . import stats


def explain() -> str:
    r = stats.current()
    lines = ["torch_rbln explain (since the last torch.rbln.reset())"]
    dev_calls = sum(r.device_ops.values())
    fb_calls = sum(r.fallbacks.values())
    lines.append(f"  eager ops: {dev_calls} on the device ({len(r.device_ops)} distinct), "
                 f"{fb_calls} host fallbacks ({len(r.fallbacks)} distinct)")
    if r.fallbacks:
        lines.append("  fell back to the host:")
        for name, n in r.fallbacks.most_common():
            lines.append(f"    {name}: {n} call(s) ({r.fallback_reasons.get(name, '')})")
    compiles = sum(r.kernel_compiles.values())
    lines.append(f"  eager kernels compiled: {compiles} (one per op, shape and dtype; "
                 f"{max(0, dev_calls - compiles)} calls reused a cached kernel)")
    recompiled = {k: v for k, v in r.kernel_compiles.items() if v > 1}
    if recompiled:
        lines.append("  compiled for several shapes/dtypes: " + ", ".join(
            f"{k} x{v}" for k, v in sorted(recompiled.items(), key=lambda kv: -kv[1])))
    lines.append(f"  compiled graphs (torch.compile): {len(r.graph_compiles)} compiled, "
                 f"{r.graph_cache_hits} loaded from the disk cache, {r.graph_runs} runs, "
                 f"{r.graph_fallback_runs} runs in Python")
    for name, why in r.graph_compiles:
        lines.append(f"    {name}: {why}")
    lines.append(f"  host<->device copies: {r.copies_to_device} to the device "
                 f"({r.bytes_to_device / 2**20:.2f} MiB), {r.copies_to_host} to the host "
                 f"({r.bytes_to_host / 2**20:.2f} MiB)")
    lines.append(f"  predicted device time: {r.device_time_s * 1e6:.1f} us")
    return "\n".join(lines)
