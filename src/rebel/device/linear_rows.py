"""Linear layers over one to eight rows in native code (csrc/linear_rows.c), with the weight
in float32 or in the device's 16-bit storage.

A decode step multiplies a few rows by every weight of the model and waits on reading them:
the kernel reads a 16-bit weight as such, half the bytes of a float32 one (SmolLM2's layers at
4 rows: 28.3 ms through MKL, 12.6 ms here). Every output's sum is formed in one order, whatever
the row count, the thread count or the weight's storage, so a sequence gets the same values in
every decode batch and a runtime reading 16-bit weights (`packed_linear`) matches the
interpreter reading float32 ones bit for bit. The library is rebel's native one, built and loaded
with the rounder (`rounding.native`); without it, or without AVX-512, `linear` returns None and
the caller takes MKL.
"""
from __future__ import annotations

import ctypes

import torch

from . import rounding

_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_f32 = torch.float32
_kernel = None
_max_rows = 0
_looked = False


def _load():
    global _kernel, _max_rows, _looked
    lib = rounding.native()
    if lib is not None and lib.rbln_has_linear_rows():
        _kernel, _max_rows = lib.rbln_linear_rows, lib.rbln_linear_max_rows()
    _looked = True


def available() -> bool:
    """Whether the native kernel runs on this machine."""
    if not _looked:
        _load()
    return _kernel is not None


def max_rows() -> int:
    return _max_rows if available() else 0


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`aten.linear(x, weight, bias)` when x has 1 to `max_rows()` rows of float32 and the weight
    is a contiguous 2-d float32, FP16 or BF16 tensor (all on the CPU, outside autograd), else None."""
    if not _looked:
        _load()
    if _kernel is None or weight.dim() != 2 or x.dtype is not _f32 or x.dim() == 0:
        return None
    n, k = weight.shape
    if x.shape[-1] != k or weight.dtype not in _KIND or not weight.is_contiguous() or \
            not (x.is_cpu and weight.is_cpu) or x.requires_grad or weight.requires_grad:
        return None
    rows = x.numel() // k if k else 0
    if not 1 <= rows <= _max_rows:
        return None
    if bias is not None and (bias.dtype is not _f32 or bias.shape != (n,) or not bias.is_contiguous()
                             or not bias.is_cpu or bias.requires_grad):
        return None
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty(x.shape[:-1] + (n,), dtype=_f32)
    _kernel(x.data_ptr(), weight.data_ptr(), _KIND[weight.dtype],
            None if bias is None else bias.data_ptr(), out.data_ptr(), rows, n, k)
    return out
