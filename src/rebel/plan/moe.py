"""transformers' MoE experts run as the grouped GEMMs of `rebel.device.moe`.

transformers 5 stores a MoE block's experts as stacked 3-D weights (`gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`) and picks the experts' forward through `config._experts_implementation`.
Its eager forward loops over the experts a batch hits (data-dependent control flow: no static
graph), and `batched_mm` gathers one weight copy per (token, expert) pair, which a prefill chunk
pays for T * k times instead of once per expert. `use_grouped_experts` swaps the forward of each
experts module of a model (the instance's, no global registration) for `grouped_experts_forward`,
which calls `rbln::moe_gate_up` and `rbln::moe_down`: one graph node each, timed as a grouped
GEMM that reads each chosen expert once and split over dies by the experts' intermediate dim.
Routing (the router linear, softmax, top-k, renormalisation) stays the model's own code.
"""
from __future__ import annotations

import types

import torch

from ..device import moe  # noqa: F401  (registers torch.ops.rbln.moe_*)
from ..errors import PlanError


def grouped_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts of one MoE block on tokens [T, H] routed to top_k_index [T, k] with
    top_k_weights [T, k]; returns [T, H] (the contract of transformers' experts forward)."""
    inter = self.down_proj.shape[-1]
    weight = self.gate_up_proj
    if getattr(self, "is_concatenated", True):  # [gate; up] along dim 1
        gate, up = weight[:, :inter], weight[:, inter:]
    else:  # interleaved rows: gate0, up0, gate1, up1, ...
        gate, up = weight[:, 0::2], weight[:, 1::2]
    h = torch.ops.rbln.moe_gate_up(hidden_states, top_k_index, gate, up, self._rbln_act)
    return torch.ops.rbln.moe_down(h, top_k_index, top_k_weights.to(h.dtype), self.down_proj)


def _is_experts(module: torch.nn.Module) -> bool:
    w, d = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(w, torch.Tensor) and isinstance(d, torch.Tensor) and w.dim() == 3


def use_grouped_experts(model: torch.nn.Module) -> int:
    """Route every experts module of `model` through the grouped MoE ops; returns how many.
    PlanError for experts this formulation does not cover (biases, transposed storage, no
    gate, an activation the device op lacks)."""
    count = 0
    for name, module in model.named_modules():
        if not _is_experts(module):
            continue
        config = getattr(module, "config", None)
        act = getattr(config, "hidden_act", "silu")
        problems = [what for what, bad in (
            ("expert biases", getattr(module, "has_bias", False)),
            ("transposed expert weights", getattr(module, "is_transposed", False)),
            ("experts without a gate", not getattr(module, "has_gate", True)),
            (f"activation {act!r}", act not in moe.ACTIVATIONS)) if bad]
        if problems:
            raise PlanError(f"{name}: grouped MoE experts do not support {', '.join(problems)}")
        module._rbln_act = act
        module.forward = types.MethodType(grouped_experts_forward, module)
        count += 1
    return count
