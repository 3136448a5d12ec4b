"""Eager device kernels: which ATen ops the device runs, and how long each is predicted to take.

Device-accelerated ops are the compiler's (rebel.compiler.support.classify on "aten.<op>.<overload>";
in-place and out= variants count as their functional op). A kernel is "compiled" once per op,
input shapes and dtypes, and cached: its predicted time comes from the same tile-level timing
rules the compiler's scheduler uses (rebel.device.timing), with operands in device DRAM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from rebel.compiler.schedule import Scheduler
from rebel.compiler.support import DEVICE_DTYPES, OpClass, classify
from rebel.device.timing import KernelPlan, Transfer, host_op_seconds, hdma_seconds, kernel_time
from rebel.npu import current_machine

DEVICE_DTYPE = "float16"  # the 16-bit format FP32 tensors hold on the device
HOST_FLOPS_PER_ELEMENT = 8.0
# Memory operations the device's DMA and vector units do, beyond the compiler's table.
EAGER_EXTRA = {"fill_.Scalar": OpClass("data"), "fill_.Tensor": OpClass("data"),
               "zero_.default": OpClass("data"), "copy_.default": OpClass("data"),
               "clone.default": OpClass("data"), "_to_copy.default": OpClass("elementwise")}


def op_class(name: str) -> OpClass | None:
    """The class of an eager op "aten.<op>.<overload>", or None when the device cannot run it."""
    short = name.removeprefix("aten.")
    if short in EAGER_EXTRA:
        return EAGER_EXTRA[short]
    base, _, overload = short.partition(".")
    found = classify(name)
    if found is not None:
        return found
    candidates = []
    if base.endswith("_") and not base.startswith("_"):
        candidates.append(f"{base[:-1]}.{overload}")
    if overload == "out" or overload.endswith("_out"):
        stem = overload[:-4] if overload.endswith("_out") else ""
        candidates += [f"{base}.{stem}" if stem else f"{base}.default", f"{base}.Tensor", f"{base}.default"]
    for c in candidates:
        found = classify(c)
        if found is not None:
            return found
    return None


def dtype_supported(dtypes) -> str | None:
    """None if the device holds all these dtypes, else the first one it does not."""
    for d in dtypes:
        name = _unsupported_name(d)
        if name is not None:
            return name
    return None


@lru_cache(maxsize=None)
def _unsupported_name(dtype: torch.dtype) -> str | None:
    name = str(dtype).removeprefix("torch.")
    return None if name in DEVICE_DTYPES else name


@dataclass(frozen=True)
class KernelInfo:
    name: str
    kind: str
    device_s: float   # predicted: launch, DMA in, compute, DMA out
    launch_s: float   # host-side command issue


@lru_cache(maxsize=1)
def _spec_and_scheduler():
    spec = current_machine().spec
    return spec, Scheduler(spec, DEVICE_DTYPE, {}, set())


def _device_bytes(shape, dtype: torch.dtype) -> int:
    size = 2 if dtype.is_floating_point else torch.empty((), dtype=dtype).element_size()
    return math.prod(shape) * size


def build_kernel(name: str, cls: OpClass, inputs: tuple, outputs: tuple) -> KernelInfo:
    """inputs/outputs: ((shape, dtype), ...). The 'compile' of one eager kernel."""
    spec, sched = _spec_and_scheduler()
    in_bytes = sum(_device_bytes(s, d) for s, d in inputs)
    out_bytes = sum(_device_bytes(s, d) for s, d in outputs)
    in_numel = max((math.prod(s) for s, _ in inputs), default=0)
    out_numel = sum(math.prod(s) for s, _ in outputs)
    flops = vector_ops = sram_bytes = 0.0
    gemm = None
    if cls.kind in ("gemm", "conv") and len(inputs) >= 2:
        b, m, n, k = _gemm_shape(name, inputs, outputs)
        flops = 2.0 * b * m * n * k
        gemm = sched.tile_gemm(b, m, n, k)
    elif cls.kind == "elementwise":
        vector_ops = out_numel * cls.cost
    elif cls.kind in ("reduction", "norm", "softmax", "pool"):
        vector_ops = in_numel * cls.cost
    elif cls.kind in ("data", "gather"):
        sram_bytes = out_bytes
    if gemm is not None:
        tiles = gemm.out_tiles * gemm.k_steps
    else:
        per_pass = spec.die.compute.neural_engines * spec.die.memory.local_sram_bytes // 2
        tiles = max(1, math.ceil((in_bytes + out_bytes) / per_pass))
    plan = KernelPlan(flops, gemm, vector_ops, sram_bytes, tiles,
                      (Transfer("in", in_bytes),) if in_bytes else (),
                      (Transfer("out", out_bytes),) if out_bytes else ())
    t = kernel_time(plan, spec, DEVICE_DTYPE, cls.kind)
    dma_s = t.first_in_s * tiles + t.last_out_s * tiles
    body = max(t.compute_s, dma_s - t.first_in_s - t.last_out_s) if tiles > 1 else t.compute_s
    device_s = t.launch_s + t.first_in_s + body + t.last_out_s
    return KernelInfo(name, cls.kind, device_s, spec.runtime.launch_s)


def _gemm_shape(name: str, inputs, outputs) -> tuple[int, int, int, int]:
    out = outputs[0][0] if outputs else inputs[0][0]
    short = name.split(".")[1]
    if short in ("addmm", "baddbmm", "addbmm"):
        a = inputs[1][0]
    else:
        a = inputs[0][0]
    if short.startswith("conv") or short == "convolution":
        x, w = inputs[0][0], inputs[1][0]
        return 1, out[0] * math.prod(out[2:]) if len(out) > 2 else out[0], w[0], math.prod(w[1:])
    k = a[-1] if a else 1
    if len(out) >= 3:
        return math.prod(out[:-2]), out[-2], out[-1], k
    if len(out) == 2:
        return 1, out[0], out[1], k
    return 1, 1, max(1, out[0] if out else 1), k


def host_op_s(inputs, outputs) -> float:
    spec, _ = _spec_and_scheduler()
    out_numel = sum(math.prod(s) for s, _ in outputs)
    nbytes = sum(math.prod(s) * 4 for s, _ in (*inputs, *outputs))
    return host_op_seconds(out_numel * HOST_FLOPS_PER_ELEMENT, nbytes, spec)


def copy_s(nbytes: int, to_device: bool, pinned: bool = False) -> float:
    """One eager host copy; pinned host memory takes the DMA path, pageable the staged one."""
    spec, _ = _spec_and_scheduler()
    return hdma_seconds(nbytes, spec, to_device, pinned)


def reset_caches() -> None:
    _spec_and_scheduler.cache_clear()
