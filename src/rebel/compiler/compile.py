"""The compiler driver: capture -> fold -> partition -> precision -> fusion -> schedule."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import CompileError
from ..ir import GETITEM, Graph, Op, Ref, TensorSpec, dtype_name, to_torch_dtype
from ..npu import current_machine, load_spec
from ..npu.spec import ProductSpec
from .buckets import check_distinct, merge_weights, split_buckets
from .capture import capture
from .fold import fold_constants
from .fusion import fuse, kernel_kind, kernel_label
from .partition import place_ops, split_segments
from .progress import CompileProgress, wants_progress
from .program import Kernel, Program, Segment
from .schedule import Scheduler
from .tensor_parallel import shard_graph

DEVICE_DTYPES = ("float16", "bfloat16")
OUTPUT = "$output"  # pseudo-user: a value the caller (or a persistent buffer) receives


@dataclass
class CompiledProgram:
    """A program plus the weights it expects in device DRAM (floats already in the device dtype)."""

    program: Program
    weights: dict[str, torch.Tensor]
    spec: ProductSpec
    buckets: list[Program] = field(default_factory=list)  # every shape bucket; [0] is `program`
    meta: bool = False  # compiled from meta tensors: predicts memory and latency, cannot run
    # The compile context this model belongs to (None without one): {"id": str,
    # "weight_sharing": bool, "weight_keys": {weight name: content key}, "owned_weights": [...]}
    # (see rebel.compile_context). Runtimes of one context share its static buffers, and its
    # weights when weight_sharing is on.
    context: dict | None = None

    def __post_init__(self):
        if not self.buckets:
            self.buckets = [self.program]


def compile_module(module: torch.nn.Module, example_inputs: Sequence, npu: str | None = None,
                   device_dtype: str | torch.dtype = "float16",
                   progress: bool | None = None, tensor_parallel_size: int = 1,
                   fusion: bool = True, static: Sequence[dict[int, str]] | None = None) -> CompiledProgram:
    """Compile `module` at the shapes of `example_inputs`: a list of tensors (one shape), or a
    list of such lists (one shape bucket each). Modules or inputs on the meta device compile for
    prediction only (`CompiledProgram.meta`).

    fusion=False makes every op its own kernel (as PyTorch eager launches one kernel per op), so
    every intermediate goes to DRAM and is rounded to the device dtype: a baseline for what fusion
    buys. The kernels are stored in the program, so a saved artifact reloads as compiled.

    static: per bucket, example-input position -> static buffer name (inputs a compile context
    marked): they become persistent device buffers, not inputs (`Program.static_buffers`). Their
    storage belongs to the runtime's context registry, so no tensor for them is returned."""
    spec = load_spec(npu) if npu else current_machine().spec
    dtype = dtype_name(device_dtype) if isinstance(device_dtype, torch.dtype) else str(device_dtype)
    if dtype not in DEVICE_DTYPES:
        raise CompileError(f"device_dtype {dtype!r} is not supported; the device computes in "
                           f"{' or '.join(DEVICE_DTYPES)}")
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) \
            or tensor_parallel_size < 1:
        raise CompileError(f"tensor_parallel_size must be a positive int, got {tensor_parallel_size!r}")
    if not isinstance(fusion, bool):
        raise CompileError(f"fusion must be True or False, got {fusion!r}")
    bucket_inputs = split_buckets(example_inputs)
    if static is not None and len(static) != len(bucket_inputs):
        raise CompileError(f"static positions given for {len(static)} bucket(s), the model has "
                           f"{len(bucket_inputs)}")
    shown = CompileProgress(wants_progress(module, progress) if isinstance(module, torch.nn.Module)
                            else False)
    programs, weights = [], {}
    with shown.running():
        for index, inputs in enumerate(bucket_inputs):
            shown.stage(f"capture {index + 1}/{len(bucket_inputs)}")
            graph = capture(module, inputs, static[index] if static else None)
            fold_constants(graph)
            merge_weights(graph, weights, index)
            lowered = lower_graph(graph, spec, dtype, shown, convert_weights=False,
                                  tensor_parallel_size=tensor_parallel_size, fusion=fusion)
            for name, t in lowered.weights.items():  # per-layout copies tensor parallelism made
                weights.setdefault(name, t)
            programs.append(lowered.program)
    check_distinct([[s for _, s in p.inputs] for p in programs])
    static_names = {name for p in programs for name in p.static_buffers}
    used = {name for p in programs for name in p.weights} - static_names
    weights = {name: _to_device(t, dtype) for name, t in weights.items() if name in used}
    meta = any(t.is_meta for t in weights.values()) or any(
        isinstance(t, torch.Tensor) and t.is_meta for i, b in enumerate(bucket_inputs)
        for j, t in enumerate(b) if not (static and j in static[i]))
    return CompiledProgram(programs[0], weights, spec, programs, meta)


def lower_graph(graph: Graph, spec: ProductSpec, dtype: str, shown: CompileProgress | None = None,
                convert_weights: bool = True, tensor_parallel_size: int = 1,
                fusion: bool = True) -> CompiledProgram:
    """Lower a captured graph to a program. convert_weights=False leaves the returned weights in
    their graph dtype (the caller converts them once, e.g. after merging shape buckets).
    fusion=False: one kernel per op (see compile_module)."""
    shown = shown or CompileProgress(False)
    shown.stage("fold and partition")
    fold_constants(graph)
    sharding = shard_graph(graph, tensor_parallel_size)
    place_ops(graph)
    segments = split_segments(graph)
    values = _value_specs(graph)
    users = graph.users()
    outputs = [o.name for o in graph.outputs if isinstance(o, Ref)]
    for name in [*outputs, *graph.buffer_updates]:
        users.setdefault(name, []).append(OUTPUT)
    scheduler = Scheduler(spec, dtype, values, set(graph.weights), sharding,
                          producers={o.name: o for o in graph.ops})
    counter = iter(range(1 << 30))
    # Last segment reading each value, so a segment finds its values needed later in O(ops).
    last_reader = {r: i for i, s in enumerate(segments) for o in s.ops for r in o.refs}
    shown.stage("fuse and schedule", len(graph.ops))
    for index, seg in enumerate(segments):
        seg.name = f"{seg.kind}_{index}"
        shown.advance(len(seg.ops))
        if seg.kind == "device":
            _build_kernels(seg, index, last_reader, users, outputs, values, dtype, scheduler,
                           counter, graph, fusion)
    weights = {name: _to_device(t, dtype) if convert_weights else t
               for name, t in graph.weights.items()}
    program = Program(
        npu=spec.name, device_dtype=dtype, inputs=graph.inputs, outputs=graph.outputs,
        out_spec=graph.out_spec, values=values,
        weights={name: _device_spec(t, dtype) for name, t in weights.items()}, segments=segments,
        buffer_updates=graph.buffer_updates, mutable_buffers=sorted(graph.mutable_buffers),
        sharding=sharding,
        static_buffers={n: list(graph.weights[n].shape) for n in sorted(graph.static_buffers)})
    return CompiledProgram(program, weights, spec)


def _build_kernels(seg: Segment, index: int, last_reader: dict[str, int], users, outputs, values,
                   dtype, scheduler: Scheduler, counter, graph: Graph, fusion: bool = True) -> None:
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
    for group in fuse(seg.ops, users, enabled=fusion):
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
    made_here = {o.name for o in seg.ops}
    leaves = set(seg.copy_out) | {v for v in made_here if last_reader.get(v, -1) > index} | {
        v for v in graph.buffer_updates if v in made_here}
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


def _device_spec(t: torch.Tensor, dtype: str) -> TensorSpec:
    return TensorSpec(tuple(t.shape), dtype if t.is_floating_point() else dtype_name(t.dtype))


def _to_device(t: torch.Tensor, dtype: str) -> torch.Tensor:
    if t.is_floating_point():
        return t.detach().to(to_torch_dtype(dtype)).contiguous()
    return t.detach().contiguous()
