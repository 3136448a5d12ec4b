"""Execute a program's segments: copies in, kernels, host fallbacks, copies out.

A tensor-parallel program runs on several dies: each holds its slice of the split weights and
its own tensors (one environment per die), runs every kernel, and meets the others at the
collectives. Host segments and outputs read die 0's copy (the compiler made them replicated).
"""
from __future__ import annotations

import math
import mmap
import os
import re

import torch
import torch.utils._pytree as pytree

from ..compiler.program import Program
from ..compiler.tensor_parallel import ALL_GATHER, ALL_REDUCE, SHARD, shard_weight
from ..device import packed_linear
from ..device.codegen import CompiledBlock
from ..device.kernels import BoundOp, FunctionalKernel, round_to_device, run_host_ops, to_device_storage
from ..ir import Op, Ref, to_torch_dtype


# "generated" (default): each run of device kernels is one generated function (device.codegen);
# "interpret": the reference interpreter, one FunctionalKernel per kernel (kept for comparison).
EXECUTOR_ENV = "RBLN_EXECUTOR"


def executor_mode() -> str:
    mode = os.environ.get(EXECUTOR_ENV, "generated")
    if mode not in ("generated", "interpret"):
        raise ValueError(f"{EXECUTOR_ENV} must be 'generated' or 'interpret', got {mode!r}")
    return mode


def bind_segments(program: Program, mode: str | None = None, packed: dict | None = None) -> list:
    """(segment, work) pairs: device kernels ready to run (collectives kept as ops), host ops.
    packed: the weights the dies hold packed for their linears (`pack_weights`; generated code only)."""
    mode = mode or executor_mode()
    segments = []
    for index, seg in enumerate(program.segments):
        if seg.kind == "device" and mode == "generated":
            work = _generated_blocks(program, index, packed or {})
        elif seg.kind == "device":
            work = [k.ops[0] if k.kind == "collective" else
                    FunctionalKernel(k.ops, k.outputs, program.device_dtype) for k in seg.kernels]
        else:
            work = [BoundOp.bind(op) for op in seg.ops]
        segments.append((seg, work))
    return segments


def _generated_blocks(program: Program, index: int, packed: dict) -> list:
    """Device segment `index` as generated blocks, split at the collectives (which run across
    dies between blocks). Each block stores only the values code outside it reads."""
    seg = program.segments[index]
    runs: list[list] = [[]]
    for k in seg.kernels:
        if k.kind == "collective":
            runs.append(k.ops[0])
            runs.append([])
        else:
            runs[-1].append(k)
    reads_by_run = [{r for k in run for o in k.ops for r in o.refs} if isinstance(run, list) else
                    set(run.refs) for run in runs]
    outside = {r for i, s in enumerate(program.segments) if i != index
               for r in _segment_reads(s)}
    outside |= set(seg.copy_out) | set(program.buffer_updates)
    outside |= {o.name for o in program.outputs if isinstance(o, Ref)}
    work = []
    for i, run in enumerate(runs):
        if not isinstance(run, list):
            work.append(run)
            continue
        if not run:
            continue
        keep = outside | {r for j, reads in enumerate(reads_by_run) if j != i for r in reads}
        work.append(CompiledBlock([(k.ops, k.outputs) for k in run], program.device_dtype, keep,
                                  name=re.sub(r"\W", "_", f"segment_{seg.name}_{i}"),
                                  shared=frozenset(program.buffer_updates), packed=packed))
    return work


def _segment_reads(seg) -> set[str]:
    if seg.kind == "device":
        return {r for k in seg.kernels for o in k.ops for r in o.refs} | set(seg.copy_out)
    return {r for o in seg.ops for r in o.refs}


def place_weights(program: Program, weights: dict[str, torch.Tensor], sixteen_bit: set[str] = frozenset(),
                  dtype: torch.dtype | None = None) -> list[dict]:
    """Each die's weights as the device holds them (FP32 storage of 16-bit values). sixteen_bit:
    weights held only in the device's 16-bit format (`packed_linear`'s 16-bit packing, nothing
    reading a plain copy); on one die, one stored in that format is placed as its packed copy
    as it is (the artifact's tensor), so no FP32 copy of it is ever made: that copy was the
    peak of creating an LLM's runtime."""
    sharding = program.sharding
    size = sharding.size
    placed = [{} for _ in range(size)]
    for n, t in weights.items():
        if size == 1 and n in sixteen_bit and t.dtype == dtype:
            placed[0][n + packed_linear.SUFFIX] = t.contiguous()
            continue
        dim = sharding.weights.get(n)
        if _is_broadcast_zero(t):  # a KV cache: each die gets its own zeroed storage
            storage = torch.float32 if t.is_floating_point() else t.dtype
            for rank, die in enumerate(placed):
                shape = t.shape if dim is None or size == 1 else t.chunk(size, dim)[rank].shape
                die[n] = _zeroed(list(shape), storage)
            continue
        full = t.float() if t.is_floating_point() else t
        for rank, die in enumerate(placed):
            die[n] = shard_weight(full, dim, rank, size)
    return placed


def pack_weights(programs: list[Program], placed: list[dict], packed: dict[str, str],
                 dtype: torch.dtype) -> None:
    """Give each die a packed copy of the weights in `packed` (name -> packing, packed_linear;
    dtype: the device's 16-bit format, which the weights' values are in), dropping the plain copy
    where nothing but those linears (and lookups of a 16-bit copy) reads it."""
    keep = packed_linear.plain_readers(programs, packed)
    for die in placed:
        for name, form in packed.items():
            if name + packed_linear.SUFFIX in die:
                continue  # placed in its 16-bit form already (place_weights)
            die[name + packed_linear.SUFFIX] = packed_linear.pack(die[name], form, dtype)
            if name not in keep:
                del die[name]


def sixteen_bit_only(programs: list[Program], packed: dict[str, str]) -> set[str]:
    """The weights `packed` holds in 16 bits that nothing reads a plain copy of."""
    return {n for n, form in packed.items() if form == packed_linear.SIXTEEN_BIT} - \
        packed_linear.plain_readers(programs, packed)


def _is_broadcast_zero(t: torch.Tensor) -> bool:
    """The loader's zero buffers are one zero broadcast to their shape (artifact.py)."""
    return t.numel() > 1 and t.dim() > 0 and all(s == 0 for s in t.stride()) \
        and t.device.type == "cpu" and not bool(t.reshape(-1)[0])


def _zeroed(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Zeros in a fresh anonymous mapping: the OS maps zero pages lazily, so a KV cache's
    untouched blocks cost neither the time to write them nor resident memory. Not numpy's
    zeros: numpy advises huge pages for large arrays, and the first token written to each
    layer's cache then zeroes a whole 2 MiB page (about 1 ms a layer in a model's first run)."""
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if not nbytes:
        return torch.zeros(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=count).view(shape)


def execute(program: Program, segments: list, die_weights: list[dict], inputs: list[torch.Tensor],
            out_spec, dtype: torch.dtype, static: list[dict] | None = None):
    """Run one program. die_weights: each die's weights and persistent buffers (this runtime's);
    static: each die's static buffers (the compile context's, shared with its other runtimes).
    Buffer updates replace the entry in whichever of the two holds the buffer, so the next run
    of any runtime sharing it reads the new contents."""
    host = {name: t for (name, _), t in zip(program.inputs, inputs)}
    dies = [dict(w) for w in die_weights]
    if static is not None:
        for env, buffers in zip(dies, static):
            env.update(buffers)
    for seg, work in segments:
        if seg.kind == "device":
            for v in seg.copy_in:
                value = host[v].float() if host[v].is_floating_point() else host[v]
                for env in dies:
                    env[v] = value
            for item in work:
                if isinstance(item, Op):
                    _collective(item, dies, dtype)
                else:
                    for env in dies:
                        item(env)
            for v in seg.copy_out:
                host[v] = _as(dies[0][v], to_torch_dtype(program.values[v].dtype))
        else:
            made_here = {op.name for op in seg.ops}  # e.g. a multi-output op read by its getitems
            for r in {r for op in seg.ops for r in op.refs} - made_here - host.keys():
                host[r] = _to_host(program, r, dies[0])
            run_host_ops(work, host)
    for value, buffer in program.buffer_updates.items():
        for rank, env in enumerate(dies):
            new = env[value] if value in env else to_device_storage(host[value], dtype)
            held = static[rank] if static is not None and buffer in static[rank] else die_weights[rank]
            held[buffer] = new
    flat = [(host[o.name] if o.name in host else _to_host(program, o.name, dies[0]))
            if isinstance(o, Ref) else o for o in program.outputs]
    if len(flat) == 1 and out_spec.is_leaf():
        return flat[0]  # one tensor: what unflattening gives, without pytree's Python
    return pytree.tree_unflatten(flat, out_spec)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype (itself when it is already): `Tensor.to` costs a dispatch even then, and an
    output's copy-out runs every run."""
    return t if t.dtype is dtype else t.to(dtype)


def _collective(op: Op, dies: list[dict], dtype: torch.dtype) -> None:
    source = op.args[0].name
    if op.target == ALL_REDUCE:
        total = round_to_device(sum(env[source] for env in dies), dtype)
        for env in dies:
            env[op.name] = total
    elif op.target == ALL_GATHER:
        whole = torch.cat([env[source] for env in dies], dim=op.args[1])
        for env in dies:
            env[op.name] = whole
    elif op.target == SHARD:
        for rank, env in enumerate(dies):
            env[op.name] = env[source].chunk(len(dies), op.args[1])[rank].contiguous()
    else:
        raise ValueError(f"unknown collective {op.target}")


def _to_host(program: Program, name: str, env: dict) -> torch.Tensor:
    spec = program.values.get(name)
    t = env[name]
    return _as(t, to_torch_dtype(spec.dtype)) if spec is not None else t
