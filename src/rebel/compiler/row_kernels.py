"""Which block-per-row kernel a GPU library runs for a row reduction, and its structure.

On a spec with `block_per_row_kernels` (the H100, running PyTorch eager) softmax and layer/RMS
norm are not streaming kernels: PyTorch launches one thread block per row and picks a kernel
variant by the row's length. The variants differ in how often they read the row and how
many loads a thread keeps in flight, which is what their time follows, so the scheduler
records the variant's structure in the plan (`RowKernel`) and `row_kernel_seconds` times it.

The choices below follow PyTorch 2.11's CUDA sources (read, not copied):
- `aten/src/ATen/native/cuda/SoftMax.cu`, `host_softmax` with the last dim reduced: rows of at
  most 2048 elements and 8 KiB go to the persistent warp softmax (a warp per row, the row in
  registers); longer rows get a block of min(row, 1024) threads (`SoftMaxForward_getBlockSize`)
  and, when a thread's share is under 10 elements (`potential_register_count`),
  `cunn_SoftMaxForwardReg` (the row in registers, all its loads issued at once); else, when
  the row fits the block's shared memory, `cunn_SoftMaxForwardSmem` (one read); else
  `cunn_SoftMaxForward`, which reads the row three times: for the max, for the sum of
  exponentials, and to write. Each block variant does two block-wide reductions.
- `aten/src/ATen/native/cuda/layer_norm_kernel.cu`: layer norm and the fused RMS norm
  (`_fused_rms_norm`, also what `F.rms_norm` runs as one kernel) take
  `vectorized_layer_norm_kernel` when the row is a multiple of 4 elements: a block of 128
  threads (32 x 4) per row, 4-element vector loads in a loop (one load in flight per
  thread), the row read for its statistics, one block reduction, then read again with gamma
  (and beta) to write.

`ops_per_element` counts FP32 lane instructions per element from the same sources, with
CUDA's accurate `expf` and IEEE division at about nine instructions each: softmax about 35
(max, exp and add for the sum, exp and divide to write, casts), layer norm about 12 (Welford
update, normalise, affine, casts), RMS norm about 8.
"""
from __future__ import annotations

import math

from ..device.timing import RowKernel
from ..ir import Op, TensorSpec
from ..npu.spec import ProductSpec

WARP = 32
PERSISTENT_SOFTMAX_MAX = 2048         # elements (and at most 8 KiB) for the warp softmax
PERSISTENT_SOFTMAX_MAX_BYTES = 8192
REGISTER_SOFTMAX_MAX_PER_THREAD = 10  # potential_register_count below this: registers
SOFTMAX_VECTOR_BYTES = 16             # ILP = sizeof(float4) / sizeof(scalar_t)
NORM_THREADS = 128                    # num_threads(): 32 x 4 (also the warp softmax's block)
NORM_VECTOR_ELEMS = 4                 # vec_size in layer_norm_kernel.cu
SOFTMAX_OPS, LAYER_NORM_OPS, RMS_NORM_OPS = 35.0, 12.0, 8.0

# log-softmax runs the same host_softmax kernels with a log epilogue instead of the division
SOFTMAX_TARGETS = ("aten._softmax.default", "aten._safe_softmax.default", "aten._log_softmax.default")
LAYER_NORM = "aten.native_layer_norm.default"
FUSED_RMS_NORM = "aten._fused_rms_norm.default"


def describe(ops: list[Op], values: dict[str, TensorSpec], weight_shapes: list[tuple],
             spec: ProductSpec, elem_bytes: int) -> RowKernel | None:
    """The block-per-row kernel a kernel of `ops` runs as on `spec`, or None (not a row
    reduction the library runs that way, or a spec without such kernels). weight_shapes:
    shapes of the weights the kernel loads (gamma, beta)."""
    c = spec.die.compute
    if not c.row_kernels:
        return None
    targets = {o.target for o in ops}
    for op in ops:
        if op.target in SOFTMAX_TARGETS:
            shape = _shape(op, values)
            dim = int(op.args[1]) % len(shape) if shape else 0
            if not shape or dim != len(shape) - 1:
                return None  # a softmax over an inner dim is a different (spatial) kernel
            return _softmax(math.prod(shape[:-1]), shape[-1], spec, elem_bytes)
        if op.target in (LAYER_NORM, FUSED_RMS_NORM):
            shape = _shape(op, values)
            cols = math.prod(int(s) for s in op.args[1]) if shape else 0
            if not cols:
                return None
            family = "layer_norm" if op.target == LAYER_NORM else "rms_norm"
            return _norm(family, math.prod(shape) // cols, cols, weight_shapes, elem_bytes)
    # F.rms_norm as traced: x * rsqrt(mean(x^2, -1) + eps) * w, one fused reduction kernel
    if "aten.rsqrt.default" in targets and "aten.mean.dim" in targets:
        mean = next(o for o in ops if o.target == "aten.mean.dim")
        shape = _shape(mean, values)
        dims = [int(d) % len(shape) for d in mean.args[1]] if shape else []
        if dims == [len(shape) - 1]:
            return _norm("rms_norm", math.prod(shape[:-1]), shape[-1], weight_shapes, elem_bytes)
    return None


def softmax_kernel(rows: int, cols: int, spec: ProductSpec, elem_bytes: int) -> RowKernel:
    """The softmax kernel PyTorch picks for `rows` rows of `cols` elements of `elem_bytes`."""
    return _softmax(rows, cols, spec, elem_bytes)


def _shape(op: Op, values: dict[str, TensorSpec]) -> tuple:
    src = op.refs[0] if op.refs else None
    return tuple(values[src].shape) if src in values else ()


def _softmax(rows: int, cols: int, spec: ProductSpec, elem: int) -> RowKernel:
    c = spec.die.compute
    if cols <= PERSISTENT_SOFTMAX_MAX and cols * elem <= PERSISTENT_SOFTMAX_MAX_BYTES:
        per_thread = max(1, 2 ** math.ceil(math.log2(max(cols, 1))) // WARP)
        return RowKernel("softmax_warp", rows, cols, elem, WARP, elem, per_thread, 1, 0,
                         ops_per_element=SOFTMAX_OPS, rows_per_block=NORM_THREADS // WARP)
    threads = min(math.ceil(cols / WARP) * WARP, c.max_threads_per_block)
    per_thread = math.ceil(cols / threads)
    if per_thread < REGISTER_SOFTMAX_MAX_PER_THREAD:
        return RowKernel("softmax_registers", rows, cols, elem, threads, elem, per_thread, 1, 2,
                         ops_per_element=SOFTMAX_OPS)
    reduction_bytes = threads // WARP * 4  # one float per warp
    vector = SOFTMAX_VECTOR_BYTES
    if cols * elem < c.shared_mem_per_block_kib * 1024 - reduction_bytes and \
            cols % (vector // elem) == 0:
        return RowKernel("softmax_shared", rows, cols, elem, threads, vector, 1, 1, 2,
                         ops_per_element=SOFTMAX_OPS)
    return RowKernel("softmax_global", rows, cols, elem, threads, vector, 1, 3, 2,
                     ops_per_element=SOFTMAX_OPS)


def _norm(family: str, rows: int, cols: int, weight_shapes: list[tuple], elem: int) -> RowKernel | None:
    if cols % NORM_VECTOR_ELEMS:
        return None  # RowwiseMoments + LayerNormForward: two kernels, not described here
    weight_rows = sum(1 for s in weight_shapes if math.prod(s) == cols)
    ops = LAYER_NORM_OPS if family == "layer_norm" else RMS_NORM_OPS
    return RowKernel(family, rows, cols, elem, NORM_THREADS, NORM_VECTOR_ELEMS * elem, 1, 2, 1,
                     weight_rows, ops)
