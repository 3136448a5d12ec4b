"""The compiler driver: capture -> fold -> partition -> precision -> fusion -> schedule."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import CompileError
from ..ir import GETITEM, Graph, Op, Ref, TensorSpec, dtype_name, to_torch_dtype
from ..npu import current_machine, load_spec
from ..npu.spec import ProductSpec
from .capture import capture
from .fold import fold_constants
from .fusion import fuse, kernel_kind, kernel_label
from .partition import place_ops, split_segments
from .program import Kernel, Program, Segment
from .schedule import Scheduler

DEVICE_DTYPES = ("float16", "bfloat16")
OUTPUT = "$output"  # pseudo-user: a value the caller (or a persistent buffer) receives


@dataclass
class CompiledProgram:
    """A program plus the weights it expects in device DRAM (floats already in the device dtype)."""

    program: Program
    weights: dict[str, torch.Tensor]
    spec: ProductSpec


def compile_module(module: torch.nn.Module, example_inputs: Sequence, npu: str | None = None,
                   device_dtype: str | torch.dtype = "float16") -> CompiledProgram:
    spec = load_spec(npu) if npu else current_machine().spec
    dtype = dtype_name(device_dtype) if isinstance(device_dtype, torch.dtype) else str(device_dtype)
    if dtype not in DEVICE_DTYPES:
        raise CompileError(f"device_dtype {dtype!r} is not supported; the device computes in "
                           f"{' or '.join(DEVICE_DTYPES)}")
    graph = capture(module, example_inputs)
    return lower_graph(graph, spec, dtype)


def lower_graph(graph: Graph, spec: ProductSpec, dtype: str) -> CompiledProgram:
    fold_constants(graph)
    place_ops(graph)
    segments = split_segments(graph)
    values = _value_specs(graph)
    users = graph.users()
    outputs = [o.name for o in graph.outputs if isinstance(o, Ref)]
    for name in [*outputs, *graph.buffer_updates]:
        users.setdefault(name, []).append(OUTPUT)
    scheduler = Scheduler(spec, dtype, values, set(graph.weights))
    counter = iter(range(1 << 30))
    for index, seg in enumerate(segments):
        seg.name = f"{seg.kind}_{index}"
        if seg.kind == "device":
            _build_kernels(seg, segments[index + 1:], users, outputs, values, dtype, scheduler,
                           counter, graph)
    weights = {name: _to_device(t, dtype) for name, t in graph.weights.items()}
    program = Program(
        npu=spec.name, device_dtype=dtype, inputs=graph.inputs, outputs=graph.outputs,
        out_spec=graph.out_spec, values=values,
        weights={name: TensorSpec.of(t) for name, t in weights.items()}, segments=segments,
        buffer_updates=graph.buffer_updates, mutable_buffers=sorted(graph.mutable_buffers))
    return CompiledProgram(program, weights, spec)


def _build_kernels(seg: Segment, later: list[Segment], users, outputs, values, dtype,
                   scheduler: Scheduler, counter, graph: Graph) -> None:
    def name(label: str) -> str:
        return f"{next(counter)}_{label}"

    needs_cast = {v for v in [*seg.copy_in, *seg.copy_out]
                  if values[v].is_float and values[v].dtype != dtype}
    kernels: list[Kernel] = []
    reads: list[list[str]] = []
    for v in seg.copy_in:
        if v in needs_cast:
            label = v if v.startswith("input_") else f"cast_{v}"
            kernels.append(Kernel(name(label), "cast_in", [], [v]))
            reads.append([v])
    for group in fuse(seg.ops, users):
        inside = {o.name for o in group}
        made = [o.name for o in group if o.out is not None]
        kernels.append(Kernel(name(kernel_label(group)), kernel_kind(group), group,
                              [v for v in made if any(u not in inside for u in users.get(v, ()))]))
        reads.append(list(dict.fromkeys(r for o in group for r in o.refs if r not in inside)))
    for v in seg.copy_out:
        if v in needs_cast:
            label = f"output_{outputs.index(v) + 1}" if v in outputs else f"cast_{v}"
            kernels.append(Kernel(name(label), "cast_out", [], [v]))
            reads.append([v])
    _rewrite_float_dtypes(seg.ops)
    later_reads = {r for s in later for o in s.ops for r in o.refs}
    leaves = set(seg.copy_out) | (later_reads & {o.name for o in seg.ops}) | {
        v for v in graph.buffer_updates if v in {o.name for o in seg.ops}}
    scheduler.plan_segment(kernels, reads, leaves, set(seg.copy_in))
    seg.kernels, seg.ops = kernels, []


def _rewrite_float_dtypes(ops: list[Op]) -> None:
    """Device kernels compute in FP32 and round their outputs; explicit float dtypes in op
    arguments (e.g. `_to_copy(x, dtype=float16)`) become FP32 so the arithmetic stays FP32."""
    for op in ops:
        for key, value in list(op.kwargs.items()):
            if isinstance(value, torch.dtype) and value.is_floating_point:
                op.kwargs[key] = torch.float32


def _value_specs(graph: Graph) -> dict[str, TensorSpec]:
    values = graph.specs()
    for op in graph.ops:  # multi-output ops: size of all results, for DMA accounting
        if isinstance(op.out, tuple) and op.target != GETITEM:
            parts = op.out_specs
            if parts:
                values[op.name] = TensorSpec((sum(p.numel for p in parts),), parts[0].dtype)
    return values


def _to_device(t: torch.Tensor, dtype: str) -> torch.Tensor:
    if t.is_floating_point():
        return t.detach().to(to_torch_dtype(dtype)).contiguous()
    return t.detach().contiguous()
