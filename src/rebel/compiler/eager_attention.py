"""The kernels eager PyTorch launches for an attention its fused kernels refuse.

`F.scaled_dot_product_attention` on CUDA picks flash, memory-efficient or cuDNN attention when
their checks pass (PyTorch 2.11 `aten/src/ATen/native/transformers/cuda/sdp_utils.cpp`); one
check every fused kernel shares is that an attention mask has unit stride along the keys
(`check_last_dim_stride_equals_1_dense` in `sdp_utils_cpp.h`: off the CPU,
`attn_mask.stride(-1) == 1`). A mask made by broadcasting
a per-query column, e.g. the `[1, 1, S, 1]` validity mask transformers 5 builds when it cannot
skip the mask (it treats a CUDA-graph capture as tracing) expanded to `[B, 1, S, S]`, has stride
0 there, so SDPA falls back to `_scaled_dot_product_attention_math`
(`aten/src/ATen/native/transformers/attention.cpp`), a composite of ordinary ops, each its own
kernel. Read from that source (not copied), for half-precision inputs with the default
`allow_fp16_bf16_reduction_math_sdp(False)`:

1. q, k, v each cast to FP32 (`.to(kFloat)`; three kernels);
2. q and k^T each multiplied by sqrt(scale) (two kernels);
3. a boolean mask converted to an additive one: `zeros_like` (FP32, materialised: the mask is
   not dense), `logical_not`, `masked_fill_` (three kernels);
4. under GQA, k and v repeated to the query heads (`repeat_interleave`; two kernels);
5. `at::matmul` folds the batch dims with `reshape`, which copies a transposed view (q, k^T,
   v as `[B, S, H, D].transpose(1, 2)`) when batch and heads cannot merge (B > 1 and H > 1;
   one copy each), then one FP32 batched GEMM: CUDA cores, TF32 being off;
6. `attn.add_(mask)`, broadcasting the mask over the heads (one kernel);
7. `_safe_softmax`: softmax (the block-per-row kernel of `row_kernels`), then `eq(-inf)`,
   `all(dim=-1)`, two `scalar_tensor` fills and `where` (six kernels);
8. the FP32 GEMM with v, and the cast of the result back to the input dtype.

Every intermediate is written to device memory and read back by the next kernel.
`math_parts` returns these kernels as plan parts; the timing model launches each.
"""
from __future__ import annotations

import math

from ..device.timing import KernelPart, KernelPlan, Transfer
from ..ir import Op, TensorSpec
from . import row_kernels

SDPA = "aten.scaled_dot_product_attention.default"
EXPAND = "aten.expand.default"
PERMUTE = "aten.permute.default"
F32 = 4


def keys_stride_zero(mask: str, producers: dict[str, Op], values: dict[str, TensorSpec]) -> bool:
    """Whether `mask` is a view broadcast along its last dim (stride 0 there): made by an
    `expand` of a size-1 last dim (through further views that keep the last dim)."""
    seen = 0
    while mask in producers and seen < 16:
        op = producers[mask]
        if op.target == EXPAND and op.refs:
            src = values.get(op.refs[0])
            out = values.get(op.name)
            if src is not None and out is not None and src.shape and out.shape:
                return src.shape[-1] == 1 and out.shape[-1] > 1
            return False
        if op.kind != "alias" or not op.refs or op.target == PERMUTE:
            return False
        mask, seen = op.refs[0], seen + 1
    return False


def _transposed(name: str, producers: dict[str, Op]) -> bool:
    """A permute that moves a dim other than the last two (e.g. [B, S, H, D] -> [B, H, S, D]):
    its batch and head dims cannot merge into one stride."""
    op = producers.get(name)
    if op is None or op.target != PERMUTE:
        return False
    dims = [int(d) % len(op.args[1]) for d in op.args[1]]
    lead = dims[:-2]  # the batch dims: they merge only if they were adjacent and in order
    return bool(lead) and lead != list(range(lead[0], lead[0] + len(lead)))


def falls_back(op: Op, producers: dict[str, Op], values: dict[str, TensorSpec], spec) -> bool:
    """Whether eager SDPA on `spec` runs this attention as the math composite."""
    if op.target != SDPA or not spec.die.compute.attention_mask_unit_stride:
        return False
    mask = op.args[3] if len(op.args) > 3 else op.kwargs.get("attn_mask")
    name = getattr(mask, "name", None)
    return name is not None and keys_stride_zero(name, producers, values)


class _Parts:
    """Collects the composite's kernels. An intermediate small enough to stay in the shared
    SRAM (the L2) while the next kernel reads it (at most half of it) moves at that level's
    bandwidth (`sram_bytes`); a larger one goes through DRAM (Task DMA transfers)."""

    def __init__(self, tag: str, dtype: str, resident_bytes: int):
        self.tag, self.dtype, self.resident_bytes = tag, dtype, resident_bytes
        self.parts: list[KernelPart] = []

    def value(self, label: str, numel: int, nbytes_per: int) -> Transfer:
        return Transfer(f"{self.tag}.{label}", int(numel * nbytes_per))

    def add(self, label: str, kind: str, ins: list, outs: list, dtype: str | None = None,
            **plan) -> None:
        ins, outs = [x for x in ins if x is not None], [x for x in outs if x is not None]
        moved = [x for x in (*ins, *outs) if x.nbytes > self.resident_bytes or not
                 x.value.startswith(self.tag + ".")]
        cached = sum(x.nbytes for x in (*ins, *outs) if x not in moved)
        plan["sram_bytes"] = plan.get("sram_bytes", 0.0) + float(cached)
        self.parts.append(KernelPart(label, kind, dtype or self.dtype, KernelPlan(
            dma_in=tuple(x for x in ins if x in moved), dma_out=tuple(x for x in outs if x in moved),
            **plan)))


def math_parts(op: Op, values: dict[str, TensorSpec], producers: dict[str, Op], spec,
               device_dtype: str, elem: int, tile_gemm, dma_in=(), dma_out=()) -> tuple[KernelPart, ...]:
    """The math composite's kernels for attention `op` (see the module docstring), with their
    memory traffic; `tile_gemm(b, m, n, k)` tiles the two batched GEMMs; dma_in / dma_out: what
    the scheduler moves for the op as a whole (graph values it reads from and leaves in DRAM;
    the others are in the shared SRAM already)."""
    q, k, v = (a.name for a in op.args[:3])
    mask = getattr(op.args[3] if len(op.args) > 3 else op.kwargs.get("attn_mask"), "name", None)
    *batch, heads, sq, d = values[q].shape
    kv_heads, skv = values[k].shape[-3], values[k].shape[-2]
    dv = values[v].shape[-1]
    b = math.prod(batch)
    fp32 = spec.die.compute.math_attention_fp32 and device_dtype in ("float16", "bfloat16")
    acc, acc_dtype = (F32, "float32") if fp32 else (elem, device_dtype)
    p = _Parts(op.name, device_dtype, spec.die.memory.shared_sram_bytes // 2)
    loaded = {x.value: x for x in dma_in}
    stored = {x.value: x for x in dma_out}

    def ew(label, ins, outs, numel, kind="elementwise"):
        p.add(label, kind, ins, outs, vector_ops=float(numel))

    nq, nk, nv = b * heads * sq * d, b * kv_heads * skv * d, b * kv_heads * skv * dv
    # inputs the scheduler keeps in the shared SRAM are read from there (intermediate-named)
    cur = {"q": loaded.get(q) or p.value("q_in", nq, elem),
           "k": loaded.get(k) or p.value("k_in", nk, elem),
           "v": loaded.get(v) or p.value("v_in", nv, elem)}
    if fp32:
        for name, n in (("q", nq), ("k", nk), ("v", nv)):
            up = p.value(f"{name}_f32", n, acc)
            ew(f"{name}_to_f32", [cur[name]], [up], n)
            cur[name] = up
    for name, n in (("q", nq), ("k", nk)):  # sqrt(scale) on each side
        scaled = p.value(f"{name}_scaled", n, acc)
        ew(f"{name}_scale", [cur[name]], [scaled], n)
        cur[name] = scaled
    add_mask, has_mask = None, mask is not None
    if has_mask:
        m = values[mask]
        if m.dtype == "bool":
            zeros, inv = p.value("mask_zeros", m.numel, acc), p.value("mask_not", m.numel, 1)
            add_mask = p.value("mask_add", m.numel, acc)
            ew("mask_zeros_like", [], [zeros], m.numel)
            ew("mask_logical_not", [loaded.get(mask) or p.value("mask_in", m.numel, 1)], [inv],
               m.numel)
            ew("mask_masked_fill", [zeros, inv], [add_mask], m.numel)
        else:
            add_mask = loaded.get(mask) or p.value("mask_in", m.numel, elem)
    if kv_heads != heads:  # GQA: repeat_interleave to the query heads
        for name, n in (("k", nk), ("v", nv)):
            rep = p.value(f"{name}_repeat", n * heads // kv_heads, acc)
            p.add(f"{name}_repeat_interleave", "data", [cur[name]], [rep],
                  sram_bytes=0.0)
            cur[name] = rep
    if b > 1 and heads > 1:  # reshape of a transposed view copies before the batched GEMM
        for i, name in enumerate(("q", "k", "v")):
            if _transposed(op.args[i].name, producers):
                n = (nq if name == "q" else nk * heads // kv_heads if name == "k" else
                     nv * heads // kv_heads)
                flat = p.value(f"{name}_contiguous", n, acc)
                p.add(f"{name}_contiguous", "data", [cur[name]], [flat])
                cur[name] = flat
    bh = b * heads
    scores = p.value("scores", bh * sq * skv, acc)
    p.add("bmm_qk", "gemm", [cur["q"], cur["k"]], [scores], acc_dtype,
          flops=2.0 * bh * sq * skv * d, gemm=tile_gemm(bh, sq, skv, d))
    if has_mask:
        added = p.value("scores_masked", bh * sq * skv, acc)
        ew("add_mask", [scores, add_mask], [added], bh * sq * skv)
        scores = added
    probs = p.value("softmax", bh * sq * skv, acc)
    p.add("softmax", "softmax", [scores], [probs], acc_dtype, vector_ops=float(bh * sq * skv),
          rows=row_kernels.softmax_kernel(bh * sq, skv, spec, acc) if spec.die.compute.row_kernels
          else None)
    # _safe_softmax: rows masked everywhere become zeros instead of NaN
    ew("neg_inf_fill", [], [], 1)
    eq = p.value("eq", bh * sq * skv, 1)
    ew("eq_neg_inf", [scores], [eq], bh * sq * skv)
    allrows = p.value("all", bh * sq, 1)
    ew("all", [eq], [allrows], bh * sq * skv, kind="reduction")
    ew("zero_fill", [], [], 1)
    safe = p.value("safe", bh * sq * skv, acc)
    ew("where", [allrows, probs], [safe], bh * sq * skv)
    result = stored.get(op.name) or p.value("result", bh * sq * dv, elem)
    out = p.value("out", bh * sq * dv, acc) if fp32 else result
    p.add("bmm_pv", "gemm", [safe, cur["v"]], [out], acc_dtype,
          flops=2.0 * bh * sq * skv * dv, gemm=tile_gemm(bh, sq, dv, skv))
    if fp32:
        ew("out_to_half", [out], [result], bh * sq * dv)
    return tuple(p.parts)
