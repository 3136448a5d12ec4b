"""Kernel tails in one native pass (csrc/epilogues.c): a linear's bias, GELU, a layer norm after
a residual add, an inference batch norm and its ReLU, each optionally with the kernel's 16-bit
rounding.

These are the device's GELU, layer norm and batch norm for both executors (`ops.FASTER_IMPLS`): the
interpreter runs them op by op and rounds at the kernel's end, the generated executor runs a
kernel's tail as one call that also rounds (`tail_fusion`), and the two agree bit for bit because
both run the same C code per element and per row. Their FP32 results are not ATen's: GELU comes
from an erfc accurate to ~1e-7 relative everywhere (ATen's `1 + erf` loses the negative tail:
rounded to FP16, 161 of 2^20 normal samples differ from the exact value here against ATen's
80628), and a norm's moments are summed in another order (a few float32 ulps). Anything the C
code does not take (other dtypes, strides or shapes, no AVX-512, `approximate="tanh"`) runs
through ATen and the rounder, in both executors alike.
"""
from __future__ import annotations

import torch

from . import rounding

_MODE = {None: 0, torch.float16: 1, torch.bfloat16: 2}
_GELU = 1
_f32 = torch.float32
_lib = None
_looked = False


def _native():
    global _lib, _looked
    if not _looked:
        lib = rounding.native()
        _lib = lib if lib is not None and lib.rbln_has_epilogues() else None
        _looked = True
    return _lib


def available() -> bool:
    """Whether the native tails run on this machine (AVX-512)."""
    return _native() is not None


def _plain(*tensors) -> bool:
    """Contiguous float32 CPU tensors outside autograd (None passes): what the C code reads. A
    loop, not all() over a generator: a transformer block asks this a dozen times a run."""
    for t in tensors:
        if t is not None and (t.dtype is not _f32 or not t.is_cpu or not t.is_contiguous() or t.requires_grad):
            return False
    return True


def _ptr(t):
    return None if t is None else t.data_ptr()


def tail(y: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False,
         dtype: torch.dtype | None = None) -> torch.Tensor:
    """y (a linear's fresh [..., N] output) with bias added, then GELU, then rounded to dtype,
    in place; returns y. Any two of the three may be off (callers skip the call for none)."""
    lib = _native()
    n = y.shape[-1] if y.dim() else 1
    if lib is not None and _plain(y, bias) and (bias is None or bias.shape == (n,)) and dtype in _MODE:
        lib.rbln_bias_act(y.data_ptr(), _ptr(bias), y.data_ptr(), y.numel() // max(n, 1), n,
                          _GELU if gelu else 0, _MODE[dtype])
        return y
    if bias is not None:
        y.add_(bias)
    if gelu:
        y = gelu_(y)
    if dtype is not None and not rounding.round_(y, dtype):
        y = rounding.rounded(y, dtype)
    return y


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """`aten.gelu`: the native GELU where it applies, else ATen's."""
    lib = _native()
    if lib is not None and approximate == "none" and _plain(x):
        y = torch.empty_like(x)
        lib.rbln_bias_act(x.data_ptr(), None, y.data_ptr(), 1, x.numel(), _GELU, 0)
        return y
    return torch.ops.aten.gelu.default(x, approximate=approximate)


def gelu_(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """`aten.gelu_`: `gelu` written over x."""
    lib = _native()
    if lib is not None and approximate == "none" and _plain(x):
        lib.rbln_bias_act(x.data_ptr(), None, x.data_ptr(), 1, x.numel(), _GELU, 0)
        return x
    return torch.ops.aten.gelu_.default(x, approximate=approximate)


def _norm_fits(x, normalized_shape, weight, bias) -> bool:
    n = x.shape[-1] if x.dim() else 0
    return _native() is not None and len(normalized_shape) == 1 and normalized_shape[0] == n and n > 0 \
        and _plain(x, weight, bias) and all(t is None or t.shape == (n,) for t in (weight, bias))


def native_layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None,
                      bias: torch.Tensor | None, eps: float):
    """`aten.native_layer_norm` (y, mean, rstd) over the last dimension in native code, else ATen's."""
    if not _norm_fits(x, normalized_shape, weight, bias):
        return torch.ops.aten.native_layer_norm.default(x, normalized_shape, weight, bias, eps)
    n = x.shape[-1]
    y = torch.empty_like(x)
    stats = x.shape[:-1] + (1,)
    mean, rstd = torch.empty(stats), torch.empty(stats)
    _lib.rbln_layer_norm(x.data_ptr(), None, _ptr(weight), _ptr(bias), y.data_ptr(), mean.data_ptr(),
                         rstd.data_ptr(), x.numel() // n, n, eps, 0)
    return y, mean, rstd


def layer_norm_rounded(x: torch.Tensor, residual: torch.Tensor | None, normalized_shape,
                       weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                       dtype: torch.dtype) -> torch.Tensor:
    """The normalized (x + residual) rounded to dtype: `native_layer_norm(x + residual)[0]` then
    the kernel's rounding, in one pass where the C code takes it (same values either way)."""
    if dtype is None or dtype not in _MODE or not _norm_fits(x, normalized_shape, weight, bias) or \
            (residual is not None and (residual.shape != x.shape or not _plain(residual))):
        if residual is not None:
            x = torch.ops.aten.add.Tensor(x, residual)
        y = native_layer_norm(x, normalized_shape, weight, bias, eps)[0]
        return y if rounding.round_(y, dtype) else rounding.rounded(y, dtype)
    n = x.shape[-1]
    y = torch.empty_like(x)
    _lib.rbln_layer_norm(x.data_ptr(), _ptr(residual), _ptr(weight), _ptr(bias), y.data_ptr(), None, None,
                         x.numel() // n, n, eps, _MODE[dtype])
    return y


def _batch_norm_fits(x, weight, bias, mean, var) -> bool:
    if _native() is None or x.dim() < 2 or not _plain(x, weight, bias, mean, var):
        return False
    c = x.shape[1]
    return all(t is None or t.shape == (c,) for t in (weight, bias)) and mean is not None and \
        var is not None and mean.shape == var.shape == (c,)


def _batch_norm(x, weight, bias, mean, var, eps, relu, in_dtype, out_dtype) -> torch.Tensor:
    n, c = x.shape[:2]
    y = torch.empty_like(x)
    _lib.rbln_batch_norm(x.data_ptr(), y.data_ptr(), _ptr(weight), _ptr(bias), mean.data_ptr(), var.data_ptr(),
                         n, c, x.numel() // max(n * c, 1), eps, int(relu), _MODE[in_dtype], _MODE[out_dtype])
    return y


def batch_norm(x: torch.Tensor, weight, bias, running_mean, running_var, momentum: float, eps: float):
    """`aten._native_batch_norm_legit_no_training` (y and two empty statistics, as ATen's) in
    native code where it applies (contiguous [N, C, ...] float32), else ATen's."""
    if not _batch_norm_fits(x, weight, bias, running_mean, running_var):
        return torch.ops.aten._native_batch_norm_legit_no_training.default(
            x, weight, bias, running_mean, running_var, momentum, eps)
    y = _batch_norm(x, weight, bias, running_mean, running_var, eps, False, None, None)
    return y, x.new_empty(0), x.new_empty(0)


def batch_norm_rounded(x: torch.Tensor, weight, bias, running_mean, running_var, eps: float, relu: bool,
                       round_input: bool, dtype: torch.dtype) -> torch.Tensor:
    """`batch_norm(x)[0]`, then ATen's ReLU when asked, rounded to dtype; round_input first rounds
    x (the rounding of the kernel that computed it, taken over when nothing else reads it). One
    pass where the C code takes it, the same values either way."""
    if dtype in _MODE and dtype is not None and _batch_norm_fits(x, weight, bias, running_mean, running_var):
        return _batch_norm(x, weight, bias, running_mean, running_var, eps, relu,
                           dtype if round_input else None, dtype)
    if round_input:
        x = rounding.rounded(x, dtype)
    y = batch_norm(x, weight, bias, running_mean, running_var, 0.0, eps)[0]
    if relu:
        y = torch.relu(y)
    return y if rounding.round_(y, dtype) else rounding.rounded(y, dtype)
