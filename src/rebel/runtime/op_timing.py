"""The predicted device time of one vendor attention op called on its own, outside any compiled
graph, e.g. by vLLM's attention layers between the compiled segments of vLLM's own model classes
(vllm_rbln Path B), which run `torch.ops.rbln_custom_ops.paged_*_attn_*` on host tensors.

The op is timed as the compiler and runtime time it inside a graph, not by a second formula: its
shapes become a one-op graph (the op, its three results; the caches as persistent buffers updated
in place, as a model's KV-cache buffers are), lowered by the compiler (`lower_graph`: placement,
fusion, the scheduler's tiling and paged DMA traffic), then timed by the runtime's own rules
(`paged_fill` scales the kernel to the blocks the sequences have reached, `build_steps` gives
its kernel time, `EventEngine` places it on the device's queues). Its operands are already in
device DRAM (`resident_inputs`): the query, keys and values come from the device segment before
it, so no host copy is counted. Shapes are those one die sees: under tensor parallelism each
worker passes its own heads and its own cache.

Lowered programs are kept per op and shapes, and timings per program and fill, so a call at
shapes and a context already seen costs the fill (from its positions) and two cache look-ups.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..compiler.compile import lower_graph
from ..device.engine import EventEngine
from ..device.events import NEURAL_ENGINE, TASK_DMA, Event
from ..device.vendor_ops import ATTENTION, FP8
from ..errors import CompileError
from ..ir import GETITEM, Graph, Op, Ref, TensorSpec, dtype_name
from ..npu import current_machine, load_spec
from .timeline import build_steps, paged_fill, paged_sites

CACHES = ("kcache", "vcache")
WEIGHTS = ("scale", "k_scale", "v_scale")  # constants of a model (its buffers), not inputs


def attention_seconds(name: str, args: dict, *, npu: str | None = None,
                      device_dtype: str | None = None) -> float:
    """Predicted seconds of one call (see `attention_events`): from the kernel's first Task DMA
    load to the end of its compute and stores."""
    events = attention_events(name, args, npu=npu, device_dtype=device_dtype)
    return max(e.end_s for e in events) - min(e.start_s for e in events)


def attention_events(name: str, args: dict, *, npu: str | None = None,
                     device_dtype: str | None = None) -> tuple[Event, ...]:
    """The device events (Task DMA loads and stores, Neural Engine compute) predicted for vendor
    attention op `name` (e.g. "paged_causal_attn_decode") run with `args` (its arguments by
    schema name, as `rebel.device.vendor_ops` lists them: tensors, block_size, flags; an omitted
    optional tensor is None) on one die of `npu` (default: the virtual machine's product), as
    the kernel of this op in a compiled graph is timed.
    device_dtype: the 16-bit format the device holds floats in (default bfloat16 for a bfloat16
    query, else float16)."""
    spec = ATTENTION.get(name)
    if spec is None:
        raise CompileError(f"{name!r} is not a vendor attention op; known: {sorted(ATTENTION)}")
    missing = [p for p in spec.params if p not in args and p in ("q", "k", "v", *CACHES)]
    if missing:
        raise CompileError(f"{name}: missing argument(s) {missing}")
    unknown = sorted(set(args) - set(spec.params))
    if unknown:
        raise CompileError(f"{name}: unknown argument(s) {unknown}; it takes {spec.params}")
    q = args["q"]
    dtype = device_dtype or ("bfloat16" if q.dtype == torch.bfloat16 else "float16")
    layout = tuple((p, _describe(args.get(p), dtype)) for p in spec.params)
    program, sites = _lowered(name, layout, npu, dtype)
    positions = {s.positions for s in sites}
    values = {}
    for p, value in args.items():
        if isinstance(value, torch.Tensor) and _input_name(p) in positions:
            values[_input_name(p)] = value
    fill = paged_fill(sites, values) if sites else {}
    return _timed(name, layout, npu, dtype, tuple(sorted(fill.items())))


def _describe(value, dtype: str):
    """An argument as the lowered graph depends on it: a tensor's shape and device dtype, or
    the literal itself."""
    if isinstance(value, torch.Tensor):
        floating = value.is_floating_point() and value.dtype != FP8
        held = dtype if floating else dtype_name(value.dtype)
        return ("tensor", tuple(value.shape), held)
    if value is not None and not isinstance(value, (bool, int, float)):
        raise CompileError(f"cannot time an attention argument of type {type(value).__name__}")
    return ("literal", value)


def _input_name(param: str) -> str:
    return f"in_{param}"


def _product(npu: str | None):
    return load_spec(npu) if npu else current_machine().spec


@lru_cache(maxsize=128)
def _lowered(name: str, layout: tuple, npu: str | None, dtype: str):
    """The one-op graph of `name` at these shapes, compiled; its paged-attention sites."""
    spec = ATTENTION[name]
    inputs, weights, args = [], {}, []
    for param, (what, *rest) in layout:
        if what == "literal":
            args.append(rest[0])
            continue
        shape, held = rest
        if param in CACHES or param in WEIGHTS:
            weights[param] = torch.empty(shape, dtype=getattr(torch, held), device="meta")
            args.append(Ref(param))
        else:
            inputs.append((_input_name(param), TensorSpec(shape, held)))
            args.append(Ref(_input_name(param)))
    described = dict(layout)
    out = TensorSpec(described["q"][1], described["q"][2])
    caches = [TensorSpec(described[c][1], described[c][2]) for c in CACHES]
    ops = [Op("attention", f"rbln_custom_ops.{spec.name}.default", tuple(args), {},
              (out, *caches), spec.name)]
    ops += [Op(f"result_{i}", GETITEM, (Ref("attention"), i), {}, s, GETITEM)
            for i, s in enumerate((out, *caches))]
    graph = Graph(inputs, weights, ops, [Ref("result_0")], _ONE_OUTPUT,
                  buffer_updates={"result_1": "kcache", "result_2": "vcache"},
                  mutable_buffers=set(CACHES))
    program = lower_graph(graph, _product(npu), dtype, convert_weights=False).program
    return program, paged_sites(program)


@lru_cache(maxsize=4096)
def _timed(name: str, layout: tuple, npu: str | None, dtype: str, fill: tuple) -> tuple[Event, ...]:
    """The kernel's events with its operands in device DRAM; its result stays there for the next
    segment (the program's copy of it back to the host is not the op's)."""
    program, _ = _lowered(name, layout, npu, dtype)
    spec = _product(npu)
    timeline = EventEngine(spec, 0, resident_inputs=True).run(
        build_steps(program, spec, dict(fill) or None))
    return tuple(e for e in timeline.events if e.track in (TASK_DMA, NEURAL_ENGINE))


# A single tensor output, as torch.utils._pytree.treespec_dumps writes it.
_ONE_OUTPUT = '[1, {"type": null, "context": null, "children_spec": []}]'
