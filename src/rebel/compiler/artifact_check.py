"""Structural checks of a program read from an artifact, run once at load time.

`Program.from_json` only converts JSON into dataclasses; it trusts names and types. A program
member that was rewritten (by hand, by a bug, by corruption that kept the checksum consistent)
would then fail much later, as a KeyError or TypeError deep inside the runtime, or not at all.
These checks catch that at the seam instead: every field has the type the runtime assumes, every
name an op, a segment or an output refers to is defined before it is used, and every weight and
buffer the program names exists. Each failure is an ArtifactError naming the field.
"""
from __future__ import annotations

import math

from torch.utils._pytree import treespec_loads

from ..errors import ArtifactError
from ..ir import FLOAT_DTYPES, Op, Ref, TensorSpec, resolve_target, to_torch_dtype
from .program import Program

MAX_NUMEL = 2 ** 40  # far above any real tensor; stops a rewritten shape allocating terabytes


def check_program(program: Program, npu: str) -> None:
    """Raise ArtifactError unless `program` is internally consistent and compiled for `npu`."""
    _check_str(program.npu, "npu")
    if program.npu != npu:
        raise ArtifactError(f"program is for {program.npu!r} but the manifest says {npu!r}")
    _check_str(program.device_dtype, "device_dtype")
    if program.device_dtype not in FLOAT_DTYPES:
        raise ArtifactError(f"program has an unknown device dtype {program.device_dtype!r}")
    for name, spec in program.inputs:
        _check_spec(spec, f"input {name!r}", name)
    if len({n for n, _ in program.inputs}) != len(program.inputs):
        raise ArtifactError("program has two inputs of the same name")
    _check_input_names(program)
    if not isinstance(program.flat_outputs, bool):
        raise ArtifactError("program flat_outputs is not a bool")
    for what, table in (("value", program.values), ("weight", program.weights)):
        for name, spec in table.items():
            _check_spec(spec, f"{what} {name!r}", name)
    # The runtime sizes every host<->device copy and every input from `values`.
    _check_names([n for n, _ in program.inputs], set(program.values), "program inputs")
    for name, spec in program.inputs:
        if program.values[name] != spec:
            raise ArtifactError(f"program input {name!r} is {spec} but its value is "
                                f"{program.values[name]}")
    defined = {n for n, _ in program.inputs} | set(program.weights)
    for segment in program.segments:
        where = f"segment {segment.name!r}"
        _check_str(segment.name, "segment name")
        _check_names(segment.copy_in, defined, f"{where} copy_in")
        _check_names(segment.copy_in, set(program.values), f"{where} copy_in (values)")
        for kernel in segment.kernels:
            _check_str(kernel.name, f"{where} kernel name")
            if "_" not in kernel.name:
                raise ArtifactError(f"{where} has a malformed kernel name {kernel.name!r}")
            for op in kernel.ops:
                _check_op(op, defined, program.values)
            _check_names(kernel.outputs, defined, f"kernel {kernel.name!r} outputs")
            for transfer in (*kernel.plan.dma_in, *kernel.plan.dma_out):
                _check_str(transfer.value, f"kernel {kernel.name!r} transfer")
                if transfer.nbytes < 0:
                    raise ArtifactError(f"kernel {kernel.name!r} has a negative transfer size")
            for number in (kernel.plan.flops, kernel.plan.vector_ops, kernel.plan.sram_bytes,
                           kernel.plan.tiles):
                if not math.isfinite(number) or number < 0:
                    raise ArtifactError(f"kernel {kernel.name!r} has a malformed plan ({number!r})")
        if segment.kind == "host" and segment.kernels or segment.kind == "device" and segment.ops:
            raise ArtifactError(f"{where} mixes host ops and device kernels")
        for op in segment.ops:
            _check_op(op, defined, program.values)
        _check_names(segment.copy_out, defined, f"{where} copy_out")
        _check_names(segment.copy_out, set(program.values), f"{where} copy_out (values)")
    if not isinstance(program.outputs, list):
        raise ArtifactError("program outputs is not a list")
    refs = [o.name for o in _flat(program.outputs) if isinstance(o, Ref)]
    _check_names(refs, defined, "program outputs")
    _check_out_spec(program)
    for value, buffer in program.buffer_updates.items():
        _check_str(buffer, f"buffer update of {value!r}")
        if value not in defined or buffer not in program.weights:
            raise ArtifactError(f"program buffer update {value!r} -> {buffer!r} names no value "
                                "or no buffer")
    _check_names(program.mutable_buffers, set(program.weights), "program mutable_buffers")
    _check_static_buffers(program)
    sharding = program.sharding
    if not isinstance(sharding.size, int) or not 1 <= sharding.size <= 1024:
        raise ArtifactError(f"program has a malformed tensor_parallel size {sharding.size!r}")


def _check_static_buffers(program: Program) -> None:
    """Static buffers: names of mutable buffers, each with an allocated shape of the compiled
    rank whose dims (after a resize, the first may differ) are positive ints."""
    table = program.static_buffers
    if not isinstance(table, dict):
        raise ArtifactError("program static_buffers is not an object")
    for name, shape in table.items():
        if name not in program.mutable_buffers:
            raise ArtifactError(f"program static buffer {name!r} is not a persistent buffer")
        compiled = program.weights[name].shape
        if not isinstance(shape, list) or len(shape) != len(compiled) or any(
                isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape) \
                or list(shape[1:]) != list(compiled[1:]) or math.prod(shape) > MAX_NUMEL:
            raise ArtifactError(f"program static buffer {name!r} has a malformed allocated shape "
                                f"{shape!r} (compiled {list(compiled)})"[:300])


def check_context(context, buckets: list[Program], path) -> None:
    """The manifest's compile context: an id string, a weight_sharing bool, and (with sharing)
    a content key per weight and the weights this file is the first of its context to hold."""
    if context is None:
        if any(p.static_buffers for p in buckets):
            raise ArtifactError(f"{path}: the program has static buffers but the manifest names "
                                "no compile context")
        return
    bad = f"{path} has a malformed manifest context"
    if not isinstance(context.get("id"), str) or not context["id"] or len(context["id"]) > 200:
        raise ArtifactError(f"{bad} (id={context.get('id')!r})"[:300])
    if not isinstance(context.get("weight_sharing"), bool):
        raise ArtifactError(f"{bad} (weight_sharing={context.get('weight_sharing')!r})"[:300])
    names = {n for p in buckets for n in p.weights if n not in p.static_buffers}
    keys = context.get("weight_keys", {})
    if not isinstance(keys, dict) or not all(isinstance(k, str) and isinstance(v, str) and k in names
                                             for k, v in keys.items()):
        raise ArtifactError(f"{bad} (weight_keys names no weight of the program)")
    owned = context.get("owned_weights", [])
    if not isinstance(owned, list) or not all(isinstance(n, str) and n in names for n in owned):
        raise ArtifactError(f"{bad} (owned_weights names no weight of the program)")


def _check_op(op: Op, defined: set[str], values: dict[str, TensorSpec]) -> None:
    _check_str(op.name, "op name")
    _check_str(op.target, f"op {op.name!r} target")
    # ATen names resolve now (ArtifactError for anything else, e.g. builtins.eval); the device's
    # own rbln ops register when the runtime imports them, so only their namespace is checked.
    if not (op.target.startswith(("rbln.", "rbln_custom_ops.")) and op.target.count(".") == 2):
        resolve_target(op.target)
    _check_names(op.refs, defined, f"op {op.name!r} arguments")
    outs = op.out if isinstance(op.out, tuple) else (op.out,)
    for out in outs:
        if out is not None:
            _check_spec(out, f"op {op.name!r} output", op.name)
    if isinstance(op.out, TensorSpec) and op.name in values and values[op.name] != op.out:
        raise ArtifactError(f"op {op.name!r} makes {op.out} but its value is {values[op.name]}")
    defined.add(op.name)


def _check_spec(spec, what: str, name) -> None:
    _check_str(name, f"name of {what}")
    if not isinstance(spec, TensorSpec):
        raise ArtifactError(f"program {what} has no tensor spec")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in spec.shape) \
            or math.prod(spec.shape) > MAX_NUMEL:
        raise ArtifactError(f"program {what} has a malformed shape {list(spec.shape)}")
    to_torch_dtype(spec.dtype)  # raises ArtifactError for unknown dtypes


def _check_names(names, defined: set[str], what: str) -> None:
    if not isinstance(names, (list, tuple)):
        raise ArtifactError(f"{what} is not a list")
    for name in names:
        if not isinstance(name, str) or name not in defined:
            raise ArtifactError(f"{what} refer to {name!r}, which is not defined before")


def _check_out_spec(program: Program) -> None:
    _check_str(program.out_spec, "out_spec")
    try:
        spec = treespec_loads(program.out_spec)
    except Exception as e:  # torch raises many types for a malformed TreeSpec
        raise ArtifactError(f"program out_spec is malformed ({type(e).__name__})") from None
    if spec.num_leaves != len(program.outputs):
        raise ArtifactError(f"program out_spec has {spec.num_leaves} leaves for "
                            f"{len(program.outputs)} outputs")


def _check_input_names(program: Program) -> None:
    """input_info's names, by which callers pass keyword inputs: one distinct string per input."""
    names = program.input_names
    if names is None:
        return
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ArtifactError("program input_names is not a list of strings")
    if len(names) != len(program.inputs) or len(set(names)) != len(names):
        raise ArtifactError(f"program input_names lists {len(names)} names for "
                            f"{len(program.inputs)} inputs, or repeats one")


def _check_str(value, what: str) -> None:
    if not isinstance(value, str):
        raise ArtifactError(f"program {what} is not a string ({type(value).__name__})")


def _flat(value):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flat(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flat(v)
    else:
        yield value
