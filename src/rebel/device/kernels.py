"""Functional kernels: compute what the chip computes, with torch on the CPU.

Device tensors are held as FP32 tensors whose values are exactly representable in the device's
16-bit dtype. A kernel runs its ops in FP32 and rounds only its outputs, as a fused kernel on the
chip rounds once when it writes its result. Host fallbacks run the graph's own dtypes (FP32).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir import GETITEM, Op, substitute, to_torch_dtype
from .ops import INPLACE_RESULTS, device_fn
from .rounding import rounded as round_to_device


def to_device_storage(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor as the device holds it (after the input cast, if it is a float)."""
    return round_to_device(t, dtype) if t.is_floating_point() else t


@dataclass(frozen=True)
class BoundOp:
    """An op with its target resolved once, so each run only substitutes arguments."""

    name: str
    fn: object
    args: tuple
    kwargs: dict

    @staticmethod
    def bind(op: Op) -> BoundOp:
        fn = device_fn(op.target)
        return BoundOp(op.name, fn, op.args, op.kwargs)

    def __call__(self, env: dict):
        env[self.name] = self.fn(*substitute(self.args, env), **substitute(self.kwargs, env))


_VIEWS = ("aten.view.default", "aten._unsafe_view.default", "aten.squeeze.dim",
          "aten.unsqueeze.default")


class FunctionalKernel:
    """One device kernel: run the ops in FP32, round the outputs to the device dtype."""

    def __init__(self, ops: list[Op], outputs: list[str], dtype: str):
        self.ops = [BoundOp.bind(op) for op in ops]
        # Buffers a device op updated in place (KV caches) hold device values already: rounding
        # them again would copy whole caches every run.
        in_place = {(op.name, i) for op in ops for i in INPLACE_RESULTS.get(op.target, ())}
        kept: set[str] = set()
        for op in ops:  # the updated caches and reshaped views of them
            if (op.target == GETITEM and (op.refs[0], op.args[1]) in in_place) or (
                    op.target in _VIEWS and op.refs and op.refs[0] in kept):
                kept.add(op.name)
        self.rounded = [name for name in outputs if name not in kept]
        self.dtype = to_torch_dtype(dtype)

    def __call__(self, env: dict) -> None:
        for op in self.ops:
            op(env)
        for name in self.rounded:
            env[name] = round_to_device(env[name], self.dtype)


def run_host_ops(ops: list[BoundOp], env: dict) -> None:
    for op in ops:
        op(env)
