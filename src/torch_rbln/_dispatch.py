"""Eager kernels of the "rbln" device: one Python kernel (`run`) for every ATen op.

`run` is the boxed PrivateUse1 fallback, and is also registered directly for the hot ops (_DIRECT),
which skips the fallback's extra cost and ATen's out= detour for structured ops.

Device memory is host memory (see csrc/rbln_shim.cpp), so a kernel needs no copies: it takes CPU
aliases of its device operands (shim.as_cpu, zero-copy), runs the op with PyTorch's CPU kernel,
and hands fresh results to the device (shim.adopt, zero-copy, accounted in device DRAM). In-place
and out= ops write through the aliases; view ops return device views of their device input.

What the device computes (its numerics): ops the device accelerates (kernels.op_class) compute in
FP32 and their floating results are rounded to FP16, the device's 16-bit format. Eager tensors keep
their PyTorch dtype: a float32 "rbln" tensor holds FP16-rounded values (the chip has no FP32
storage or arithmetic), so uploads of float32 data round too. Ops the device does not accelerate
run on the host ("fallback", logged once per op; TORCH_RBLN_DISABLE_FALLBACK=1 makes them errors)
and their results are rounded the same way when they come back to the device.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass

import torch

from rebel.runtime.host_memory import is_pinned

from . import kernels, profiler, stats

log = logging.getLogger("torch_rbln")
F16 = torch.float16
_shim = None
_lib_fallback = None
_lib_impl = None


class FallbackError(RuntimeError):
    """An op fell back to the host while TORCH_RBLN_DISABLE_FALLBACK=1."""


# Ops that move or describe memory rather than compute: never a kernel, never a fallback.
_MEMORY_OPS = {"_local_scalar_dense", "_copy_from", "_copy_from_and_resize", "empty",
               "empty_strided", "resize_", "set_", "_has_compatible_shallow_copy_type", "is_pinned",
               "_pin_memory", "record_stream", "lift_fresh", "detach", "alias", "_to_cpu",
               "is_set_to", "_nested_tensor_from_mask_left_aligned", "equal"}


@dataclass
class OpInfo:
    name: str               # "aten.add.Tensor"
    cls: object             # kernels.OpClass or None
    memory: bool            # metadata / copy op (no kernel, not a fallback)
    view: bool              # returns an alias of an input (not written)
    write_returns: tuple    # per return: index into flat args of the arg it writes, or None
    write_args: tuple       # schema positions of mutated arguments (name, index)


_quiet = threading.local()


class host_side:
    """Inside this block, ops are host-side work (printing a tensor): not counted, not logged,
    allowed even with TORCH_RBLN_DISABLE_FALLBACK=1."""

    def __enter__(self):
        _quiet.depth = getattr(_quiet, "depth", 0) + 1

    def __exit__(self, *exc):
        _quiet.depth -= 1
        return False


_infos: dict = {}
_fallback_logged: set[str] = set()
_kernel_cache: dict = {}


def _info(op) -> OpInfo:
    info = _infos.get(op)
    if info is None:
        schema = op._schema
        base = schema.name.split("::")[-1]
        name = f"aten.{base}.{op._overloadname}"
        returns = schema.returns
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in returns)
        write_returns = []
        for r in returns:
            pos = None
            if r.alias_info is not None and r.alias_info.is_write:
                for i, a in enumerate(schema.arguments):
                    if a.alias_info is not None and a.alias_info.before_set == r.alias_info.before_set:
                        pos = (a.name, i)
                        break
            write_returns.append(pos)
        write_args = tuple((a.name, i) for i, a in enumerate(schema.arguments)
                           if a.alias_info is not None and a.alias_info.is_write)
        memory = base in _MEMORY_OPS or view
        info = OpInfo(name, None if memory else kernels.op_class(name), memory, view,
                      tuple(write_returns), write_args)
        _infos[op] = info
    return info


def _arg(args, kwargs, name, index):
    return kwargs[name] if name in kwargs else args[index] if index < len(args) else None


_device_dtype = F16


def set_device_dtype(dtype) -> None:
    """The 16-bit format float32 rbln tensors hold: torch.float16 (default) or torch.bfloat16.

    FP16 keeps more mantissa; BF16 keeps FP32's range, which training needs (AdamW's second
    moment of small gradients and its eps=1e-8 underflow to zero in FP16).
    """
    global _device_dtype
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the device's 16-bit format is torch.float16 or torch.bfloat16, got {dtype}")
    _device_dtype = dtype


def get_device_dtype() -> torch.dtype:
    return _device_dtype


def _round_f32(t: torch.Tensor) -> torch.Tensor:
    """Round a float32 CPU tensor in place to values the device's 16-bit format can hold
    (in the shim: an in-place F16C round trip, ~0.3 us against ~2 us through two ATen ops)."""
    return _shim.round_(t, _device_dtype is torch.bfloat16)


def _fallback_allowed(info: OpInfo, reason: str) -> None:
    if os.environ.get("TORCH_RBLN_DISABLE_FALLBACK", "0") == "1":
        raise FallbackError(f"{info.name} is not supported on the rbln device ({reason}) and "
                            "TORCH_RBLN_DISABLE_FALLBACK=1 forbids running it on the host")
    if info.name not in _fallback_logged:
        _fallback_logged.add(info.name)
        log.warning("torch_rbln: %s runs on the host (CPU fallback): %s", info.name, reason)


class _Operands:
    """Swaps a call's device tensors for CPU aliases, noting what the kernel needs about them.

    ATen arguments nest at most one level (Tensor[] / Tensor?[] lists), so this walks them
    directly: pytree's generic flatten/unflatten cost about 7 us of a ~20 us op.
    """
    __slots__ = ("name", "device", "dev_in", "storages", "cpu_large")

    def __init__(self, info: OpInfo):
        self.name = info.name
        self.device = None
        self.dev_in = []                                  # (shape, dtype) of device operands
        self.storages = {} if info.view else None        # data_ptr -> device tensor (views)
        self.cpu_large = False                           # a non-scalar CPU tensor operand

    def cpu(self, a):
        if isinstance(a, torch.Tensor):
            d = a.device
            if d.type == "rbln":
                if self.device is None:
                    self.device = d.index
                elif d.index != self.device:
                    raise RuntimeError(f"Expected all tensors to be on the same device, but found "
                                       f"at least two devices, rbln:{self.device} and rbln:{d.index}! "
                                       f"(when running {self.name})")
                c = _shim.as_cpu(a)
                self.dev_in.append((a.shape, a.dtype))
                if self.storages is not None:
                    self.storages[c.untyped_storage().data_ptr()] = a
                return c
            if d.type == "cpu" and a.dim() > 0:
                self.cpu_large = True
            return a
        if isinstance(a, (list, tuple)):
            return type(a)([self.cpu(x) for x in a]) if a else a
        if isinstance(a, torch.device) and a.type == "rbln":
            self.device = a.index if a.index is not None else _shim.current_device()
            return _CPU
        return a


_CPU = torch.device("cpu")


def run(op, *args, **kwargs):
    """The PrivateUse1 kernel of every op: the boxed fallback, and the direct hot-op kernels."""
    info = _infos.get(op) or _info(op)
    ops = _Operands(info)
    cpu = ops.cpu
    cargs = [cpu(a) for a in args]
    ckwargs = {k: cpu(v) for k, v in kwargs.items()} if kwargs else {}
    device = ops.device if ops.device is not None else _shim.current_device()
    dev_in = ops.dev_in
    if ops.cpu_large and dev_in and not info.memory:
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                           f"devices, cpu and rbln:{device}! (when running {info.name}; move the "
                           "CPU tensor with .to('rbln'))")

    on_device = info.cls is not None
    reason = ""
    if not info.memory and on_device:
        bad = kernels.dtype_supported([d for _, d in dev_in])
        if bad is not None:
            on_device, reason = False, f"dtype {bad} is not a device dtype"
    elif not info.memory:
        reason = "no device kernel for this op"
    quiet = getattr(_quiet, "depth", 0) > 0
    if not info.memory and not on_device and not quiet:
        _fallback_allowed(info, reason)

    out = op(*cargs, **ckwargs)

    if info.view:
        result = _wrap_views(out, ops.storages, device)
    else:
        result = _wrap_results(info, out, args, kwargs, cargs, ckwargs, device)
    if not info.memory and not quiet:
        _account(info, on_device, reason, dev_in, out, device)
    return result


def _wrap_views(out, in_storages, device):
    if isinstance(out, torch.Tensor):
        base = in_storages.get(out.untyped_storage().data_ptr())
        if base is None:  # the op copied after all (e.g. reshape of a non-viewable layout)
            return _shim.adopt(out, device)
        view = torch.as_strided(base, out.size(), out.stride(), out.storage_offset())
        if out.is_conj() != view.is_conj():
            view._set_conj(out.is_conj())
        if out.is_neg() != view.is_neg():
            view._set_neg(out.is_neg())
        return view
    if isinstance(out, (list, tuple)):
        return type(out)(_wrap_views(o, in_storages, device) for o in out)
    return out


def _wrap_results(info, out, args, kwargs, cargs, ckwargs, device):
    if info.write_args:
        for name, i in info.write_args:
            dev_t = _arg(args, kwargs, name, i)
            cpu_t = _arg(cargs, ckwargs, name, i)
            if isinstance(dev_t, torch.Tensor) and dev_t.device.type == "rbln":
                _sync_written(dev_t, cpu_t)
            elif isinstance(dev_t, (list, tuple)):
                for d, c in zip(dev_t, cpu_t):
                    if isinstance(d, torch.Tensor) and d.device.type == "rbln":
                        _sync_written(d, c)
    if not info.write_returns:
        return _adopt(out, device)
    if len(info.write_returns) == 1:
        pos = info.write_returns[0]
        return _arg(args, kwargs, *pos) if pos is not None else _adopt(out, device)
    return tuple(_arg(args, kwargs, *pos) if pos is not None else _adopt(o, device)
                 for pos, o in zip(info.write_returns, out))


def _sync_written(dev_t: torch.Tensor, cpu_t: torch.Tensor) -> None:
    """After an in-place/out= op wrote through a CPU alias: round, and follow a resize."""
    moved = cpu_t.untyped_storage().data_ptr() != dev_t.untyped_storage().data_ptr()
    if cpu_t.shape != dev_t.shape or (cpu_t.numel() and moved):
        dev_t.resize_(cpu_t.shape)
        _shim.as_cpu(dev_t).copy_(cpu_t)
        cpu_t = _shim.as_cpu(dev_t)
    _round_f32(cpu_t)


def _adopt(out, device):
    if isinstance(out, torch.Tensor):
        if out.device.type != "cpu" or out.layout != torch.strided:
            return out
        return _shim.adopt(_round_f32(out), device)
    if isinstance(out, (list, tuple)):
        return type(out)(_adopt(o, device) for o in out)
    return out


def _account(info, on_device, reason, dev_in, out, device) -> None:
    rec = stats.current()
    if isinstance(out, torch.Tensor):
        outs = ((out.shape, out.dtype),)
    else:
        outs = tuple((o.shape, o.dtype) for o in (out if isinstance(out, (list, tuple)) else (out,))
                     if isinstance(o, torch.Tensor))
    session = profiler.active()
    if on_device:
        key = (info.name, tuple(dev_in), outs)
        k = _kernel_cache.get(key)
        if k is None:
            k = kernels.build_kernel(info.name, info.cls, tuple(dev_in), outs)
            _kernel_cache[key] = k
            rec.kernel_compiles[info.name] += 1
        rec.device_ops[info.name] += 1
        rec.device_time_s += k.device_s
        if session is not None:
            session.eager_op(info.name.split(".")[1], device, k.launch_s, k.device_s,
                             {"op": info.name, "kind": k.kind})
    else:
        rec.fallbacks[info.name] += 1
        rec.fallback_reasons.setdefault(info.name, reason)
        in_bytes = sum(kernels._device_bytes(s, d) for s, d in dev_in)
        out_bytes = sum(kernels._device_bytes(s, d) for s, d in outs)
        if dev_in:
            stats.add_copy(False, in_bytes)
        if outs:
            stats.add_copy(True, out_bytes)
        if session is not None:
            if dev_in:
                session.copy(device, False, in_bytes, kernels.copy_s(in_bytes, False))
            session.fallback(info.name.split(".")[1], kernels.host_op_s(dev_in, outs),
                             {"op": info.name, "reason": reason})
            if outs:
                session.copy(device, True, out_bytes, kernels.copy_s(out_bytes, True))


# --- copies between host and device -------------------------------------------------------------

def _copy_from(self, dst, non_blocking=False):
    """self -> dst where at least one is on the rbln device (memcpy: device memory is host memory)."""
    src_dev = self.device.type == "rbln"
    dst_dev = dst.device.type == "rbln"
    src = _shim.as_cpu(self) if src_dev else self
    target = _shim.as_cpu(dst) if dst_dev else dst
    target.copy_(src)
    if dst_dev:
        _round_f32(target)
    if src_dev != dst_dev or (src_dev and self.device.index != dst.device.index):
        nbytes = dst.numel() * dst.element_size()
        to_device = dst_dev
        # The host side decides the HDMA path: a pinned source, or a pinned destination given
        # to copy_ (the eager form of `out=`), is read/written by DMA directly; else staged.
        host = self if to_device else dst
        pinned = host.device.type == "cpu" and is_pinned(host)
        stats.add_copy(to_device, nbytes)
        session = profiler.active()
        if session is not None:
            session.copy(dst.device.index if dst_dev else self.device.index, to_device, nbytes,
                         kernels.copy_s(nbytes, to_device, pinned), pinned)
    return dst


def _copy_from_and_resize(self, dst):
    dst.resize_(self.shape)
    return _copy_from(self, dst)


def _patch_printing() -> None:
    """Printing an rbln tensor formats it with float64 and masking ops; that is host-side work."""
    import torch._tensor_str as ts
    original = ts._str

    def _str(self, *, tensor_contents=None):
        if self.device.type == "rbln":
            with host_side():
                return original(self, tensor_contents=tensor_contents)
        return original(self, tensor_contents=tensor_contents)

    ts._str = _str


# Hot ops get a PrivateUse1 kernel of their own (the same `run`): reaching Python through the boxed
# fallback costs ~3.5 us more per call, and structured ops (add, mul, mm...) would otherwise get
# there through ATen's CompositeExplicitAutogradNonFunctional wrapper, which allocates the output
# (empty_strided) and runs the out= overload through the fallback. Ops with a
# CompositeImplicitAutograd kernel (linear, matmul) never reach a backend kernel: never list them.
_DIRECT = ("add.Tensor", "add_.Tensor", "sub.Tensor", "sub_.Tensor", "mul.Tensor", "mul_.Tensor",
           "div.Tensor", "div_.Tensor", "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "exp",
           "neg", "sqrt", "rsqrt", "pow.Tensor_Scalar", "sum", "sum.dim_IntList",
           "mean.dim", "mm", "addmm", "bmm", "_softmax", "_log_softmax", "where.self",
           "threshold_backward", "fill_.Scalar", "zero_", "addcmul_", "addcdiv_", "lerp_.Scalar")


def register(shim) -> None:
    global _shim, _lib_fallback, _lib_impl
    if _lib_fallback is not None:
        return
    _shim = shim
    _lib_impl = torch.library.Library("aten", "IMPL")
    _lib_impl.impl("_copy_from", _copy_from, "PrivateUse1")
    _lib_impl.impl("_copy_from_and_resize", _copy_from_and_resize, "PrivateUse1")
    # convolution's composite path ends in convolution_overrideable for unknown backends: send
    # it (and its backward) to the generic kernel instead, as the CPU runs it.
    for name in ("convolution", "convolution_backward"):
        op = getattr(torch.ops.aten, name).default
        _lib_impl.impl(name, (lambda op: lambda *a, **k: run(op, *a, **k))(op), "PrivateUse1")
    # A lazily conjugated/negated source would otherwise be materialized by clone(), which copies
    # with _copy_from again, forever: let it through, as_cpu keeps the bits and CPU copy_ applies them.
    for key in ("Conjugate", "Negative"):
        _lib_impl.impl("_copy_from", torch.library.fallthrough_kernel, key)
        _lib_impl.impl("_copy_from_and_resize", torch.library.fallthrough_kernel, key)
    for name in _DIRECT:
        base, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.aten, base), overload or "default")
        _lib_impl.impl(name, functools.partial(run, op), "PrivateUse1")
    _lib_fallback = torch.library.Library("_", "IMPL")
    _lib_fallback.fallback(run, "PrivateUse1")
    _patch_printing()


def reset_logged() -> None:
    """Log each fallback op again (tests)."""
    _fallback_logged.clear()
