"""Which ATen ops the device accelerates, in one table, and how each is costed.

Every op the device runs has a class that picks its timing rule and its role in fusion:
  gemm, conv      matrix units; may take an element-wise epilogue
  attention       fused (flash-style) scaled-dot-product attention on the matrix units
  elementwise     vector units, `cost` vector operations per output element
  reduction, norm, softmax, pool
                  vector units, `cost` operations per input element
  gather          table lookups (embedding, index_select): bound by bytes moved
  data            layout changes and tensor creation in SRAM (permute, cat, pad, full)
  alias           metadata only (view, unsqueeze, slice): free, fused into any kernel
  collective      all-reduce / all-gather over the chip-to-chip link (tensor parallelism)
An op that is not here runs on the host (FP32, with host <-> device copies around it).
This table is the one place the device's op coverage is written down: the partitioner, the
scheduler's cost rules, `rebel.explain` and docs/supported_ops.md all read it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..device.vendor_ops import ATTENTION_TARGETS
from ..errors import RBLNError
from ..ir import resolve_target


@dataclass(frozen=True)
class OpClass:
    kind: str
    cost: float = 1.0  # vector operations per element (elementwise, reduction, norm, softmax)


def _table() -> dict[str, OpClass]:
    t: dict[str, OpClass] = {}

    def add(kind: str, names: str, cost: float = 1.0) -> None:
        for name in names.split():
            t[name if "." in name else f"{name}.default"] = OpClass(kind, cost)

    # Matrix units. nn.Linear stays one `linear` op (capture keeps it whole, weight [out, in] as
    # stored); F.scaled_dot_product_attention
    # (causal, masked, GQA) stays one op, a flash-style kernel (were it decomposed, it would be
    # bmm -> softmax -> bmm, all listed here too); conv1d/2d/3d and transposed convs are one
    # `convolution` op costed as an implicit GEMM.
    add("gemm", "linear mm addmm bmm baddbmm")
    add("attention", "scaled_dot_product_attention")  # kept whole by capture (KEEP_WHOLE)
    add("conv", "convolution")
    add("elementwise", """add.Tensor add.Scalar sub.Tensor sub.Scalar rsub.Scalar rsub.Tensor
        mul.Tensor mul.Scalar div.Tensor div.Scalar div.Tensor_mode div.Scalar_mode neg abs relu
        maximum minimum clamp clamp.Tensor clamp_min clamp_max where.self where.ScalarSelf
        where.ScalarOther where.Scalar eq.Tensor eq.Scalar ne.Tensor ne.Scalar gt.Tensor gt.Scalar
        lt.Tensor lt.Scalar ge.Tensor ge.Scalar le.Tensor le.Scalar logical_and logical_or
        logical_not logical_xor bitwise_and.Tensor bitwise_and.Scalar bitwise_or.Tensor
        bitwise_or.Scalar bitwise_xor.Tensor bitwise_not _to_copy copy hardtanh leaky_relu
        masked_fill.Scalar masked_fill.Tensor remainder.Scalar remainder.Tensor sign floor ceil
        round trunc fmod.Scalar fmod.Tensor isnan isinf fill.Scalar lerp.Scalar lerp.Tensor
        addcmul tril triu threshold nan_to_num""")
    add("elementwise", """reciprocal sqrt rsqrt square pow.Tensor_Scalar pow.Tensor_Tensor
        pow.Scalar addcdiv""", 2.0)
    add("elementwise", "exp exp2 expm1 log log2 log10 log1p sigmoid silu hardsigmoid hardswish",
        4.0)
    add("elementwise", "tanh erf sin cos tan elu softplus mish sinh cosh", 6.0)
    add("elementwise", "gelu", 8.0)
    add("reduction", """sum.dim_IntList sum.default mean.dim mean.default amax amin max.dim min.dim
        max.default min.default argmax argmin any.dim any.dims any.default all.dim all.dims
        all.default prod.dim_int prod.default cumsum cumprod logsumexp var.correction
        var_mean.correction std.correction linalg_vector_norm""")
    # top-k along a dim (MoE routing picks 2..8 experts of a few dozen): a selection pass per
    # k on the vector units, costed as four operations per input element
    add("reduction", "topk", 4.0)
    add("norm", """native_layer_norm _native_batch_norm_legit_no_training native_group_norm
        _fused_rms_norm""", 5.0)
    add("softmax", "_softmax _log_softmax _safe_softmax", 5.0)
    add("pool", """max_pool2d_with_indices max_pool3d_with_indices avg_pool1d avg_pool2d
        avg_pool3d _adaptive_avg_pool2d _adaptive_avg_pool3d adaptive_max_pool1d
        adaptive_max_pool2d adaptive_max_pool3d""")
    add("gather", """embedding index_select gather index.Tensor scatter.src scatter.value
        scatter_add scatter_reduce.two index_put index_add index_copy masked_scatter""")
    add("data", """permute clone cat constant_pad_nd full full_like zeros_like ones_like
        empty_like zeros ones empty.memory_format new_zeros new_ones new_full new_empty arange
        arange.start arange.start_step scalar_tensor split_with_sizes split.Tensor unbind.int flip
        roll repeat slice_scatter select_scatter pixel_shuffle pixel_unshuffle reflection_pad1d
        reflection_pad2d replication_pad1d replication_pad2d upsample_nearest1d.vec
        upsample_nearest2d.vec upsample_nearest3d.vec _upsample_nearest_exact2d.vec
        upsample_linear1d.vec upsample_bilinear2d.vec upsample_bicubic2d.vec
        upsample_trilinear3d.vec im2col col2im""")
    add("alias", """view _unsafe_view reshape unsqueeze squeeze squeeze.dim squeeze.dims expand
        slice.Tensor select.int alias t transpose.int detach lift_fresh_copy as_strided diagonal
        unfold narrow""")
    for name in ("all_reduce", "all_gather", "shard"):  # inserted by tensor parallelism
        t[f"rbln.{name}.default"] = OpClass("collective")
    t["rbln.paged_attention.default"] = OpClass("attention")  # rebel.device.ops, KV cache in DRAM
    # rebel.device.quant: a GEMM whose weight operand is int8/int4 bytes plus FP16 scales
    t["rbln.linear_weight_only.default"] = OpClass("gemm")
    # rebel.device.moe: grouped GEMMs over the experts each token is routed to
    t["rbln.moe_gate_up.default"] = OpClass("gemm")
    t["rbln.moe_down.default"] = OpClass("gemm")
    # The vendor's ops (rebel.device.vendor_ops): its paged attention variants are our fused
    # paged-attention kernel; the cache update is a scatter into a DRAM buffer; `.item()` is a
    # scalar the device keeps for the dynamic index that reads it.
    for target in ATTENTION_TARGETS:
        t[target] = OpClass("attention")
    t["rbln_custom_ops.rbln_cache_update.default"] = OpClass("gather")
    t["_local_scalar_dense.default"] = OpClass("data")
    # Qwen3.5's in-chunk recurrence: row i adds a weighted sum of the rows above it, about
    # (chunk length / 2) multiply-adds per element on the vector units.
    t["rbln.tri_recur_update.default"] = OpClass("elementwise", 32.0)
    return t


SUPPORTED: dict[str, OpClass] = _table()
DEVICE_DTYPES = {"float16", "bfloat16", "float32", "int64", "int32", "int16", "int8", "uint8",
                 "bool"}


def classify(target: str) -> OpClass | None:
    """The op's class if the device accelerates it, else None (host fallback)."""
    return SUPPORTED.get(target.removeprefix("aten."))


def has_host_kernel(target: str) -> bool:
    """Whether PyTorch can run the ATen op `target` on the host CPU (the fallback path)."""
    try:
        op = resolve_target(target)
    except RBLNError:
        return False
    keys = ("CPU", "CompositeExplicitAutograd", "CompositeImplicitAutograd",
            "CompositeExplicitAutogradNonFunctional")
    return any(op.has_kernel_for_dispatch_key(k) for k in keys)


def supported_ops() -> list[tuple[str, str]]:
    """(op, class) rows for docs and `rebel.explain`."""
    return sorted((name if name.startswith(("rbln.", "rbln_custom_ops.")) else f"aten.{name}", c.kind)
                  for name, c in SUPPORTED.items())


_KIND_NOTES = {
    "gemm": "matrix units (MAC arrays); element-wise epilogues fuse into the kernel",
    "attention": "matrix units, one flash-style kernel (QK^T and PV GEMMs, softmax on chip)",
    "conv": "matrix units as an implicit GEMM (conv1d/2d/3d, transposed, grouped)",
    "elementwise": "vector units; fuses into the preceding kernel",
    "reduction": "vector units",
    "norm": "vector units",
    "softmax": "vector units",
    "pool": "vector units",
    "gather": "DMA-bound table lookups and scatters",
    "data": "on-chip data movement (layout changes, concatenation, creation, resampling)",
    "alias": "views: metadata only, free",
    "collective": "chip-to-chip link (tensor parallelism)",
}


def markdown() -> str:
    """docs/supported_ops.md: the table above, as the vendor's Supported/Accelerated list."""
    rows: dict[str, list[str]] = {}
    for op, kind in supported_ops():
        rows.setdefault(kind, []).append(op)
    lines = ["# Supported operators", "",
             "Generated from `rebel/compiler/support.py` (`python -m rebel.compiler.support > "
             "docs/supported_ops.md`); a test checks the two agree.", "",
             "Every op below runs on the (virtual) NPU: its functional kernel computes in FP32 and "
             "rounds results to the device's 16-bit dtype, and its class picks the timing rule. "
             "Any other ATen op runs on the host CPU in FP32 (a *host fallback*, with External "
             "HDMA copies around it); `rebel.explain(compiled)` lists each fallback and its reason. "
             "Ops with neither a device kernel nor a host (CPU) kernel are rejected at compile "
             "time with the op and graph node named.", "",
             "Composite PyTorch calls appear as the ATen ops they decompose into: "
             "`F.rms_norm` is `pow`+`mean`+`rsqrt`+`mul`, `torch.stack` is "
             "`unsqueeze`+`cat`, `F.interpolate` is `upsample_*`, dropout in eval mode disappears. "
             "`F.scaled_dot_product_attention` (causal, masked, GQA) and `nn.Linear` (`aten.linear`, "
             "its weight read as stored) stay one op each.", "",
             "| class | where / cost rule | ops |", "| --- | --- | --- |"]
    for kind in sorted(rows, key=lambda k: list(_KIND_NOTES).index(k) if k in _KIND_NOTES else 99):
        ops = " ".join(f"`{o}`" for o in rows[kind])
        lines.append(f"| {kind} | {_KIND_NOTES.get(kind, '')} | {ops} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
