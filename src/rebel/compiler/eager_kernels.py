"""Graph ops that eager PyTorch on a GPU runs as several kernels (besides attention, see
`eager_attention`): the timing model launches each (plan parts), the op still runs as one
functional kernel.

- Convolution on NCHW half tensors (`conv_layout_transposes`): cuDNN's tensor-core kernels
  run channels-last, so the input is transposed to NHWC before the convolution and the result
  back after it (NVIDIA, "Convolutional Layers User's Guide", Tensor Layouts in Memory), each
  transpose its own kernel; with `conv_filter_transposes` the filter is transposed (KCRS to
  KRSC) on every call too, cuDNN keeping no state between calls.
- Eval-mode BatchNorm on half inputs with half weights (`batch_norm_native_eval`): PyTorch
  uses cuDNN's batch norm only for half inputs with FP32 weights
  (`_select_batch_norm_backend`, aten/src/ATen/native/Normalization.cpp); otherwise
  `batch_norm_cuda_out` (aten/src/ATen/native/cuda/Normalization.cu) in eval launches three
  kernels: a copy of the running mean, `batch_norm_calc_invstd` from the running variance,
  and `batch_norm_elementwise`, a streaming element-wise kernel (not a reduction).

- Views (`eager_views`): `permute` and `transpose` return strided views, and `F.dropout` in
  eval returns its input (`_dropout_impl`: `if (p == 0 || !train ...) return input`,
  aten/src/ATen/native/Dropout.cpp); the graph has them as copies (a permute, a `clone` made
  by dropout), but eager launches no kernel for them: their readers read the strided source.

Intermediates (the transposed tensors) stay in the shared SRAM while they fit its resident
share, else they go through DRAM, as for every other tensor.
"""
from __future__ import annotations

from ..device.timing import KernelPart, KernelPlan, Transfer
from ..ir import Op, TensorSpec

BATCH_NORM_EVAL = "aten._native_batch_norm_legit_no_training.default"
CONVOLUTION = "aten.convolution.default"


def _resident_bytes(spec) -> int:
    m = spec.die.memory
    if m.shared_sram_is_cache and m.replay_resident_fraction:
        return m.replay_resident_bytes
    return m.shared_sram_bytes // 2


def _split(tag: str, transfers, resident: int):
    """(moved by DMA, bytes through the shared SRAM) for a part's operands: graph values keep
    the scheduler's placement (given as transfers or not at all); intermediates (named
    tag.label) move by DMA only when too big to stay resident."""
    moved = tuple(t for t in transfers if t is not None and
                  (not t.value.startswith(tag + ".") or t.nbytes > resident))
    cached = sum(t.nbytes for t in transfers if t is not None and t not in moved)
    return moved, float(cached)


def conv_parts(op: Op, plan: KernelPlan, values: dict[str, TensorSpec], spec, dtype: str,
               elem: int) -> tuple[KernelPart, ...]:
    """Transpose in (input, and the filter when `conv_filter_transposes`), the convolution
    itself (the scheduler's `plan` with the transposed operands), transpose out."""
    c = spec.die.compute
    x, w = op.args[0].name, op.args[1].name
    resident = _resident_bytes(spec)
    loaded = {t.value: t for t in plan.dma_in}
    tag = op.name
    x_bytes = values[x].numel * elem
    w_bytes = values[w].numel * elem
    out_bytes = values[op.name].numel * elem if op.name in values else plan.bytes_out
    stored = {t.value: t for t in plan.dma_out}
    x_t = Transfer(f"{tag}.input_nhwc", x_bytes)
    w_t = Transfer(f"{tag}.filter_krsc", w_bytes)
    y_t = Transfer(f"{tag}.output_nhwc", out_bytes)
    parts = []

    def transpose(label, src, dst, nbytes_src_if_cached):
        moved, cached = _split(tag, [src, dst], resident)
        if src is None:  # a graph value the scheduler keeps in the shared SRAM
            cached += nbytes_src_if_cached
        moved_in = tuple(t for t in moved if t is src)
        moved_out = tuple(t for t in moved if t is dst)
        parts.append(KernelPart(label, "data", dtype, KernelPlan(
            sram_bytes=cached, dma_in=moved_in, dma_out=moved_out)))

    transpose("nchw_to_nhwc", loaded.get(x), x_t, x_bytes)
    filt = loaded.get(w)
    if c.conv_filter_transposes:
        transpose("filter_to_krsc", filt, w_t, w_bytes)
        filt = w_t
    ins = [x_t, filt] + [t for t in plan.dma_in if t.value not in (x, w)]
    moved, cached = _split(tag, ins + [y_t], resident)
    parts.append(KernelPart("conv", "gemm", dtype, KernelPlan(
        flops=plan.flops, gemm=plan.gemm, vector_ops=plan.vector_ops,
        sram_bytes=plan.sram_bytes, tiles=plan.tiles,
        dma_in=tuple(t for t in moved if t is not y_t), dma_out=(y_t,) if y_t in moved else ())))
    out = stored.get(op.name) or next(iter(stored.values()), None)
    moved, cached = _split(tag, [y_t, out], resident)
    if out is None:
        cached += out_bytes
    parts.append(KernelPart("nhwc_to_nchw", "data", dtype, KernelPlan(
        sram_bytes=cached, dma_in=tuple(t for t in moved if t is y_t),
        dma_out=tuple(t for t in moved if t is out))))
    return tuple(parts)


VIEW_TARGETS = ("aten.permute.default", "aten.transpose.int", "aten.t.default")


def only_views(ops: list[Op]) -> bool:
    """Whether a kernel of `ops` is what eager runs as views only (no kernel): permutes and
    the clone an eval-mode dropout leaves in the graph (label "dropout"), besides aliases."""
    work = [o for o in ops if o.kind != "alias"]
    return bool(work) and all(o.target in VIEW_TARGETS or
                              (o.target == "aten.clone.default" and o.label == "dropout")
                              for o in work)


def batch_norm_native(op: Op, values: dict[str, TensorSpec]) -> bool:
    """Whether PyTorch runs this eval batch norm with its native kernels (not cuDNN's):
    bfloat16 anywhere, or half input without FP32 weights."""
    x = values.get(op.args[0].name)
    weight = op.args[1]
    w = values.get(weight.name) if hasattr(weight, "name") else None
    if x is None:
        return False
    if x.dtype == "bfloat16" or (w is not None and w.dtype == "bfloat16"):
        return True
    return x.dtype == "float16" and (w is None or w.dtype != "float32")


def batch_norm_parts(op: Op, plan: KernelPlan, values: dict[str, TensorSpec],
                     dtype: str) -> tuple[KernelPart, ...]:
    """copy_(running_mean), calc_invstd(running_var), then the element-wise normalisation (the
    scheduler's `plan`, timed as a streaming kernel)."""
    channels = values[op.args[0].name].shape[1] if len(values[op.args[0].name].shape) > 1 else 1
    stats = channels * 4  # FP32 statistics (the accumulate type)
    tag = op.name
    mean_in, mean = Transfer(f"{tag}.running_mean", stats), Transfer(f"{tag}.save_mean", stats)
    var_in, invstd = Transfer(f"{tag}.running_var", stats), Transfer(f"{tag}.save_invstd", stats)
    return (
        KernelPart("copy_running_mean", "elementwise", dtype, KernelPlan(
            vector_ops=float(channels), dma_in=(mean_in,), dma_out=(mean,))),
        KernelPart("calc_invstd", "elementwise", dtype, KernelPlan(
            vector_ops=float(channels), dma_in=(var_in,), dma_out=(invstd,))),
        KernelPart("elementwise", "elementwise", dtype, plan),
    )

