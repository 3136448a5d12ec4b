"""Tile-level timing rules: how long a kernel, a DMA or a host op takes on the modelled hardware.

The compiler's scheduler describes each kernel as a `KernelPlan` (tile shape and counts, bytes
each DMA moves); these rules turn a plan into seconds using only figures from the spec. A tile
costs max(compute, inbound DMA, outbound DMA) once the pipeline is full; the first tile's load
and the last tile's store are not hidden (pipeline fill and drain).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..npu.spec import GB, US, ProductSpec


@dataclass(frozen=True)
class Transfer:
    """One tensor moved by Task DMA between device DRAM and SRAM."""

    value: str
    nbytes: int
    weight: bool = False  # weights are in DRAM from runtime creation, so they can be prefetched

    def to_json(self) -> dict:
        return {"value": self.value, "bytes": self.nbytes, "weight": self.weight}

    @staticmethod
    def from_json(d: dict) -> Transfer:
        return Transfer(d["value"], int(d["bytes"]), bool(d.get("weight", False)))


@dataclass(frozen=True)
class GemmTiling:
    """Output tiles (tm x tn) spread over the engines, each accumulating K in steps of tk.

    When there are fewer output tiles than engines, K is split `split_k` ways so idle engines
    take a share (partial sums are added at the end). Fused attention is `passes=2` GEMMs per
    tile (QK^T then PV) and `work_fraction` < 1 when causal masking skips blocks.
    """

    tm: int
    tn: int
    tk: int
    out_tiles: int
    k_steps: int
    split_k: int = 1
    passes: int = 1
    work_fraction: float = 1.0

    def to_json(self) -> list:
        return [self.tm, self.tn, self.tk, self.out_tiles, self.k_steps, self.split_k,
                self.passes, self.work_fraction]


@dataclass(frozen=True)
class RowKernel:
    """A row reduction run as one thread block per row (GPU row kernels, e.g. PyTorch's
    softmax and layer/RMS norm): the structure of the kernel the library picks for the shape.

    passes: dependent reads of the row (softmax without room for the row on chip reads it for
    the max, again for the sum, again to write); loads_in_flight: loads one thread has
    outstanding (an unrolled register kernel issues all of its row share at once, a loop one
    per iteration); reductions: block-wide reductions (shuffles and barriers) per row;
    weight_rows: row-length vectors (gamma, beta) read with the last pass; ops_per_element:
    FP32 lane instructions per element (exp, division, casts).
    """

    family: str
    rows: int
    cols: int
    elem_bytes: int
    threads: int  # threads working on one row
    load_bytes: int
    loads_in_flight: int
    passes: int
    reductions: int
    weight_rows: int = 0
    ops_per_element: float = 0.0
    rows_per_block: int = 1  # a warp per row packs several rows into one block

    def to_json(self) -> list:
        return [self.family, self.rows, self.cols, self.elem_bytes, self.threads, self.load_bytes,
                self.loads_in_flight, self.passes, self.reductions, self.weight_rows,
                self.ops_per_element, self.rows_per_block]

    @staticmethod
    def from_json(d: list) -> RowKernel:
        return RowKernel(str(d[0]), *(int(x) for x in d[1:10]), float(d[10]), int(d[11]))


@dataclass(frozen=True)
class KernelPart:
    """One of the kernels a library launches for a single graph op (e.g. the math composite
    PyTorch runs for an attention its fused kernels refuse): the timing model launches and
    times each part as a kernel of its own, in order; the op still runs as one functional
    kernel. dtype: the precision the part computes in (the math composite upcasts to FP32)."""

    label: str
    kind: str
    dtype: str
    plan: "KernelPlan"

    def to_json(self) -> list:
        return [self.label, self.kind, self.dtype, self.plan.to_json()]

    @staticmethod
    def from_json(d: list) -> "KernelPart":
        return KernelPart(str(d[0]), str(d[1]), str(d[2]), KernelPlan.from_json(d[3]))


@dataclass(frozen=True)
class KernelPlan:
    flops: float = 0.0              # useful matrix FLOPs (reports)
    gemm: GemmTiling | None = None  # how the matrix work is tiled (timing)
    vector_ops: float = 0.0         # element-wise / reduction operations
    sram_bytes: float = 0.0         # on-chip data movement (permute, concat, gather)
    tiles: int = 1                  # pipeline depth for DMA/compute overlap
    dma_in: tuple[Transfer, ...] = field(default_factory=tuple)
    dma_out: tuple[Transfer, ...] = field(default_factory=tuple)
    comm: str = ""                  # collective over the chip-to-chip link: all_reduce, all_gather
    comm_bytes: int = 0             # size of the full (reduced or gathered) tensor
    rows: RowKernel | None = None   # a block-per-row kernel's structure (GPU row reductions)
    parts: tuple[KernelPart, ...] = ()  # the kernels the op launches, when more than one
    launches: bool = True           # False: the library runs the op as a view (no kernel)

    @property
    def bytes_in(self) -> int:
        return sum(t.nbytes for t in self.dma_in)

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.dma_out)

    def to_json(self) -> dict:
        return {"flops": self.flops, "gemm": self.gemm.to_json() if self.gemm else None,
                "vector_ops": self.vector_ops, "sram_bytes": self.sram_bytes, "tiles": self.tiles,
                "dma_in": [t.to_json() for t in self.dma_in],
                "dma_out": [t.to_json() for t in self.dma_out],
                "comm": self.comm, "comm_bytes": self.comm_bytes,
                "rows": self.rows.to_json() if self.rows else None,
                **({"parts": [p.to_json() for p in self.parts]} if self.parts else {}),
                **({} if self.launches else {"launches": False})}

    @staticmethod
    def from_json(d: dict) -> KernelPlan:
        return KernelPlan(float(d["flops"]), GemmTiling(*d["gemm"]) if d.get("gemm") else None,
                          float(d["vector_ops"]), float(d["sram_bytes"]), int(d["tiles"]),
                          tuple(Transfer.from_json(t) for t in d["dma_in"]),
                          tuple(Transfer.from_json(t) for t in d["dma_out"]),
                          str(d.get("comm", "")), int(d.get("comm_bytes", 0)),
                          RowKernel.from_json(d["rows"]) if d.get("rows") else None,
                          tuple(KernelPart.from_json(p) for p in d.get("parts", ())),
                          bool(d.get("launches", True)))


@dataclass(frozen=True)
class KernelTime:
    launch_s: float       # command issue; overlaps the first tile's load
    compute_s: float      # neural engine busy time with all operands on chip
    first_in_s: float     # the first tile's operands must land before compute starts
    last_out_s: float     # the last tile's results leave after compute ends


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "int4": 0.5}


def matrix_seconds(gemm: GemmTiling, spec: ProductSpec, dtype: str, kind: str = "gemm") -> float:
    c = spec.die.compute
    efficiency = c.attention_fraction if kind == "attention" else c.matmul_efficiency
    per_engine = c.peak_flops(dtype) * efficiency / c.neural_engines
    if c.tile_operands_from_shared_sram and kind != "attention":
        # Each K step stages both operand panels ((tm + tn) x tk) from the shared SRAM: a
        # tile does 2 tm tn / ((tm + tn) elem) FLOPs per byte, and an engine's share of that
        # level's bandwidth caps what a small tile sustains.
        elem = _DTYPE_BYTES.get(dtype, 2)
        intensity = 2.0 * gemm.tm * gemm.tn / ((gemm.tm + gemm.tn) * elem)
        per_engine = min(per_engine, intensity * spec.die.memory.shared_sram_bandwidth
                         / c.neural_engines)
    per_tile = 2.0 * gemm.tm * gemm.tn * gemm.tk / per_engine
    waves = math.ceil(gemm.out_tiles * gemm.split_k / c.neural_engines)
    steps = math.ceil(gemm.k_steps / gemm.split_k)
    # Skipped (causally masked) blocks shorten the average tile; with a single wave the
    # longest tile, which skips nothing, sets the time.
    fraction = gemm.work_fraction if waves > 1 else 1.0
    seconds = waves * steps * per_tile * gemm.passes * fraction
    if gemm.split_k > 1:
        # Partial sums meet in shared SRAM after a barrier across the engines.
        partial_bytes = gemm.out_tiles * gemm.split_k * gemm.tm * gemm.tn * 4
        seconds += c.kernel_launch_s + partial_bytes / spec.die.memory.shared_sram_bandwidth
    return seconds


def kernel_time(plan: KernelPlan, spec: ProductSpec, dtype: str, kind: str = "") -> KernelTime:
    c, m = spec.die.compute, spec.die.memory
    matrix_s = matrix_seconds(plan.gemm, spec, dtype, kind) if plan.gemm else 0.0
    vector_s = plan.vector_ops / c.vector_flops
    sram_s = plan.sram_bytes / m.shared_sram_bandwidth
    # An element-wise epilogue runs on the vector units while the next tile's GEMM runs.
    compute_s = max(matrix_s, vector_s) + sram_s
    if kind == "conv" and c.conv_layout_transposes and not plan.parts:
        compute_s += layout_transposes_seconds(plan, spec)
    tiles = max(1, plan.tiles)
    return KernelTime(c.kernel_launch_s, compute_s,
                      task_dma_seconds(plan.bytes_in / tiles, spec, kind) if plan.dma_in else 0.0,
                      task_dma_seconds(plan.bytes_out / tiles, spec, kind) if plan.dma_out else 0.0)


def row_kernel_seconds(row: RowKernel, spec: ProductSpec, replayed: bool = False) -> float:
    """Device time of a block-per-row kernel after its launch, from its structure and the
    engine's caches.

    The rows are spread over the engines; each engine holds as many blocks as its thread and
    block limits allow, and its blocks go through the kernel's phases one after another
    (passes over the row, block reductions, stores, arithmetic; each phase ends at a barrier,
    so with a handful of resident blocks one block's phase does not hide another's). A pass
    costs one latency of the level it reads from per round of resident blocks, plus its bytes
    at the lower of the engine's share of that level's bandwidth and what the loads in flight
    sustain over its latency (Little's law: bytes in flight / latency). The first pass reads
    the input from DRAM, or from the shared SRAM when `replayed` (the same kernel ran just
    before on the same input) and the input fits the replay-resident share; later passes
    re-read the row from L1 while the engine's resident rows fit it, else from the shared SRAM
    while every engine's resident rows fit there, else from DRAM. Results are written to DRAM.
    """
    c, m, d = spec.die.compute, spec.die.memory, spec.die.dma
    engines = c.neural_engines
    active = min(engines, max(1, row.rows))
    per_engine = max(1, row.rows) / active
    # rows resident on one engine: its block limit or its thread limit
    resident = max(1, min(c.max_blocks_per_engine * row.rows_per_block,
                          c.max_threads_per_engine // row.threads))
    blocks = min(resident, math.ceil(per_engine))
    rounds = max(1.0, per_engine / blocks)
    row_bytes = row.cols * row.elem_bytes
    in_flight = blocks * row.threads * row.load_bytes * row.loads_in_flight
    levels = {  # latency (s), bandwidth of the whole level (bytes/s)
        "l1": (m.l1_latency_us * US, m.l1_bandwidth_gbps * GB * engines),
        "shared": (m.shared_sram_latency_us * US, m.shared_sram_bandwidth),
        "dram": (d.task_dma_setup_s, d.task_dma_bandwidth),
    }

    def pass_s(level: str, nbytes_per_engine: float, flight: float) -> float:
        latency, bandwidth = levels[level]
        rate = min(bandwidth / active, flight / latency)
        return rounds * latency + nbytes_per_engine / rate

    fits_replay = replayed and row.rows * row_bytes <= m.replay_resident_bytes
    first = "shared" if fits_replay else "dram"
    if blocks * row_bytes <= m.l1_bytes:
        again = "l1"
    elif active * blocks * row_bytes <= m.replay_resident_bytes:
        again = "shared"
    else:
        again = "dram"
    seconds = pass_s(first, per_engine * row_bytes, in_flight)
    seconds += (row.passes - 1) * pass_s(again, per_engine * row_bytes, in_flight)
    if row.weight_rows:
        # gamma/beta: every engine reads them once from the shared SRAM (one round of
        # latency-bound loads), then from its L1 for the rest of its rows
        latency, bandwidth = levels["shared"]
        flight = in_flight * row.weight_rows
        seconds += latency + row_bytes * row.weight_rows / min(bandwidth / active, flight / latency)
    seconds += rounds * row.reductions * c.block_reduction_us * US
    seconds += per_engine * row_bytes / (d.task_dma_bandwidth / active)  # results to DRAM
    # one FP32 lane instruction per cycle per lane: the datasheet's FP32 rate counts an FMA as two
    seconds += per_engine * row.cols * row.ops_per_element / (c.vector_flops / 2 / engines)
    return seconds


def layout_transposes_seconds(plan: KernelPlan, spec: ProductSpec) -> float:
    """Input to channels-last and output back: each a launch plus a read and a write of the
    activation (weights are transposed once, at load)."""
    acts = sum(t.nbytes for t in plan.dma_in if not t.weight)
    return (2 * spec.die.compute.kernel_launch_s + task_dma_seconds(2 * acts, spec)
            + task_dma_seconds(2 * plan.bytes_out, spec))


def task_dma_seconds(nbytes: float, spec: ProductSpec, kind: str = "") -> float:
    """One Task DMA job (descriptors for all its tensors chained): setup once, then bytes."""
    d = spec.die.dma
    return d.task_dma_setup_s + nbytes / d.bandwidth_for(kind)


def collective_seconds(op: str, nbytes: int, parties: int, link) -> float:
    """Ring collectives, alpha-beta: all-reduce 2(p-1)(alpha + S/(pB)), all-gather
    (p-1)(alpha + S/(pB)), S the full tensor's bytes."""
    if parties <= 1:
        return 0.0
    step = link.alpha_s + nbytes / (parties * link.bandwidth)
    rounds = 2 * (parties - 1) if op == "all_reduce" else parties - 1
    return rounds * step


def hdma_seconds(nbytes: int, spec: ProductSpec, to_device: bool = True, pinned: bool = False) -> float:
    """One External HDMA copy. Pinned host memory is read by the DMA engine directly; pageable
    memory (the default: numpy arrays, ordinary tensors) is staged through pinned chunks."""
    return spec.host_link.transfer_s(nbytes, to_device, pinned)


def host_memory(pinned: bool) -> str:
    """The label the trace and the run report use for a host copy's memory."""
    return "pinned" if pinned else "pageable"


def host_op_seconds(flops: float, nbytes: int, spec: ProductSpec) -> float:
    return spec.host.op_s(flops, nbytes)
