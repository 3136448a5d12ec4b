"""Schedule: tile each kernel for the engines' SRAM and decide which tensors Task DMA moves.

Tensors made inside a device segment stay in shared SRAM while they fit and are still needed;
everything else lives in device DRAM and is loaded (Task DMA in) by the kernel that reads it.
Weights always start in DRAM: the runtime placed them there when it was created.
"""
from __future__ import annotations

import math

from ..device.timing import GemmTiling, KernelPlan, Transfer
from ..ir import Op, TensorSpec
from ..npu.spec import ProductSpec
from .program import Kernel
from .support import classify


class Scheduler:
    def __init__(self, spec: ProductSpec, device_dtype: str, values: dict[str, TensorSpec],
                 weights: set[str]):
        self.spec = spec
        self.dtype = device_dtype
        self.values = values
        self.weights = weights
        self.elem = TensorSpec((), device_dtype).nbytes()

    def device_bytes(self, value: str) -> int:
        return self.values[value].nbytes(self.dtype)

    def logical_bytes(self, value: str) -> int:
        return self.values[value].nbytes()

    def plan_segment(self, kernels: list[Kernel], reads: list[list[str]], leaves: set[str],
                     host_copies: set[str]) -> None:
        """Fill in each kernel's plan.

        reads[i]: values kernel i reads that it does not make; leaves: values that must be in
        DRAM after the segment (used by the host, a later segment or the caller); host_copies:
        values that arrived from the host (External HDMA) and still have their host dtype.
        """
        last_use = {v: i for i, names in enumerate(reads) for v in names}
        last_writer = {v: i for i, k in enumerate(kernels) for v in k.outputs}  # cast_out rewrites
        host_copies = set(host_copies)
        capacity = self.spec.die.memory.shared_sram_bytes
        sram: dict[str, int] = {}
        for i, (kernel, names) in enumerate(zip(kernels, reads)):
            dma_in = []
            for v in names:
                if v in sram:
                    continue
                nbytes = self.logical_bytes(v) if v in host_copies else self.device_bytes(v)
                dma_in.append(Transfer(v, nbytes, weight=v in self.weights))
                if v not in self.weights and last_use.get(v, -1) > i:
                    self._keep(sram, v, self.device_bytes(v), capacity)
            dma_out = []
            for v in kernel.outputs:
                host_dtype = kernel.kind == "cast_out"
                nbytes = self.logical_bytes(v) if host_dtype else self.device_bytes(v)
                needed_later = any(v in r for r in reads[i + 1:])
                leaf = v in leaves and last_writer[v] == i
                if leaf or (needed_later and not self._keep(sram, v, nbytes, capacity)):
                    dma_out.append(Transfer(v, nbytes))
            for v in [v for v in sram if last_use.get(v, -1) <= i and v not in leaves]:
                del sram[v]
            kernel.plan = self._compute_plan(kernel, tuple(dma_in), tuple(dma_out))
            if kernel.kind == "cast_in":
                host_copies -= set(kernel.outputs)

    @staticmethod
    def _keep(sram: dict[str, int], value: str, nbytes: int, capacity: int) -> bool:
        if sum(sram.values()) + nbytes > capacity:
            return False
        sram[value] = nbytes
        return True

    def _compute_plan(self, kernel: Kernel, dma_in, dma_out) -> KernelPlan:
        flops, vector_ops, sram_bytes, gemm = 0.0, 0.0, 0.0, None
        if kernel.kind in ("cast_in", "cast_out"):
            vector_ops = sum(self.values[v].numel for v in kernel.outputs)
        for op in kernel.ops:
            kind = op.kind
            out = op.out_specs[0] if op.out_specs else None
            if kind in ("gemm", "conv"):
                b, m, n, k = _gemm_shape(op, self.values)
                flops += 2.0 * b * m * n * k
                gemm = self.tile_gemm(b, m, n, k)
            elif kind == "elementwise" and out is not None:
                vector_ops += out.numel * classify(op.target).cost
            elif kind in ("reduction", "norm", "softmax", "pool"):
                src = self.values.get(op.refs[0]) if op.refs else None
                vector_ops += (src.numel if src else 0) * classify(op.target).cost
            elif kind in ("data", "gather"):
                sram_bytes += sum(s.nbytes(self.dtype) for s in op.out_specs)
        moved = sum(t.nbytes for t in dma_in) + sum(t.nbytes for t in dma_out)
        if gemm is not None:
            tiles = gemm.out_tiles * gemm.k_steps
        else:
            per_pass = self.spec.die.compute.neural_engines * self.spec.die.memory.local_sram_bytes // 2
            tiles = max(1, math.ceil(moved / per_pass))
        return KernelPlan(flops, gemm, vector_ops, sram_bytes, tiles, dma_in, dma_out)

    def tile_gemm(self, b: int, m: int, n: int, k: int) -> GemmTiling:
        """Largest output tile, padded to the MAC array, whose double-buffered operands fit one
        engine's local SRAM; K is split when it does not fit."""
        rows, cols = self.spec.die.compute.mac_array
        budget = self.spec.die.memory.local_sram_bytes // 2  # double buffering
        tm = min(_round_up(m, rows), 4 * rows)
        tn = min(_round_up(n, cols), 4 * cols)
        acc = tm * tn * 4  # FP32 accumulator
        tk = max(rows, min(_round_up(k, rows), (budget - acc) // ((tm + tn) * self.elem)))
        tk = min(tk // rows * rows or rows, _round_up(k, rows))
        out_tiles = b * math.ceil(m / tm) * math.ceil(n / tn)
        return GemmTiling(tm, tn, tk, out_tiles, math.ceil(k / tk))


def _round_up(x: int, multiple: int) -> int:
    return max(multiple, math.ceil(x / multiple) * multiple)


def _gemm_shape(op: Op, values: dict[str, TensorSpec]) -> tuple[int, int, int, int]:
    """(batch, M, N, K) of a matmul or of a convolution seen as an implicit GEMM."""
    shape = [values[r].shape for r in op.refs]
    out = op.out_specs[0].shape
    name = op.target.split(".")[1]
    if name in ("mm", "addmm"):
        a = shape[-2]
        return 1, out[0], out[1], a[-1]
    if name in ("bmm", "baddbmm"):
        a = shape[-2]
        return out[0], out[1], out[2], a[-1]
    # convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    x, w = values[op.args[0].name].shape, values[op.args[1].name].shape
    groups = int(op.args[8])
    transposed = bool(op.args[6])
    spatial_k = math.prod(w[2:])
    if transposed:
        return groups, x[0] * math.prod(x[2:]), w[1] * spatial_k, x[1] // groups
    return groups, out[0] * math.prod(out[2:]), out[1] // groups, (x[1] // groups) * spatial_k
