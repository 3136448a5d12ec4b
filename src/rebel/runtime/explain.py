"""`rebel.explain`: what runs where in a compiled model, and what it costs.

The fallback report of the vendor's compiler, for the virtual NPU: every device kernel (with the
ops fused into it), every host op with the reason it is on the host, how many host <-> device
round trips a run makes, and the predicted time of each segment. All figures come from the
compiled program and the timing model; nothing is run. The same report is data
(`Explanation.to_dict()`), text (`str(...)`), and a command line:

    python -m rebel.runtime.explain compiled.rbln [--json]   (installed as `rbln-explain`)
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

from ..compiler.artifact import load_artifact
from ..compiler.compile import CompiledProgram
from ..compiler.program import Program
from ..device.engine import EventEngine
from ..errors import RBLNError
from ..ir import GETITEM
from ..npu.spec import ProductSpec
from .runtime import activation_bytes
from .timeline import build_steps


@dataclass
class KernelInfo:
    name: str
    kind: str
    ops: list[str]            # ATen ops fused into the kernel (views left out)
    predicted_s: float


@dataclass
class HostOpInfo:
    node: str                 # graph node name
    op: str                   # ATen op
    reason: str               # why it is not on the device
    predicted_s: float


@dataclass
class SegmentInfo:
    name: str
    where: str                # "device" or "host"
    predicted_s: float
    copy_in_bytes: int = 0    # host -> device before the segment (External HDMA)
    copy_out_bytes: int = 0   # device -> host after it
    kernels: list[KernelInfo] = field(default_factory=list)
    host_ops: list[HostOpInfo] = field(default_factory=list)


@dataclass
class BucketInfo:
    index: int
    inputs: list[str]
    device_ops: int           # ATen ops in device kernels (views not counted)
    host_ops: int             # ATen ops that run on the host (views not counted)
    round_trips: int          # device launches per run: 1 when nothing falls back in between
    predicted_latency_s: float
    segments: list[SegmentInfo]

    @property
    def device_share(self) -> float:
        total = self.device_ops + self.host_ops
        return self.device_ops / total if total else 1.0


@dataclass
class Explanation:
    npu: str
    device_dtype: str
    meta: bool
    weight_bytes: int
    device_memory_bytes: int  # weights + the largest bucket's activations
    buckets: list[BucketInfo]

    def to_dict(self) -> dict:
        d = asdict(self)
        for b, info in zip(d["buckets"], self.buckets):
            b["device_share"] = info.device_share
        return d

    def host_fallback_reasons(self) -> Counter:
        """(op, reason) -> count, over every bucket."""
        return Counter((h.op, h.reason) for b in self.buckets for s in b.segments
                       for h in s.host_ops)

    def __str__(self) -> str:
        return render(self)


def explain(model) -> Explanation:
    """Explain an RBLNCompiledModel, a CompiledProgram or a .rbln path."""
    compiled = _resolve(model)
    buckets = [_bucket(i, p, compiled.spec) for i, p in enumerate(compiled.buckets)]
    weights = compiled.program.weight_bytes
    memory = weights + max(activation_bytes(p) for p in compiled.buckets)
    return Explanation(compiled.program.npu, compiled.program.device_dtype, compiled.meta,
                       weights, memory, buckets)


def _bucket(index: int, program: Program, spec: ProductSpec) -> BucketInfo:
    steps = build_steps(program, spec)
    full = EventEngine(spec, 0).run(steps)
    kernel_s = {e.name: e.dur_s for e in full.events if e.category == "kernel"}
    fallback_s = [e.dur_s for e in full.events if e.category == "fallback"]
    fallback_s.reverse()
    segments, device_ops, host_ops = [], 0, 0
    for seg, step in zip(program.segments, steps):
        seconds = EventEngine(spec, 0).run([step]).latency_s
        info = SegmentInfo(seg.name, seg.kind, seconds,
                           sum(program.values[v].nbytes() for v in seg.copy_in),
                           sum(program.values[v].nbytes() for v in seg.copy_out))
        for k in seg.kernels:
            ops = [o.target for o in k.ops if o.kind != "alias" and o.target != GETITEM]
            device_ops += len(ops)
            info.kernels.append(KernelInfo(k.name, k.kind, ops, kernel_s.get(k.name, 0.0)))
        for op in seg.ops:
            if op.kind == "alias" or op.target == GETITEM:
                continue  # views of host tensors cost nothing and are not fallbacks
            host_ops += 1
            info.host_ops.append(HostOpInfo(op.name, op.target, op.host_reason,
                                            fallback_s.pop() if fallback_s else 0.0))
        segments.append(info)
    trips = sum(1 for s in program.segments if s.kind == "device")
    return BucketInfo(index, [f"{n}: {s}" for n, s in program.inputs], device_ops, host_ops,
                      trips, full.latency_s, segments)


def render(e: Explanation) -> str:
    mib = 2**20
    lines = [f"{e.npu} ({e.device_dtype}){'  [meta model: prediction only]' if e.meta else ''}",
             f"device memory: {e.device_memory_bytes / mib:,.1f} MiB "
             f"(weights {e.weight_bytes / mib:,.1f} MiB)"]
    for b in e.buckets:
        lines += ["", f"bucket {b.index}: inputs ({', '.join(b.inputs)})",
                  f"  ops on device: {b.device_ops}, on host: {b.host_ops} "
                  f"({b.device_share:.0%} on device); host<->device round trips: {b.round_trips}; "
                  f"predicted latency: {b.predicted_latency_s * 1e6:,.1f} us"]
        for s in b.segments:
            if s.where == "device":
                lines.append(f"  [{s.name}] {len(s.kernels)} kernels, {s.predicted_s * 1e6:,.1f} us"
                             f" (copy in {s.copy_in_bytes / 1024:,.1f} KiB, out "
                             f"{s.copy_out_bytes / 1024:,.1f} KiB)")
                top = sorted(s.kernels, key=lambda k: -k.predicted_s)[:5]
                for k in top:
                    lines.append(f"      {k.name:<40} {k.kind:<12} {k.predicted_s * 1e6:>10,.2f} us")
                if len(s.kernels) > len(top):
                    lines.append(f"      ... {len(s.kernels) - len(top)} more kernels")
            else:
                lines.append(f"  [{s.name}] HOST, {len(s.host_ops)} ops, {s.predicted_s * 1e6:,.1f} us")
                for h in s.host_ops:
                    lines.append(f"      {h.node} = {h.op}: {h.reason}")
    return "\n".join(lines)


def _resolve(model) -> CompiledProgram:
    if isinstance(model, CompiledProgram):
        return model
    inner = getattr(model, "compiled", None)
    if isinstance(inner, CompiledProgram):
        return inner
    if isinstance(model, str) or hasattr(model, "__fspath__"):
        return load_artifact(model)
    raise RBLNError(f"explain expects an RBLNCompiledModel or a .rbln path, got {type(model).__name__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rbln-explain",
                                     description="Show what runs where in a compiled .rbln model.")
    parser.add_argument("file", metavar="FILE")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        report = explain(args.file)
    except RBLNError as e:
        print(f"rbln-explain: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
