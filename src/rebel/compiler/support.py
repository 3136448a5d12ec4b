"""Which ATen ops the device accelerates, in one table, and how each is costed.

Every op the device runs has a class that picks its timing rule and its role in fusion:
  gemm, conv      matrix units; may take an element-wise epilogue
  elementwise     vector units, `cost` vector operations per output element
  reduction, norm, softmax, pool
                  vector units, `cost` operations per input element
  gather          table lookups (embedding, index_select): bound by bytes moved
  data            layout changes and tensor creation in SRAM (permute, cat, pad, full)
  alias           metadata only (view, unsqueeze, slice): free, fused into any kernel
An op that is not here runs on the host (FP32, with host <-> device copies around it).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OpClass:
    kind: str
    cost: float = 1.0  # vector operations per element (elementwise, reduction, norm, softmax)


def _table() -> dict[str, OpClass]:
    t: dict[str, OpClass] = {}

    def add(kind: str, names: str, cost: float = 1.0) -> None:
        for name in names.split():
            t[name if "." in name else f"{name}.default"] = OpClass(kind, cost)

    add("gemm", "mm addmm bmm baddbmm")
    add("conv", "convolution")
    add("elementwise", """add.Tensor add.Scalar sub.Tensor sub.Scalar rsub.Scalar mul.Tensor
        mul.Scalar div.Tensor div.Scalar div.Tensor_mode neg abs relu maximum minimum
        clamp clamp.Tensor clamp_min clamp_max where.self where.ScalarSelf where.ScalarOther
        eq.Tensor eq.Scalar ne.Tensor ne.Scalar gt.Tensor gt.Scalar lt.Tensor lt.Scalar
        ge.Tensor ge.Scalar le.Tensor le.Scalar logical_and logical_or logical_not logical_xor
        bitwise_and.Tensor bitwise_or.Tensor bitwise_not _to_copy hardtanh leaky_relu
        masked_fill.Scalar masked_fill.Tensor remainder.Scalar remainder.Tensor sign floor ceil
        round trunc fmod.Scalar isnan isinf""")
    add("elementwise", "reciprocal sqrt rsqrt square pow.Tensor_Scalar pow.Tensor_Tensor", 2.0)
    add("elementwise", "exp exp2 expm1 log log2 log1p sigmoid silu hardsigmoid hardswish", 4.0)
    add("elementwise", "tanh erf sin cos elu softplus mish", 6.0)
    add("elementwise", "gelu", 8.0)
    add("reduction", """sum.dim_IntList sum.default mean.dim mean.default amax amin max.dim min.dim
        max.default min.default argmax argmin any.dim any.default all.dim all.default prod.dim_int
        cumsum var.correction var_mean.correction""")
    add("norm", """native_layer_norm _native_batch_norm_legit_no_training native_group_norm""", 5.0)
    add("softmax", "_softmax _log_softmax", 5.0)
    add("pool", """max_pool2d_with_indices max_pool3d_with_indices avg_pool2d avg_pool3d
        _adaptive_avg_pool2d _adaptive_avg_pool3d avg_pool1d adaptive_max_pool2d""")
    add("gather", "embedding index_select gather index.Tensor")
    add("data", """permute clone cat constant_pad_nd full full_like zeros_like ones_like arange
        arange.start arange.start_step scalar_tensor split_with_sizes flip repeat
        upsample_nearest2d.vec upsample_bilinear2d.vec""")
    add("alias", """view _unsafe_view reshape unsqueeze squeeze squeeze.dim squeeze.dims expand
        slice.Tensor select.int alias t transpose.int detach lift_fresh_copy""")
    return t


SUPPORTED: dict[str, OpClass] = _table()
DEVICE_DTYPES = {"float16", "bfloat16", "float32", "int64", "int32", "int16", "int8", "uint8",
                 "bool"}


def classify(target: str) -> OpClass | None:
    """The op's class if the device accelerates it, else None (host fallback)."""
    return SUPPORTED.get(target.removeprefix("aten."))


def supported_ops() -> list[tuple[str, str]]:
    """(op, class) rows for docs and `rebel.explain`."""
    return sorted((f"aten.{name}", c.kind) for name, c in SUPPORTED.items())
