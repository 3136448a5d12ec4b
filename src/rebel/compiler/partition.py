"""Partition: decide where each op runs, cut the op list into device and host segments, and
work out which tensors cross the PCIe link (External HDMA) between them.
"""
from __future__ import annotations

from ..ir import GETITEM, Graph, Ref
from .program import Segment
from ..device.vendor_ops import ATTENTION_TARGETS
from .support import DEVICE_DTYPES, classify

# The vendor's `_kv_fp8` attention keeps its KV caches in FP8 (the kernel reads and writes them).
FP8_CACHE_DTYPES = frozenset({"float8_e4m3fn"})


def place_ops(graph: Graph) -> None:
    """Set `op.kind` to its support-table class, or "host" with a reason."""
    producer = {op.name: op for op in graph.ops}
    specs = graph.specs()
    for op in graph.ops:
        cls = classify(op.target)
        if op.target == GETITEM or (cls and cls.kind == "alias"):
            # Views are free: run them wherever the tensor they view lives.
            src = producer.get(op.refs[0]) if op.refs else None
            if src is not None and src.kind == "host":
                op.kind, op.host_reason = "host", "views a host tensor"
            else:
                op.kind = "alias"
            continue
        if cls is None:
            op.kind, op.host_reason = "host", f"{op.target} has no device kernel"
            continue
        allowed = DEVICE_DTYPES | FP8_CACHE_DTYPES if op.target in ATTENTION_TARGETS else DEVICE_DTYPES
        bad = sorted({s.dtype for s in [*op.out_specs, *(specs[r] for r in op.refs if r in specs)]
                      if s.dtype not in allowed})
        if bad:
            op.kind, op.host_reason = "host", f"dtype {', '.join(bad)} is not supported on the device"
        else:
            op.kind = cls.kind


def split_segments(graph: Graph) -> list[Segment]:
    """Consecutive ops with the same placement form a segment; then plan the copies."""
    segments: list[Segment] = []
    for op in graph.ops:
        where = "host" if op.kind == "host" else "device"
        if not segments or segments[-1].kind != where:
            segments.append(Segment(where, f"{where}_{len(segments)}"))
        segments[-1].ops.append(op)
    _plan_copies(graph, segments)
    return segments


def _plan_copies(graph: Graph, segments: list[Segment]) -> None:
    on_host = {name for name, _ in graph.inputs}
    on_device = set(graph.weights)
    made_by: dict[str, Segment] = {}

    def bring_to_host(value: str) -> None:
        if value in on_host:
            return
        seg = made_by.get(value)
        if seg is None or seg.kind != "device":
            return  # weights the host reads directly are rare; the runtime serves them
        if value not in seg.copy_out:
            seg.copy_out.append(value)
        on_host.add(value)

    for seg in segments:
        produced = {op.name for op in seg.ops}
        needed = list(dict.fromkeys(r for op in seg.ops for r in op.refs if r not in produced))
        for value in needed:
            if seg.kind == "device" and value not in on_device:
                seg.copy_in.append(value)
                on_device.add(value)
            elif seg.kind == "host":
                bring_to_host(value)
        for name in produced:
            made_by[name] = seg
            (on_device if seg.kind == "device" else on_host).add(name)
    for out in graph.outputs:
        if isinstance(out, Ref):
            bring_to_host(out.name)

