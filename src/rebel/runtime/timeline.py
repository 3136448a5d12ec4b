"""Turn a compiled program into the device's work list and predict its timeline.

Shapes are static, so one run of a program mostly takes the same predicted time: the timeline is
computed once per runtime and replayed (shifted on the clock) for every run. The exception is
paged attention, whose work follows the context each sequence has reached: for those programs
the runtime scales the attention kernels by the run's positions (`paged_fill`) and re-times.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..compiler.program import Program
from ..compiler.schedule import PAGED_ATTENTION
from ..device.engine import DeviceStep, EventEngine, HostOpStep, HostStep, KernelStep, Timeline
from ..device.timing import KernelPlan, host_op_seconds, kernel_time
from ..npu.spec import ProductSpec

HOST_FLOPS_PER_ELEMENT = 8.0  # fallback ops are transcendental-heavy (atan, erfinv...)


def build_steps(program: Program, spec: ProductSpec, fill: dict[str, float] | None = None) -> list:
    """fill: per paged-attention kernel, the share of its compiled (maximum) context in use."""
    steps = []
    caches = set(program.mutable_buffers)
    for seg in program.segments:
        if seg.kind == "device":
            plans = [(k, _scaled(k.plan, fill[k.name], caches) if fill and k.name in fill else k.plan)
                     for k in seg.kernels]
            kernels = tuple(KernelStep(k.name, k.kind, tuple(o.target for o in k.ops), plan,
                                       kernel_time(plan, spec, program.device_dtype, k.kind))
                            for k, plan in plans)
            steps.append(DeviceStep(
                seg.name, tuple((v, program.values[v].nbytes()) for v in seg.copy_in), kernels,
                tuple((v, program.values[v].nbytes()) for v in seg.copy_out)))
        else:
            ops = []
            for op in seg.ops:
                if op.kind == "alias" or op.target == "getitem":
                    continue
                out = sum(s.numel for s in op.out_specs)
                nbytes = sum(s.nbytes() for s in op.out_specs) + sum(
                    program.values[r].nbytes() for r in op.refs if r in program.values)
                ops.append(HostOpStep(op.label, host_op_seconds(out * HOST_FLOPS_PER_ELEMENT, nbytes, spec),
                                      {"op": op.target, "reason": op.host_reason}))
            steps.append(HostStep(seg.name, tuple(ops)))
    return steps


def paged_fill(program: Program, values: dict) -> dict[str, float]:
    """For each paged-attention kernel: blocks its sequences have reached / blocks compiled for,
    from the positions the run was given (a position < 0 is padding)."""
    fill = {}
    for k in program.kernels:
        for op in k.ops:
            if op.target != PAGED_ATTENTION or op.args[6].name not in values:
                continue
            positions = torch.as_tensor(values[op.args[6].name])
            rows, blocks = program.values[op.args[5].name].shape
            block = int(op.args[7])
            reached = (positions.max(dim=-1).values + 1).clamp(min=0)
            used = (-(-reached // block)).clamp(max=blocks).sum().item()
            fill[k.name] = max(used, 1) / (rows * blocks)
    return fill


def _scaled(plan: KernelPlan, fill: float, caches: set[str]) -> KernelPlan:
    gemm = replace(plan.gemm, work_fraction=plan.gemm.work_fraction * fill) if plan.gemm else None
    dma_in = tuple(replace(t, nbytes=int(t.nbytes * fill)) if t.value in caches else t
                   for t in plan.dma_in)
    return replace(plan, flops=plan.flops * fill, gemm=gemm, dma_in=dma_in)


def predict(program: Program, spec: ProductSpec, device: int = 0, prefetch: bool = True) -> Timeline:
    return EventEngine(spec, device, prefetch).run(build_steps(program, spec))
