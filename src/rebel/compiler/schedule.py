"""Schedule: tile each kernel for the engines' SRAM and decide which tensors Task DMA moves.

Tensors made inside a device segment stay in shared SRAM while they fit and are still needed;
everything else lives in device DRAM and is loaded (Task DMA in) by the kernel that reads it.
Weights always start in DRAM: the runtime placed them there when it was created.
"""
from __future__ import annotations

import math
from dataclasses import replace

from ..device import moe, quant
from ..device.timing import GemmTiling, KernelPlan, Transfer, matrix_seconds
from ..device.vendor_ops import ATTENTION_TARGETS
from ..errors import CompileError
from ..ir import GETITEM, Op, TensorSpec
from ..npu.spec import ProductSpec
from . import eager_attention, eager_kernels, row_kernels
from .program import Kernel
from .support import classify
from .tensor_parallel import SHARD, Sharding

PAGED_ATTENTION = "rbln.paged_attention.default"
CACHE_UPDATE = "rbln_custom_ops.rbln_cache_update.default"


def paged_operands(op: Op) -> dict | None:
    """Names of a paged-attention op's operands (q, k, v, kcache, vcache, tables, positions) and
    its block size, for ours and the vendor's variants alike; None for other ops. For ours,
    "block" is the attention partition (the unit in which it reads the cache), which may span
    several cache blocks of kcache.shape[2] tokens each."""
    if op.target == PAGED_ATTENTION:
        q, k, v, kc, vc, tables, positions = (a.name for a in op.args[:7])
        return {"q": q, "k": k, "v": v, "kcache": kc, "vcache": vc, "tables": tables,
                "positions": positions, "block": int(op.args[7])}
    spec = ATTENTION_TARGETS.get(op.target)
    if spec is None:
        return None
    a = dict(zip(spec.params, op.args))
    seq = a.get("seq", a.get("cache_seq_len"))
    return {"q": a["q"].name, "k": a["k"].name, "v": a["v"].name, "kcache": a["kcache"].name,
            "vcache": a["vcache"].name, "tables": a["block_table"].name,
            "positions": getattr(seq, "name", None), "block": int(a["block_size"]),
            "vendor": spec}


class Scheduler:
    def __init__(self, spec: ProductSpec, device_dtype: str, values: dict[str, TensorSpec],
                 weights: set[str], sharding: Sharding | None = None,
                 producers: dict[str, Op] | None = None):
        self.spec = spec
        self.producers = producers or {}  # op making each value (views, masks: eager kernel choice)
        self.dtype = device_dtype
        self.values = values
        self.weights = weights
        self.sharding = sharding or Sharding(1)
        self.elem = TensorSpec((), device_dtype).nbytes()

    def local(self, value: str) -> TensorSpec:
        """The part of `value` one die holds (all of it unless tensor parallelism splits it)."""
        spec = self.values[value]
        return TensorSpec(self.sharding.local_shape(value, spec.shape), spec.dtype)

    def device_bytes(self, value: str) -> int:
        return self.local(value).nbytes(self.dtype)

    def logical_bytes(self, value: str) -> int:
        return self.local(value).nbytes()

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
        memory = self.spec.die.memory
        cache = memory.shared_sram_is_cache
        capacity = memory.replay_resident_bytes if cache and memory.replay_resident_fraction \
            else memory.shared_sram_bytes
        sram: dict[str, int] = {}
        for i, (kernel, names) in enumerate(zip(kernels, reads)):
            untouched, passed_views = _views_passed_through(kernel)
            dma_in = []
            cached = 0  # bytes this kernel reads and writes in the shared SRAM when it is a cache
            for v in names:
                if v in sram and v not in untouched:
                    cached += sram[v]
                if v in sram or v in untouched:
                    continue
                whole = self.logical_bytes(v) if v in host_copies else self.device_bytes(v)
                nbytes = self._viewed_bytes(kernel, v, whole)
                dma_in.append(Transfer(v, nbytes, weight=v in self.weights))
                # only a tensor loaded whole is in SRAM for later kernels (not one view of it)
                if v not in self.weights and last_use.get(v, -1) > i and nbytes == whole:
                    self._keep(sram, v, self.device_bytes(v), capacity)
            dma_out = []
            for v in kernel.outputs:
                if v in passed_views:
                    continue
                host_dtype = kernel.kind == "cast_out"
                nbytes = self.logical_bytes(v) if host_dtype else self.device_bytes(v)
                needed_later = last_use.get(v, -1) > i  # O(1): no scan of later kernels
                leaf = v in leaves and last_writer[v] == i
                if leaf or (needed_later and not self._keep(sram, v, nbytes, capacity)):
                    dma_out.append(Transfer(v, nbytes))
                elif needed_later:
                    cached += nbytes
            for v in [v for v in sram if last_use.get(v, -1) <= i and v not in leaves]:
                del sram[v]
            kernel.plan = self._compute_plan(kernel, tuple(dma_in), tuple(dma_out),
                                             cached if cache else 0)
            if kernel.kind == "cast_in":
                host_copies -= set(kernel.outputs)

    def _apply_reloads(self, op: Op, dma_in: tuple) -> tuple:
        if op.target.split(".")[1] in ("convolution", "linear_weight_only"):
            a, b = op.args[:2]  # (input, weight, ...); a quantized weight's scales stream once
        else:
            a, b = op.args[-2:]
        a_name, b_name = getattr(a, "name", None), getattr(b, "name", None)
        if a_name not in self.values or b_name not in self.values:
            return dma_in
        ra, rb = self.operand_reloads(self.device_bytes(a_name), self.device_bytes(b_name))
        factor = {a_name: ra, b_name: rb}
        return tuple(Transfer(t.value, t.nbytes * factor.get(t.value, 1), t.weight) for t in dma_in)

    def _experts_read(self, op: Op, dma_in: tuple, active: int) -> tuple:
        """A grouped MoE GEMM streams the weights of the `active` experts its tokens are
        routed to, each once (rebel.device.moe), not the whole [E, ...] stack, nor a copy per
        (token, expert) pair."""
        stacks = {a.name for a in op.args[2:] if hasattr(a, "name") and a.name in self.weights
                  and len(self.values[a.name].shape) == 3}
        out = []
        for t in dma_in:
            if t.value in stacks:
                experts = self.values[t.value].shape[0]
                t = Transfer(t.value, t.nbytes * active // experts, t.weight)
            out.append(t)
        return tuple(out)

    def _viewed_bytes(self, kernel: Kernel, value: str, nbytes: int) -> int:
        """A kernel that reads a tensor only through views (k_cache[i], x[:, -1]) loads only
        the viewed part; so does one that takes its die's slice of a replicated tensor (a
        strided DMA of the slice, not of the whole tensor)."""
        readers = [o for o in kernel.ops if value in o.refs]
        if not readers or any(not (o.kind == "alias" or o.target == SHARD) or o.name not in self.values
                              for o in readers):
            return nbytes
        return min(nbytes, sum(self.device_bytes(o.name) for o in readers))

    def _paged_traffic(self, op: Op, kernel: Kernel, dma_in: tuple, dma_out: tuple):
        """Paged attention reads only the blocks its sequences own and writes only the new
        tokens' keys and values into the caches (in place), not whole caches."""
        p = paged_operands(op)
        k_new, v_new, k_cache, v_cache, tables = p["k"], p["v"], p["kcache"], p["vcache"], p["tables"]
        rows, blocks = _table_shape(self.values[tables].shape, self.values[p["q"]].shape)
        cache = self.local(k_cache)
        own = rows * blocks * math.prod(cache.shape[1:]) * self.elem
        dma_in = tuple(Transfer(t.value, min(t.nbytes, own), t.weight)
                       if t.value in (k_cache, v_cache) else t for t in dma_in)
        updated = {o.name: (k_new if o.args[1] == 1 else v_new) for o in kernel.ops
                   if o.target == GETITEM and o.refs[0] == op.name and o.args[1] in (1, 2)}
        for o in kernel.ops:  # views back to the cache buffer's shape (vendor convention)
            if o.kind == "alias" and o.refs and o.refs[0] in updated:
                updated[o.name] = updated[o.refs[0]]
        dma_out = tuple(Transfer(t.value, self.device_bytes(updated[t.value]), t.weight)
                        if t.value in updated else t for t in dma_out)
        return dma_in, dma_out

    def _cache_update_traffic(self, op: Op, kernel: Kernel, dma_in: tuple, dma_out: tuple):
        """A cache update reads and writes only the slice it replaces (the state), in place; the
        copy it returns as its result is a normal output."""
        cache, state = op.args[0].name, op.args[1].name
        nbytes = self.device_bytes(state)
        dma_in = tuple(Transfer(t.value, min(t.nbytes, nbytes), t.weight) if t.value == cache else t
                       for t in dma_in)
        updated = {o.name for o in kernel.ops if o.target == GETITEM and o.refs[0] == op.name
                   and o.args[1] == 1}
        updated |= {o.name for o in kernel.ops if o.kind == "alias" and o.refs and o.refs[0] in updated}
        dma_out = tuple(Transfer(t.value, nbytes, t.weight) if t.value in updated else t
                        for t in dma_out)
        result = self.device_bytes(cache) if any(
            o.target == GETITEM and o.refs[0] == op.name and o.args[1] == 0 for o in kernel.ops) else 0
        return dma_in, dma_out, nbytes + result

    @staticmethod
    def _keep(sram: dict[str, int], value: str, nbytes: int, capacity: int) -> bool:
        if sum(sram.values()) + nbytes > capacity:
            return False
        sram[value] = nbytes
        return True

    def _compute_plan(self, kernel: Kernel, dma_in, dma_out, cached: int = 0) -> KernelPlan:
        """cached: bytes the kernel reads and writes in a shared SRAM that is a cache (an L2):
        streamed at its bandwidth by kernels that are not matrix kernels (those overlap their
        operand loads with the matrix work)."""
        flops, vector_ops, sram_bytes, gemm = 0.0, 0.0, 0.0, None
        comm, comm_bytes, parts = "", 0, ()
        if kernel.kind in ("cast_in", "cast_out"):
            vector_ops = sum(self.values[v].numel for v in kernel.outputs)
        made = set()
        for op in kernel.ops:
            if op.kind != "alias":
                made.add(op.name)  # written by this kernel (views of inputs are not)
            kind = op.kind
            out = op.out_specs[0] if op.out_specs else None
            if kind == "collective":
                name = op.target.split(".")[1]
                if name == "shard":  # a local slice of a replicated tensor
                    sram_bytes += self.device_bytes(op.name)
                else:
                    comm, comm_bytes = name, self.device_bytes(op.name)
            elif kind in ("gemm", "conv"):
                b, m, n, k = _gemm_shape(op, self._local_values(op))
                flops += 2.0 * b * m * n * k
                gemm = self.tile_gemm(b, m, n, k)
                if op.target in moe.TARGETS:
                    dma_in = self._experts_read(op, dma_in, b)
                else:
                    dma_in = self._apply_reloads(op, dma_in)
                if op.target == quant.TARGET:
                    # weight-only quantization: activations stay 16-bit and the MACs run at
                    # the 16-bit rate; the vector units scale each weight once as its tile
                    # lands (q * scale), overlapped with the matrix work
                    vector_ops += float(n) * k
            elif kind == "attention":
                bh, rows, skv, d, fraction = _attention_shape(op, self._local_values(op))
                gemm = self.tile_attention(bh, rows, skv, d, fraction)
                flops += 4.0 * bh * rows * skv * d * gemm.work_fraction
                if eager_attention.falls_back(op, self.producers, self.values, self.spec):
                    parts = eager_attention.math_parts(
                        op, self._local_values(op), self.producers, self.spec, self.dtype,
                        self.elem, self.tile_gemm, dma_in, dma_out)
                if paged_operands(op) is not None:
                    dma_in, dma_out = self._paged_traffic(op, kernel, dma_in, dma_out)
            elif kind == "elementwise" and out is not None:
                vector_ops += self._local_numel(op.name, out) * classify(op.target).cost
            elif kind in ("reduction", "norm", "softmax", "pool"):
                src = op.refs[0] if op.refs else None
                numel = self.local(src).numel if src in self.values else 0
                vector_ops += numel * classify(op.target).cost
            elif kind == "data" and op.target == "aten.clone.default" and op.refs \
                    and op.refs[0] in made:
                continue  # a copy of what this kernel just wrote: the write is the copy (fusion)
            elif kind in ("data", "gather"):
                out_bytes = sum(s.nbytes(self.dtype) for s in op.out_specs) // (
                    self.sharding.size if isinstance(self.sharding.values.get(op.name), int) else 1)
                sram_bytes += out_bytes
                if op.target == CACHE_UPDATE:
                    dma_in, dma_out, moved_bytes = self._cache_update_traffic(op, kernel, dma_in, dma_out)
                    sram_bytes += moved_bytes - out_bytes
                elif kind == "gather":
                    dma_in = _rows_read(op, dma_in, out_bytes)
        if cached and gemm is None and not comm:
            sram_bytes += cached
        moved = sum(t.nbytes for t in dma_in) + sum(t.nbytes for t in dma_out)
        if gemm is not None:
            tiles = gemm.out_tiles * gemm.k_steps
        else:
            per_pass = self.spec.die.compute.neural_engines * self.spec.die.memory.local_sram_bytes // 2
            tiles = max(1, math.ceil(moved / per_pass))
        rows = None
        if gemm is None and not comm and self.spec.die.compute.row_kernels:
            refs = {r for o in kernel.ops for r in o.refs if r in self.values}
            rows = row_kernels.describe(kernel.ops, {r: self.local(r) for r in refs},
                                        [self.local(t.value).shape for t in dma_in if t.weight],
                                        self.spec, self.elem)
        plan = KernelPlan(flops, gemm, vector_ops, sram_bytes, tiles, dma_in, dma_out, comm,
                          comm_bytes, rows, parts)
        return self._eager_parts(kernel, plan) if not parts else plan

    def _eager_parts(self, kernel: Kernel, plan: KernelPlan) -> KernelPlan:
        """A conv or eval batch norm the spec's library runs as several kernels
        (`eager_kernels`): the plan with those kernels as its parts."""
        c = self.spec.die.compute
        if c.eager_views and eager_kernels.only_views(kernel.ops):
            return replace(plan, dma_in=(), dma_out=(), launches=False)
        for op in kernel.ops:
            if op.target == eager_kernels.CONVOLUTION and c.conv_layout_transposes:
                return replace(plan, parts=eager_kernels.conv_parts(
                    op, plan, self._local_values(op), self.spec, self.dtype, self.elem))
            if op.target == eager_kernels.BATCH_NORM_EVAL and c.batch_norm_native_eval and \
                    eager_kernels.batch_norm_native(op, self.values):
                return replace(plan, parts=eager_kernels.batch_norm_parts(
                    op, plan, self._local_values(op), self.dtype))
        return plan

    def _local_numel(self, name: str, out: TensorSpec) -> int:
        return TensorSpec(self.sharding.local_shape(name, out.shape), out.dtype).numel

    def _local_values(self, op: Op) -> dict[str, TensorSpec]:
        """Shapes as one die sees them, for the values `op` reads and writes."""
        names = [*op.refs, op.name]
        local = {n: self.local(n) for n in names if n in self.values}
        return {**self.values, **local}

    def tile_gemm(self, b: int, m: int, n: int, k: int) -> GemmTiling:
        """The fastest tiling whose double-buffered operands and FP32 accumulator fit one engine's
        local SRAM. Tiles are multiples of the MAC array; K is split across engines that would
        otherwise idle (few output tiles, long K: decode-shaped GEMVs)."""
        c = self.spec.die.compute
        rows, cols = c.mac_array
        budget = self.spec.die.memory.local_sram_bytes
        best = None
        for fm in (4, 2, 1):
            for fn in (4, 2, 1):
                tm = min(rows * fm, _round_up(m, rows))
                tn = min(cols * fn, _round_up(n, cols))
                acc = tm * tn * 4
                free = budget - acc
                if free <= 0:
                    continue
                tk_max = min(_round_up(k, rows), free // (2 * (tm + tn) * self.elem) // rows * rows)
                if tk_max < rows:
                    continue
                k_steps = math.ceil(k / tk_max)
                tk = _round_up(math.ceil(k / k_steps), rows)  # even steps: no padded K
                out_tiles = b * math.ceil(m / tm) * math.ceil(n / tn)
                split = max(1, min(k_steps, c.neural_engines // out_tiles))
                tiling = GemmTiling(tm, tn, tk, out_tiles, k_steps, split)
                cost = (matrix_seconds(tiling, self.spec, self.dtype), -tm * tn)
                if best is None or cost < best[0]:
                    best = (cost, tiling)
        if best is None:
            raise CompileError(f"{self.spec.name}: local SRAM of {budget} bytes cannot hold even one "
                               f"{rows}x{cols} GEMM tile")
        return best[1]

    def operand_reloads(self, a_bytes: int, b_bytes: int) -> tuple[int, int]:
        """How many times each GEMM operand streams from DRAM: once if either fits in half the
        shared SRAM (kept while the other streams); otherwise A is blocked into SRAM-sized row
        panels and B is re-read once per panel."""
        half = self.spec.die.memory.shared_sram_bytes // 2
        if min(a_bytes, b_bytes) <= half:
            return 1, 1
        return 1, math.ceil(a_bytes / half)

    def tile_attention(self, batch: int, sq: int, skv: int, d: int, fraction: float) -> GemmTiling:
        """Flash-style attention: a query tile stays on an engine while K/V blocks stream past;
        QK^T and PV are two GEMMs per block; `fraction` is the share of blocks causal masking
        leaves to compute."""
        rows, cols = self.spec.die.compute.mac_array
        tm, tn = min(2 * rows, _round_up(sq, rows)), min(2 * cols, _round_up(skv, cols))
        out_tiles = batch * math.ceil(sq / tm)
        steps = math.ceil(skv / tn)
        split = max(1, min(steps, self.spec.die.compute.neural_engines // out_tiles))
        return GemmTiling(tm, tn, _round_up(d, rows), out_tiles, steps, split, 2, fraction)


def _table_shape(table: tuple, q: tuple) -> tuple[int, int]:
    """(rows, blocks per row) of a block table; a one-row prefill may pass it as 1-D."""
    return (q[0], table[0]) if len(table) == 1 else (table[0], table[-1])


def _round_up(x: int, multiple: int) -> int:
    return max(multiple, math.ceil(x / multiple) * multiple)


def _views_passed_through(kernel: Kernel) -> tuple[set[str], set[str]]:
    """Views of a kernel's inputs that only pass through it. Fusion may put `k_cache[i]` (a
    select of a resident cache) into the norm kernel before the attention that reads it; the
    norm never touches those bytes, and the view's data stays where its base is, so neither
    loading the base nor writing the view out is traffic of this kernel (the attention kernel
    loads the view; a kernel of views alone moves nothing). Returns (inputs only such views
    read, the views themselves)."""
    made = {o.name for o in kernel.ops}
    used = {r for o in kernel.ops if o.kind != "alias" for r in o.refs}
    aliases = {o.name: o for o in kernel.ops if o.kind == "alias"}
    frontier = [a for a in used if a in aliases]
    while frontier:  # views that feed computation read their sources too
        for r in aliases[frontier.pop()].refs:
            if r not in used:
                used.add(r)
                if r in aliases:
                    frontier.append(r)

    def root(name: str) -> str:
        while name in aliases and aliases[name].refs:
            name = aliases[name].refs[0]
        return name

    passed = {a for a in aliases if a not in used and root(a) not in made}
    untouched = {r for a in passed for r in aliases[a].refs if r not in made and r not in used}
    return untouched, passed


def _rows_read(op: Op, dma_in: tuple, out_bytes: int) -> tuple:
    """A lookup (embedding, index_select) reads only the rows it returns, not its whole table."""
    table = op.args[0].name  # embedding(weight, ids), index_select(table, dim, ids), gather(...)
    return tuple(Transfer(t.value, min(t.nbytes, out_bytes), t.weight) if t.value == table else t
                 for t in dma_in)


def _attention_shape(op: Op, values: dict[str, TensorSpec]):
    """(batch*kv_heads, query rows per kv head, S_kv, head_dim, causal share) of attention.

    Query heads that share a KV head (GQA) are packed into one tile's rows, so decode (one
    query token) still fills the MAC array's rows and each K/V block is read once per group."""
    q, k = values[op.args[0].name].shape, values[op.args[1].name].shape
    paged = paged_operands(op)
    if paged is not None and "vendor" in paged:
        # q [B, kv_heads, group, S, D]; keys: every slot of the sequence's blocks (counted
        # full: the context length is only known at run time)
        b, kv_heads, group, sq, d = q
        rows, blocks = _table_shape(values[paged["tables"]].shape, q)
        keys = blocks * paged["block"]
        if paged["vendor"].family == "sliding":
            keys = paged["block"] + sq  # the window's slots plus the chunk
        return b * kv_heads, sq * group, keys, d, 1.0
    if op.target == PAGED_ATTENTION:
        # paged(q, k_new, v_new, k_cache, v_cache, block_tables, positions, P, scale): keys are
        # the sequence's blocks (counted full: the context length is only known at run time)
        # (table entries x tokens per cache block: rbln_max_seq_len, whatever the block size)
        blocks = values[op.args[5].name].shape[-1]
        k = (*k[:-2], blocks * values[op.args[3].name].shape[2], k[-1])
        causal = False
    else:
        causal = bool(op.kwargs.get("is_causal", op.args[5] if len(op.args) > 5 else False))
    heads, kv_heads = q[-3] if len(q) > 2 else 1, k[-3] if len(k) > 2 else 1
    group = heads // kv_heads if kv_heads and heads % kv_heads == 0 else 1
    batch_kv = math.prod(q[:-3]) * (heads // group)
    sq, skv = q[-2], k[-2]
    # query i sees keys up to (skv - sq + i): the visible share of the sq x skv square
    fraction = 1.0 - (sq - 1) / (2.0 * skv) if causal and sq > 1 else 1.0
    return batch_kv, sq * group, skv, q[-1], fraction


def _gemm_shape(op: Op, values: dict[str, TensorSpec]) -> tuple[int, int, int, int]:
    """(batch, M, N, K) of a matmul or of a convolution seen as an implicit GEMM."""
    shape = [values[r].shape for r in op.refs]
    out = values[op.name].shape if op.name in values else op.out_specs[0].shape
    name = op.target.split(".")[1]
    if op.target in moe.TARGETS:
        # (x or h, ids [T, k], weight(s) [E, N, K], ...): one GEMM per expert used, on the
        # pairs routed to it; gate and up share their input, so they count as one N = 2I GEMM
        tokens, top_k = values[op.args[1].name].shape
        experts, n, k = values[op.args[2 if op.target == moe.GATE_UP else 3].name].shape
        active = moe.active_experts(tokens, top_k, experts)
        n = 2 * n if op.target == moe.GATE_UP else n
        return active, math.ceil(tokens * top_k / active), n, k
    if name in ("linear", "linear_weight_only"):  # (x [..., K], weight [N, K] or packed, ...)
        k = values[op.args[0].name].shape[-1]
        return 1, math.prod(out[:-1]), out[-1], k
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
