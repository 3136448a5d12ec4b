"""Turn a compiled program into the device's work list and predict its timeline.

Shapes are static, so one run of a program always takes the same predicted time: the timeline is
computed once per runtime and replayed (shifted on the clock) for every run.
"""
from __future__ import annotations

from ..compiler.program import Program
from ..device.engine import DeviceStep, EventEngine, HostOpStep, HostStep, KernelStep, Timeline
from ..device.timing import host_op_seconds, kernel_time
from ..npu.spec import ProductSpec

HOST_FLOPS_PER_ELEMENT = 8.0  # fallback ops are transcendental-heavy (atan, erfinv...)


def build_steps(program: Program, spec: ProductSpec) -> list:
    steps = []
    for seg in program.segments:
        if seg.kind == "device":
            kernels = tuple(KernelStep(k.name, k.kind, tuple(o.target for o in k.ops), k.plan,
                                       kernel_time(k.plan, spec, program.device_dtype, k.kind))
                            for k in seg.kernels)
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


def predict(program: Program, spec: ProductSpec, device: int = 0, prefetch: bool = True) -> Timeline:
    return EventEngine(spec, device, prefetch).run(build_steps(program, spec))
