"""Predicted latency and memory of a decoder LLM from its config: compile few layers, extrapolate.

The model is built on meta tensors (`rebel.plan.model`) and wrapped as the serving path runs it
(`rebel.plan.paged.PagedCausalLM`: paged attention over a KV cache kept on the device), then
compiled by the same compiler as every run, with one shape bucket per phase: a prefill chunk of
`chunk` tokens (batch 1, as the serving engine prefills) and a decode step per batch bucket.
Every decoder layer is the same, so a model of N layers costs what 1 layer costs plus N - 1
times the difference between 2 layers and 1: the embedding, final norm and LM head are in both
and cancel. Compiling 2 layers instead of 32 or 64 is what makes a search over TP sizes and
batch buckets affordable; `exact=True` compiles every layer instead (the check the tests run).

Each phase is timed by the event engine with the paged-attention kernels scaled to the context
the phase reaches (as a Runtime does per run), and its engines' busy time is split into
compute, weight DMA, KV-cache DMA, activation DMA, collectives and host work: the largest of
them is the phase's bottleneck.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import cached_property

import torch

from ..compiler.compile import compile_module
from ..device.engine import EventEngine
from ..device.events import HDMA, HOST, LINK, NEURAL_ENGINE, TASK_DMA
from ..errors import PlanError
from ..npu import load_spec
from ..npu.spec import ProductSpec
from ..runtime.runtime import activation_bytes
from ..runtime.timeline import build_steps, group_link, paged_fill, paged_sites
from .model import DTYPES, ModelShape, build_meta_model, load_config, shape_of

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
WEIGHTS = {None: 16, "int8": 8, "int4": 4}  # weight-only quantization: bits per stored weight


@dataclass(frozen=True)
class Breakdown:
    """Busy seconds of one phase per resource (they overlap, so they sum to more than the
    phase's latency; the largest is what bounds it)."""

    compute_s: float = 0.0        # neural engines computing (not waiting for operands)
    weight_dma_s: float = 0.0     # Task DMA of weights, DRAM -> SRAM
    kv_dma_s: float = 0.0         # Task DMA of the KV cache (reads of the context, writes of new tokens)
    activation_dma_s: float = 0.0  # Task DMA of activations between kernels
    collective_s: float = 0.0     # tensor-parallel all-reduce / all-gather on the die links
    host_s: float = 0.0           # launches, syncs, host fallbacks, host <-> device copies

    NAMES = {"compute_s": "compute", "weight_dma_s": "weight DMA", "kv_dma_s": "KV DMA",
             "activation_dma_s": "activation DMA", "collective_s": "collectives", "host_s": "host"}

    @property
    def bottleneck(self) -> str:
        best = max(fields(self), key=lambda f: getattr(self, f.name))
        return self.NAMES[best.name]

    def as_dict(self) -> dict[str, float]:
        return {self.NAMES[f.name]: getattr(self, f.name) for f in fields(self)}

    def combine(self, other: Breakdown, a: float, b: float) -> Breakdown:
        """a * self + b * other, field by field (sums and extrapolation)."""
        return Breakdown(**{f.name: a * getattr(self, f.name) + b * getattr(other, f.name)
                            for f in fields(self)})


@dataclass(frozen=True)
class PhaseTime:
    """Predicted time of one phase (a prefill chunk, a decode step, a whole prompt)."""

    seconds: float
    breakdown: Breakdown
    kinds: dict[str, float] = field(default_factory=dict)  # engine busy seconds per kernel kind

    def combine(self, other: PhaseTime, a: float, b: float) -> PhaseTime:
        kinds = {k: a * self.kinds.get(k, 0.0) + b * other.kinds.get(k, 0.0)
                 for k in {*self.kinds, *other.kinds}}
        return PhaseTime(a * self.seconds + b * other.seconds,
                         self.breakdown.combine(other.breakdown, a, b), kinds)

    @staticmethod
    def total(parts: list[PhaseTime]) -> PhaseTime:
        out = PhaseTime(0.0, Breakdown())
        for p in parts:
            out = out.combine(p, 1.0, 1.0)
        return out


@dataclass(frozen=True)
class Memory:
    """Device DRAM one die holds, bytes."""

    weights: int              # the die's share of the parameters (split ones split, others whole)
    activations: int          # peak live activations over every phase's graph
    kv_block: int             # one KV-cache block of `block_size` tokens, all layers, K and V
    usable: int               # die DRAM left after the firmware reservation (spec file)

    @property
    def kv_blocks_total(self) -> int:
        """KV blocks that fit beside the weights and activations (0 if those do not fit)."""
        return max(0, (self.usable - self.weights - self.activations) // self.kv_block)


class Predictor:
    """Compiles a config at one hardware / TP / dtype and answers per-phase questions.

    block_size: tokens per KV-cache block (also the attention partition, as optimum.rbln
    defaults it); max_seq_len: prompt + output tokens a sequence may reach (a multiple of
    block_size after rounding up); chunk: prefill chunk tokens; chunk_sizes: shorter prefill
    graphs beside it (as optimum.rbln's rbln_prefill_chunk_sizes: a chunk runs in the smallest
    that holds it); batches: decode batch buckets.
    hardware: a product name, a spec .toml, or a loaded ProductSpec (the compiler schedules for
    the spec's file, the event engine times with the object given).
    """

    def __init__(self, config, hardware: str = "RBLN-CA25", tp: int = 1, dtype: str = "float16",
                 *, chunk: int | None = 128, chunk_sizes=(), batches=DEFAULT_BATCHES,
                 max_seq_len: int = 2048, weights: str | None = None,
                 block_size: int = 1024, exact: bool = False):
        self.table = load_config(config)
        self.shape: ModelShape = shape_of(self.table)
        self.spec: ProductSpec = hardware if isinstance(hardware, ProductSpec) else load_spec(hardware)
        self.hardware = self.spec.name
        if dtype not in DTYPES:
            raise PlanError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        self.dtype = dtype
        s = self.shape
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise PlanError(f"tp must be a positive integer, got {tp!r}")
        if s.heads % tp or s.kv_heads % tp:
            raise PlanError(f"TP={tp} must divide the model's {s.heads} attention heads and "
                            f"{s.kv_heads} KV heads")
        self.tp = tp
        for name, value in (("block_size", block_size), ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"{name} must be a positive integer, got {value!r}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise PlanError(f"chunk must be a positive integer, got {chunk!r}")
        self.batches = tuple(sorted({int(b) for b in batches}))
        if not self.batches or self.batches[0] < 1:
            raise PlanError(f"batch buckets must be positive integers, got {list(batches)!r}")
        self.block_size = block_size
        self.blocks_per_seq = math.ceil(max_seq_len / block_size)
        self.max_seq_len = self.blocks_per_seq * block_size
        if weights not in WEIGHTS:
            raise PlanError(f"weights {weights!r} is not supported; use one of "
                            f"{', '.join(w for w in WEIGHTS if w)} (weight-only quantization)")
        if weights and s.experts:
            raise PlanError(f"weight-only quantization ({weights}) of a MoE's stacked expert "
                            "weights is not modelled yet: plan MoE configs in 16-bit weights")
        self.weights = weights
        self.chunk = chunk
        sizes = sorted({int(c) for c in chunk_sizes} | ({chunk} if chunk else set()))
        if chunk and (sizes[0] < 1 or sizes[-1] != chunk):
            raise PlanError(f"chunk_sizes must lie in 1..chunk={chunk}, got {list(chunk_sizes)!r}")
        self.chunk_sizes = tuple(sizes)
        self.exact = exact
        self._times: dict = {}

    # ---- compiling ------------------------------------------------------------------------

    @property
    def layer_counts(self) -> tuple[int, ...]:
        """The depths compiled: every layer (exact), or 1 and 2 to extrapolate from."""
        n = self.shape.layers
        return (n,) if self.exact or n <= 2 else (1, 2)

    def _bucket_shapes(self) -> list[tuple[str, int, int]]:
        shapes = [("prefill" if c == self.chunk else f"prefill_{c}", 1, c) for c in self.chunk_sizes]
        return shapes + [(f"decode_{b}", b, 1) for b in self.batches]

    @cached_property
    def _compiled(self) -> dict[int, dict[str, object]]:
        """layers -> bucket name -> Program."""
        out = {}
        for layers in self.layer_counts:
            # FP32 module, 16-bit device: what optimum.rbln compiles (a checkpoint loads in FP32
            # and the compiler casts to the device dtype), so a plan sees the kernels a compiled
            # folder runs; a module already in FP16 would add explicit casts to its graph
            hf = build_meta_model(self.table, layers, self.dtype).float()
            if self.weights:
                _quantize(hf, WEIGHTS[self.weights])
            from .paged import PagedCausalLM

            with torch.device("meta"):
                paged = PagedCausalLM(hf, num_blocks=self.batches[-1] * self.blocks_per_seq,
                                      block_size=self.block_size).eval()
            shapes = self._bucket_shapes()
            inputs = [[_meta(b, t), _meta(b, t), _meta(b, self.blocks_per_seq), _meta(b)]
                      for _, b, t in shapes]
            compiled = compile_module(paged, inputs, npu=self.spec.source or self.hardware,
                                      device_dtype=self.dtype, tensor_parallel_size=self.tp,
                                      progress=False)
            out[layers] = {name: program for (name, _, _), program in zip(shapes, compiled.buckets)}
        return out

    # ---- timing ---------------------------------------------------------------------------

    def _time(self, layers: int, bucket: str, positions: torch.Tensor) -> PhaseTime:
        program = self._compiled[layers][bucket]
        sites = paged_sites(program)
        fill = paged_fill(sites, {s.positions: positions for s in sites}) if sites else None
        key = (layers, bucket, tuple(sorted(fill.items())) if fill else ())
        if key not in self._times:
            group = tuple(range(self.tp))
            engine = EventEngine(self.spec, 0, group=group, link=group_link(group, self.spec))
            steps = build_steps(program, self.spec, fill)
            timeline = engine.run(steps)
            self._times[key] = PhaseTime(timeline.latency_s, *_breakdown(program, steps,
                                                                         timeline.events, self.spec))
        return self._times[key]

    def _phase(self, bucket: str, positions: torch.Tensor) -> PhaseTime:
        counts = self.layer_counts
        if len(counts) == 1:
            return self._time(counts[0], bucket, positions)
        one, two = (self._time(n, bucket, positions) for n in counts)
        extra = self.shape.layers - 1
        return one.combine(two, 1.0 - extra, float(extra))  # one + extra * (two - one)

    def decode_step(self, batch: int, context: int) -> PhaseTime:
        """One decode step of `batch` sequences that have reached `context` tokens (the new one
        included), on the smallest batch bucket that holds them (padding rows idle)."""
        return self.decode_at([context - 1] * batch)

    def decode_at(self, positions) -> PhaseTime:
        """One decode step for sequences whose new tokens sit at these positions (0-based),
        on the smallest batch bucket that holds them."""
        positions = [int(p) for p in positions]
        if not positions or min(positions) < 0:
            raise PlanError(f"decode positions must be non-negative, got {positions!r}")
        bucket = self.bucket_for(len(positions))
        self._check_context(max(positions) + 1)
        rows = torch.full((bucket, 1), -1, dtype=torch.long)
        rows[:len(positions), 0] = torch.tensor(positions, dtype=torch.long)
        return self._phase(f"decode_{bucket}", rows)

    def step_cost(self) -> PredictedStepCost:
        """This predictor as the serving simulation's step cost (`rebel.plan.serving`)."""
        return PredictedStepCost(self)

    def prefill_chunk(self, start: int, tokens: int) -> PhaseTime:
        """One prefill chunk: prompt tokens start .. start + tokens - 1 (tokens <= chunk), in
        the smallest compiled chunk that holds them (the rest of it is padding)."""
        if not self.chunk:
            raise PlanError("this predictor was built without a prefill chunk (chunk=None)")
        if not 0 < tokens <= self.chunk:
            raise PlanError(f"a prefill chunk holds 1..{self.chunk} tokens, got {tokens}")
        self._check_context(start + tokens)
        width = next(c for c in self.chunk_sizes if c >= tokens)
        positions = torch.full((1, width), -1, dtype=torch.long)
        positions[0, :tokens] = torch.arange(start, start + tokens)
        return self._phase("prefill" if width == self.chunk else f"prefill_{width}", positions)

    def ttft(self, prompt_len: int) -> PhaseTime:
        """Time to first token: the prompt's prefill chunks in turn (the last one emits it)."""
        if prompt_len < 1:
            raise PlanError(f"prompt_len must be positive, got {prompt_len}")
        return PhaseTime.total([self.prefill_chunk(s, min(self.chunk, prompt_len - s))
                                for s in range(0, prompt_len, self.chunk)])

    def tpot(self, batch: int, prompt_len: int, output_len: int) -> PhaseTime:
        """Mean decode step over the output (time per output token of each sequence): the
        steps after the first token, contexts prompt_len + 1 .. prompt_len + output_len - 1."""
        contexts = range(prompt_len + 1, prompt_len + max(output_len, 2))
        steps = [self.decode_step(batch, c) for c in contexts]
        return PhaseTime.total(steps).combine(PhaseTime(0.0, Breakdown()), 1.0 / len(steps), 0.0)

    def bucket_for(self, batch: int) -> int:
        for b in self.batches:
            if b >= batch:
                return b
        raise PlanError(f"batch {batch} exceeds the largest batch bucket {self.batches[-1]}")

    def _check_context(self, context: int) -> None:
        if context > self.max_seq_len:
            raise PlanError(f"context {context} exceeds max_seq_len {self.max_seq_len}")

    # ---- memory ---------------------------------------------------------------------------

    def memory(self) -> Memory:
        """Per-die DRAM: weights and KV blocks extrapolated by layer like the times; the
        activations are the largest of any graph's (a deeper model reuses the same buffers)."""
        per_depth = {}
        for layers, programs in self._compiled.items():
            p = next(iter(programs.values()))
            caches = set(p.mutable_buffers)
            kv = sum(p.static_local_bytes(n) if n in p.static_buffers else
                     _local_bytes(p, n) for n in caches)
            weights = p.weight_bytes - sum(_local_bytes(p, n) for n in caches
                                           if n not in p.static_buffers)
            acts = max(activation_bytes(q, frozenset(q.buffer_updates)) for q in programs.values())
            per_depth[layers] = (weights, kv, acts)
        counts = self.layer_counts
        n = self.shape.layers
        if len(counts) == 1:
            weights, kv, acts = per_depth[counts[0]]
        else:
            (w1, k1, _), (w2, k2, acts) = per_depth[1], per_depth[2]
            weights, kv = w1 + (n - 1) * (w2 - w1), k1 + (n - 1) * (k2 - k1)
        blocks = self.batches[-1] * self.blocks_per_seq
        return Memory(weights=weights, activations=acts, kv_block=kv // blocks,
                      usable=self.spec.die.memory.dram_usable_bytes)


class PredictedStepCost:
    """`rebel.plan.serving.StepCost` from a config alone: the graph calls of one engine step
    (prefill chunks, decode batches) timed by a Predictor instead of compiled full models, so a
    request trace can be simulated for a model too large to compile whole here."""

    def __init__(self, predictor: Predictor):
        if not predictor.chunk:
            raise PlanError("a step cost needs a predictor with a prefill chunk")
        self.predictor = predictor
        self.chunk = predictor.chunk
        self.decode_batch = predictor.batches[-1]

    def prefill_s(self, tokens: int, start: int) -> float:
        return self.predictor.prefill_chunk(start, tokens).seconds

    def decode_s(self, positions) -> float:
        return self.predictor.decode_at(positions).seconds

    def __repr__(self) -> str:
        return f"PredictedStepCost(chunk={self.chunk}, decode_batch={self.decode_batch})"


def _quantize(model, bits: int) -> None:
    """Weight-only quantization of every linear but the LM head (rebel.device.quant): groups of
    128 input channels where every layer's width divides by 128, else one scale per channel."""
    from ..device.quant import quantize_linears

    widths = {m.in_features for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}
    quantize_linears(model, bits, group_size=128 if all(w % 128 == 0 for w in widths) else None)


def _meta(*shape) -> torch.Tensor:
    return torch.empty(*shape, dtype=torch.long, device="meta")


def _local_bytes(program, name: str) -> int:
    from ..ir import TensorSpec

    spec = program.weights[name]
    return TensorSpec(program.sharding.local_shape(name, spec.shape), spec.dtype).nbytes()


def _breakdown(program, steps, events, spec: ProductSpec) -> tuple[Breakdown, dict[str, float]]:
    """Busy seconds per resource and per kernel kind, from device 0's events and the host's.
    A Task DMA slice moving several tensors is split by their bytes between weights, KV cache
    (the persistent buffers and their in-place updates) and activations."""
    caches = set(program.mutable_buffers) | set(program.buffer_updates)
    weights = set(program.weights) - caches
    moved: dict[str, dict[str, int]] = {}  # kernel step name -> value -> bytes
    kinds_of: dict[str, str] = {}
    busy: dict[str, float] = {}  # kernel step -> seconds its engines compute (operands on chip)
    for step in steps:
        for k in getattr(step, "kernels", ()):
            kinds_of[k.name] = k.kind
            busy[k.name] = k.time.launch_s + k.time.compute_s
            table = moved.setdefault(k.name, {})
            for t in (*k.plan.dma_in, *k.plan.dma_out):
                table[t.value] = table.get(t.value, 0) + t.nbytes
    b = dict(compute_s=0.0, weight_dma_s=0.0, kv_dma_s=0.0, activation_dma_s=0.0,
             collective_s=0.0, host_s=0.0)
    kinds: dict[str, float] = {}
    for e in events:
        if e.device not in (None, 0):
            continue
        if e.track == HOST:
            # a wait slice spans the device's work; only its wake-up is host time
            b["host_s"] += spec.runtime.sync_s if e.category == "sync" else e.dur_s
        elif e.track == HDMA:
            b["host_s"] += e.dur_s
        elif e.track == NEURAL_ENGINE:
            # the slice also spans waits for operands still streaming in: count only compute
            b["compute_s"] += min(e.dur_s, busy.get(e.name, e.dur_s))
            kind = kinds_of.get(e.name, "other")
            kinds[kind] = kinds.get(kind, 0.0) + e.dur_s
        elif e.track == LINK:
            b["collective_s"] += e.dur_s
            kinds["collective"] = kinds.get("collective", 0.0) + e.dur_s
        elif e.track == TASK_DMA:
            kernel = e.name.split(" ", 1)[1] if " " in e.name else e.name
            table = moved.get(kernel, {})
            values = e.args.get("values", [])
            sizes = {v: table.get(v, 0) for v in values}
            total = sum(sizes.values())
            for v, nbytes in sizes.items():
                share = e.dur_s * (nbytes / total if total else 1.0 / len(sizes))
                key = "kv_dma_s" if v in caches else "weight_dma_s" if v in weights \
                    else "activation_dma_s"
                b[key] += share
    return Breakdown(**b), kinds
