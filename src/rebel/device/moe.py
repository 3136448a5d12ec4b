"""Mixture-of-experts FFN as two grouped GEMMs: each token through its top-k experts only.

A MoE block routes every token to k of E experts. Formulated with ATen ops it is either
dense (every expert on every token, E/k times the work) or a gather of each (token, expert)
pair's weights (transformers' `batched_mm`: a 128-token prefill chunk with k = 8 copies 1024
experts' weights, eight times the E = 128 that exist). Neither is what a serving kernel does:
vLLM's fused MoE sorts the pairs by expert and runs one GEMM per expert on its tokens, so each
chosen expert's weights stream from DRAM once. These two ops are that grouped formulation, kept
as single nodes by torch.library so the compiler times them as such (rebel.compiler.schedule:
the weight bytes of min(E, tokens * k) experts, the FLOPs of tokens * k rows):

  moe_gate_up(x [T, H], ids [T, k], gate [E, I, H], up [E, I, H], act) -> h [T, k, I]
      h[t, j] = act(x[t] @ gate[ids[t, j]].T) * (x[t] @ up[ids[t, j]].T)
  moe_down(h [T, k, I], ids [T, k], weights [T, k], down [E, H, I]) -> out [T, H]
      out[t] = sum_j weights[t, j] * (h[t, j] @ down[ids[t, j]].T)

Gate and up are separate operands (a checkpoint's concatenated `gate_up_proj` is sliced, and
constant folding stores the halves), so tensor parallelism splits both along I alike (column
parallel) and `down` along I (row parallel, partial sums): the dense MLP's split, with one
all-reduce of [T, H] after moe_down. Arithmetic in FP32, results in x's dtype (the device rounds
every kernel's output to its 16-bit dtype).
"""
from __future__ import annotations

import torch

GATE_UP = "rbln.moe_gate_up.default"
DOWN = "rbln.moe_down.default"
TARGETS = (GATE_UP, DOWN)

ACTIVATIONS = {"silu": torch.nn.functional.silu, "relu": torch.relu,
               "gelu": torch.nn.functional.gelu,
               "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}


def _check(x: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor, features: int, what: str) -> None:
    if x.dim() < 2 or ids.dim() != 2 or x.shape[0] != ids.shape[0]:
        raise ValueError(f"{what}: tokens [T, ...] and expert ids [T, k] must agree, got "
                         f"{tuple(x.shape)} and {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{what}: expert ids must be integers, got {ids.dtype}")
    if weight.dim() != 3 or weight.shape[2] != features:
        raise ValueError(f"{what}: expert weights must be [E, out, {features}], got "
                         f"{tuple(weight.shape)}")


def _groups(ids: torch.Tensor):
    """(expert, rows of the flattened [T * k] pairs routed to it) for each expert used."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    start = 0
    for e, c in zip(experts.tolist(), counts.tolist()):
        yield e, order[start:start + c]
        start += c


def gate_up_reference(x, ids, gate, up, act: str = "silu") -> torch.Tensor:
    fn = ACTIVATIONS.get(act)
    if fn is None:
        raise ValueError(f"moe_gate_up: activation {act!r} is not one of {sorted(ACTIVATIONS)}")
    _check(x, ids, gate, x.shape[-1], "moe_gate_up")
    if gate.shape != up.shape:
        raise ValueError(f"moe_gate_up: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    t, k = ids.shape
    rows = x.float().repeat_interleave(k, dim=0)                       # [T * k, H]
    out = torch.empty(t * k, gate.shape[1], dtype=torch.float32, device=x.device)
    for e, r in _groups(ids):  # one GEMM per expert on the rows routed to it
        xe = rows[r]
        out[r] = fn(xe @ gate[e].float().t()) * (xe @ up[e].float().t())
    return out.view(t, k, gate.shape[1]).to(x.dtype)


def down_reference(h, ids, weights, down) -> torch.Tensor:
    _check(h, ids, down, h.shape[-1], "moe_down")
    if h.dim() != 3 or tuple(weights.shape) != tuple(ids.shape) or h.shape[1] != ids.shape[1]:
        raise ValueError(f"moe_down: h [T, k, I], ids and weights [T, k] must agree, got "
                         f"{tuple(h.shape)}, {tuple(ids.shape)}, {tuple(weights.shape)}")
    t, k, _ = h.shape
    rows = h.float().reshape(t * k, -1)
    out = torch.zeros(t * k, down.shape[1], dtype=torch.float32, device=h.device)
    for e, r in _groups(ids):
        out[r] = rows[r] @ down[e].float().t()
    out = (out.view(t, k, -1) * weights.float().unsqueeze(-1)).sum(1)
    return out.to(h.dtype)


@torch.library.custom_op("rbln::moe_gate_up", mutates_args=())
def moe_gate_up(x: torch.Tensor, ids: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                act: str = "silu") -> torch.Tensor:
    return gate_up_reference(x, ids, gate, up, act)


@moe_gate_up.register_fake
def _(x, ids, gate, up, act="silu"):
    _check(x, ids, gate, x.shape[-1], "moe_gate_up")
    return x.new_empty((x.shape[0], ids.shape[1], gate.shape[1]))


@torch.library.custom_op("rbln::moe_down", mutates_args=())
def moe_down(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
             down: torch.Tensor) -> torch.Tensor:
    return down_reference(h, ids, weights, down)


@moe_down.register_fake
def _(h, ids, weights, down):
    _check(h, ids, down, h.shape[-1], "moe_down")
    return h.new_empty((h.shape[0], down.shape[1]))


def active_experts(tokens: int, top_k: int, experts: int) -> int:
    """Experts whose weights a grouped MoE reads for `tokens` tokens: every (token, expert)
    pair may name a different expert, and there are only E of them. A bound, not an average:
    routing is known only at run time (uniform routing of T tokens touches
    E * (1 - (1 - k/E)^T) on average, a little fewer at mid-size decode batches)."""
    return max(1, min(experts, tokens * top_k))
