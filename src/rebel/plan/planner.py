"""Capacity plans: does a model fit, how fast does it serve, what does it cost, what is cheapest.

`plan()` answers for one deployment (hardware, TP size, batch buckets, card count); `search()`
tries TP sizes, batch buckets and replica counts and returns the cheapest deployments that meet
TTFT / TPOT targets at a request rate; `min_cards()` is the fewest cards one copy of the model
fits on. Every figure comes from the compiled graphs (`rebel.plan.predict`) and the spec file
(die DRAM, dies per card, the card's power), none from code.

Serving at a request rate is estimated in steady state, not simulated: each replica prefills
requests one at a time (as the serving engine does) and decodes the running ones together.
With arrival rate l per replica, prefill time P and decode step T at the batch bucket that
holds the running sequences:
- prefill occupies rho = l * P of the time, so decode steps come every T / (1 - rho) (the TPOT
  a user sees);
- running sequences n = l * output_len * TPOT (Little's law) pick the bucket, and must fit the
  largest bucket and the KV blocks;
- TTFT = P + T / 2 (the step in flight) + rho * P / (2 (1 - rho)) (M/D/1 queueing of prefills)
  + the wait for a free sequence slot when all `max batch` are taken (Erlang C, each slot held
  output_len x TPOT): the search picks the smallest max batch that keeps TTFT within its SLO.
These are means; the trace replay below gives percentiles.
A replay of a request trace through vLLM's scheduler (`rebel.plan.serving.simulate`, with
`Predictor.step_cost()` for a config alone) gives percentiles where this gives means.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import PlanError
from ..npu import load_spec
from ..npu.spec import GiB, ProductSpec
from .model import load_config, shape_of
from .predict import DEFAULT_BATCHES, Breakdown, Memory, Predictor


@dataclass(frozen=True)
class DecodePoint:
    """Decode at one batch bucket, all of it running (the plan's table row)."""

    batch: int
    tpot_s: float                 # mean decode step over the output
    tokens_per_s: float           # output tokens/s of every replica, decode only
    serving_tokens_per_s: float   # with each request's prefill run in between
    tokens_per_joule: float       # serving tokens/s per watt of the cards' TDP
    kv_fits: bool                 # batch x blocks per sequence fit the KV blocks
    breakdown: Breakdown

    @property
    def bottleneck(self) -> str:
        return self.breakdown.bottleneck


@dataclass(frozen=True)
class Plan:
    model: str
    params: int
    hardware: str
    tp: int
    cards: int
    replicas: int
    dtype: str
    prompt_len: int
    output_len: int
    block_size: int
    blocks_per_seq: int
    memory: Memory
    kv_blocks_needed: int         # per replica at the largest batch
    ttft_s: float
    prefill: Breakdown
    decode: tuple[DecodePoint, ...]
    watts: float
    spec_file: str
    exact: bool = False
    active_params: int | None = None  # a MoE's parameters per token (its top-k experts)

    def params_label(self, word: str = "params") -> str:
        """"30.53B params", or with a MoE's active share: "30.53B params (3.35B active)"."""
        active = "" if self.active_params in (None, self.params) else \
            f" ({self.active_params / 1e9:.2f}B active)"
        return f"{self.params / 1e9:.2f}B {word}{active}"

    @property
    def fits(self) -> bool:
        return self.memory.weights + self.memory.activations + \
            self.kv_blocks_needed * self.memory.kv_block <= self.memory.usable

    @property
    def kv_blocks_left(self) -> int:
        return self.memory.kv_blocks_total - self.kv_blocks_needed

    @property
    def over_bytes(self) -> int:
        """Bytes per die beyond the usable DRAM (0 when it fits)."""
        m = self.memory
        return max(0, m.weights + m.activations + self.kv_blocks_needed * m.kv_block - m.usable)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["memory"] = {**asdict(self.memory), "kv_blocks_total": self.memory.kv_blocks_total}
        d["prefill"] = {**self.prefill.as_dict(), "bottleneck": self.prefill.bottleneck}
        d["decode"] = [{**{k: v for k, v in asdict(p).items() if k != "breakdown"},
                        "breakdown": p.breakdown.as_dict(), "bottleneck": p.bottleneck}
                       for p in self.decode]
        d.update(fits=self.fits, kv_blocks_left=self.kv_blocks_left, over_bytes=self.over_bytes)
        return d

    def __repr__(self) -> str:
        m = self.memory
        head = (f"Plan({self.model}, {self.params_label()}, {self.dtype}, "
                f"{self.hardware} x{self.cards}, TP={self.tp}, {self.replicas} replica(s))")
        if self.fits:
            fit = (f"fits: weights {m.weights / GiB:.2f} + activations {m.activations / GiB:.2f} "
                   f"+ KV {self.kv_blocks_needed * m.kv_block / GiB:.2f} GiB of "
                   f"{m.usable / GiB:.2f} GiB per die; {self.kv_blocks_left} KV blocks of "
                   f"{self.block_size} tokens left")
        else:
            fit = (f"DOES NOT FIT: {self.over_bytes / GiB:.2f} GiB over per die (weights "
                   f"{m.weights / GiB:.2f} + activations {m.activations / GiB:.2f} + KV "
                   f"{self.kv_blocks_needed * m.kv_block / GiB:.2f} GiB, usable "
                   f"{m.usable / GiB:.2f} GiB)")
        lines = [head, "  " + fit,
                 f"  TTFT {self.ttft_s * 1e3:.1f} ms for {self.prompt_len} prompt tokens "
                 f"(bound by {self.prefill.bottleneck})"]
        for p in self.decode:
            lines.append(f"  batch {p.batch:>3}: TPOT {p.tpot_s * 1e3:.2f} ms, "
                         f"{p.tokens_per_s:.0f} tok/s decode, {p.serving_tokens_per_s:.0f} tok/s "
                         f"serving, {p.tokens_per_joule:.2f} tok/J (bound by {p.bottleneck})"
                         + ("" if p.kv_fits else ", KV does not fit"))
        lines.append(f"  {self.watts:.0f} W at TDP ({self.cards} x {self.watts / self.cards:.0f} W, "
                     f"{self.spec_file})")
        return "\n".join(lines)


@dataclass(frozen=True)
class Deployment:
    """One deployment the search found meeting the SLOs, as it runs at the request rate."""

    tp: int
    replicas: int
    cards: int
    batch: int                    # max batch: sequence slots, the largest decode bucket
    running: float                # sequences decoding at once per replica (mean)
    ttft_s: float                 # under load
    tpot_s: float                 # under load (prefill stalls included)
    prefill_utilization: float
    tokens_per_s: float           # output tokens/s served (request rate x output length)
    watts: float
    tokens_per_joule: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    model: str
    hardware: str
    rps: float
    ttft_slo_s: float
    tpot_slo_s: float
    prompt_len: int
    output_len: int
    deployments: list[Deployment] = field(default_factory=list)  # cheapest first
    notes: list[str] = field(default_factory=list)  # why TP sizes were left out

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "deployments"},
                "deployments": [d.to_dict() for d in self.deployments]}

    def __repr__(self) -> str:
        head = (f"search({self.model} on {self.hardware}: {self.rps:g} req/s of "
                f"{self.prompt_len} in / {self.output_len} out, TTFT <= {self.ttft_slo_s * 1e3:g} ms, "
                f"TPOT <= {self.tpot_slo_s * 1e3:g} ms)")
        if not self.deployments:
            return "\n".join([head, "  no deployment meets the SLOs", *("  " + n for n in self.notes)])
        rows = [f"  {d.cards} card(s): TP={d.tp} x {d.replicas} replica(s), batch {d.batch}, "
                f"TTFT {d.ttft_s * 1e3:.0f} ms, TPOT {d.tpot_s * 1e3:.1f} ms, "
                f"{d.tokens_per_s:.0f} tok/s, {d.watts:.0f} W, {d.tokens_per_joule:.2f} tok/J"
                for d in self.deployments]
        return "\n".join([head, *rows])


class Planner:
    """Plans for one model config on one product, reusing compiled predictors across calls
    (a search compiles each TP size once)."""

    def __init__(self, config, hardware: str | ProductSpec = "RBLN-CA25", dtype: str = "float16",
                 *, block_size: int = 1024, chunk: int = 128, exact: bool = False,
                 weights: str | None = None):
        self.table = load_config(config)
        self.shape = shape_of(self.table)
        self.spec = hardware if isinstance(hardware, ProductSpec) else load_spec(hardware)
        if self.spec.power_w is None:
            raise PlanError(f"{self.spec.source} gives no power_w for {self.spec.name}; the plan's "
                            "watts and tokens per joule need the card's TDP in the spec file")
        self.dtype = dtype
        self.weights = weights  # None, "int8" or "int4": weight-only quantized linears
        self.block_size = block_size
        self.chunk = chunk
        self.exact = exact
        self._predictors: dict = {}

    @property
    def label_dtype(self) -> str:
        return self.dtype + (f" ({self.weights} weights)" if self.weights else "")

    def valid_tp(self, max_dies: int) -> list[int]:
        """TP sizes the model splits into (dividing heads and KV heads), up to max_dies."""
        s = self.shape
        return [t for t in range(1, max_dies + 1) if s.heads % t == 0 and s.kv_heads % t == 0
                and (t & (t - 1)) == 0]

    def predictor(self, tp: int, batches, max_seq_len: int) -> Predictor:
        key = (tp, tuple(sorted(batches)), max_seq_len)
        if key not in self._predictors:
            self._predictors[key] = Predictor(
                self.table, self.spec, tp, self.dtype, chunk=self.chunk, batches=batches,
                max_seq_len=max_seq_len, block_size=self.block_size, exact=self.exact,
                weights=self.weights)
        return self._predictors[key]

    def _layers_bytes(self, tp: int) -> float:
        """A lower bound of one die's weights at `tp`: its share of the decoder layers."""
        s = self.shape
        layers = s.params - s.vocab * s.hidden * (1 if s.tied_embeddings else 2)
        return layers * 2 / tp  # float16 and bfloat16 alike

    def cards_for(self, tp: int, replicas: int = 1) -> int:
        return math.ceil(tp * replicas / self.spec.dies)

    def plan(self, tp: int | None = None, batch=1, prompt_len: int = 1024, output_len: int = 256,
             cards: int | None = None) -> Plan:
        """One deployment: TP size (default: one card's dies), decode batch bucket(s), cards
        (default: as few as one replica needs; more cards run more replicas)."""
        _check_lengths(prompt_len, output_len)
        tp = self.spec.dies if tp is None else tp
        batches = sorted({batch} if isinstance(batch, int) else set(batch))
        need = self.cards_for(tp)
        cards = need if cards is None else cards
        if isinstance(cards, bool) or not isinstance(cards, int) or cards < need:
            raise PlanError(f"TP={tp} spans {need} card(s) of {self.spec.dies} dies; cards={cards!r} "
                            "is too few")
        replicas = cards * self.spec.dies // tp
        pred = self.predictor(tp, batches, prompt_len + output_len)
        memory = pred.memory()
        ttft = pred.ttft(prompt_len)
        watts = cards * self.spec.power_w
        points = []
        for b in batches:
            t = pred.tpot(b, prompt_len, output_len)
            decode_tps = replicas * b / t.seconds
            cycle = b * ttft.seconds + output_len * t.seconds  # b requests: prefills, then decode
            serving = replicas * b * output_len / cycle
            points.append(DecodePoint(b, t.seconds, decode_tps, serving, serving / watts,
                                      b * pred.blocks_per_seq <= memory.kv_blocks_total,
                                      t.breakdown))
        return Plan(model=self.shape.name, params=self.shape.params, hardware=self.spec.name,
                    tp=tp, cards=cards, replicas=replicas, dtype=self.label_dtype, prompt_len=prompt_len,
                    output_len=output_len, block_size=self.block_size,
                    blocks_per_seq=pred.blocks_per_seq, memory=memory,
                    kv_blocks_needed=batches[-1] * pred.blocks_per_seq, ttft_s=ttft.seconds,
                    prefill=ttft.breakdown, decode=tuple(points), watts=watts,
                    spec_file=self.spec.source, exact=self.exact,
                    active_params=self.shape.active_params)

    def min_cards(self, prompt_len: int = 1024, output_len: int = 256, batch: int = 1,
                  max_cards: int = 8) -> Plan:
        """The plan on the fewest cards one replica fits on (smallest TP among those); a
        PlanError says by how much the model misses at the largest TP tried."""
        last = None
        sizes = self.valid_tp(max_cards * self.spec.dies)
        for tp in sizes:
            if tp != sizes[-1] and self._layers_bytes(tp) > self.spec.die.memory.dram_usable_bytes:
                continue  # the decoder layers' share alone is over: no need to compile
            p = self.plan(tp, batch, prompt_len, output_len)
            if p.fits:
                return p
            last = p
        if last is None:
            raise PlanError(f"{self.shape.name}: no TP size up to {max_cards * self.spec.dies} dies "
                            f"divides its {self.shape.heads} heads and {self.shape.kv_heads} KV heads")
        raise PlanError(f"{self.shape.name} does not fit on {max_cards} x {self.spec.name} at any "
                        f"TP: at TP={last.tp} it is {last.over_bytes / GiB:.2f} GiB over per die "
                        f"({last.memory.usable / GiB:.2f} GiB usable)")

    def search(self, rps: float, ttft_ms: float, tpot_ms: float, prompt_len: int = 1024,
               output_len: int = 256, batches=DEFAULT_BATCHES, max_cards: int = 8,
               tp_sizes=None, progress=None, top: int | None = None) -> SearchResult:
        """The cheapest deployments (fewest cards, then most tokens per joule) meeting the
        TTFT and TPOT targets at `rps` requests/s. progress: a callable(description, done,
        total) the CLI draws a bar with."""
        _check_lengths(prompt_len, output_len)
        for name, v in (("rps", rps), ("ttft_ms", ttft_ms), ("tpot_ms", tpot_ms)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise PlanError(f"{name} must be a positive number, got {v!r}")
        max_dies = max_cards * self.spec.dies
        sizes = self.valid_tp(max_dies) if tp_sizes is None else sorted(tp_sizes)
        result = SearchResult(self.shape.name, self.spec.name, rps, ttft_ms / 1e3, tpot_ms / 1e3,
                              prompt_len, output_len)
        batches = sorted(set(batches))
        for i, tp in enumerate(sizes):
            if progress:
                progress(f"TP={tp}: compiling and timing", i, len(sizes))
            pred = self.predictor(tp, batches, prompt_len + output_len)
            memory = pred.memory()
            blocks = memory.kv_blocks_total
            if blocks < pred.blocks_per_seq:
                over = memory.weights + memory.activations + pred.blocks_per_seq * memory.kv_block \
                    - memory.usable
                result.notes.append(f"TP={tp}: does not fit ({over / GiB:.2f} GiB over per die)")
                continue
            prefill = pred.ttft(prompt_len).seconds
            steps = {b: pred.tpot(b, prompt_len, output_len).seconds for b in batches}
            usable = [b for b in batches if b * pred.blocks_per_seq <= blocks]
            found = None
            for replicas in range(1, max_dies // tp + 1):
                found = _serve(rps / replicas, prefill, steps, usable, output_len,
                               ttft_ms / 1e3, tpot_ms / 1e3)
                if found is not None:
                    break
            if found is None:
                result.notes.append(f"TP={tp}: misses the SLOs on up to {max_cards} card(s)")
                continue
            batch, running, ttft, tpot, util = found
            cards = self.cards_for(tp, replicas)
            watts = cards * self.spec.power_w
            tps = rps * output_len
            result.deployments.append(Deployment(tp, replicas, cards, batch, running, ttft, tpot,
                                                 util, tps, watts, tps / watts))
        if progress:
            progress("done", len(sizes), len(sizes))
        result.deployments.sort(key=lambda d: (d.cards, -d.tokens_per_joule, d.tpot_s))
        if top is not None:
            result.deployments = result.deployments[:top]
        return result


def _serve(rate: float, prefill: float, steps: dict[int, float], batches: list[int],
           output_len: int, ttft_slo: float, tpot_slo: float, slots: int | None = None):
    """(max batch, running, TTFT, TPOT, prefill utilization) of one replica at `rate`
    requests/s with the smallest max batch (sequence slots) that meets the SLOs (or with
    `slots` of them), or None when it cannot keep up or misses an SLO (see the module
    docstring)."""
    rho = rate * prefill
    if rho >= 1.0 or not batches:
        return None
    running, bucket = 1.0, batches[0]
    for _ in range(50):  # fixed point: more running sequences -> bigger bucket -> slower steps
        bucket = next((b for b in batches if b >= math.ceil(running - 1e-9)), None)
        if bucket is None:
            return None
        new = max(1.0, rate * output_len * steps[bucket] / (1.0 - rho))
        if abs(new - running) < 1e-6:
            break
        running = new
    bucket = next((b for b in batches if b >= math.ceil(running - 1e-9)), None)
    if bucket is None:
        return None
    tpot = steps[bucket] / (1.0 - rho)
    if tpot > tpot_slo:
        return None
    base = prefill + steps[bucket] / 2 + rho * prefill / (2 * (1.0 - rho))
    for slots in ([slots] if slots is not None else [b for b in batches if b >= bucket]):
        if slots < bucket:
            return None
        # every slot busy: a new request waits for a sequence to finish (Erlang C, each slot
        # held for the output's decode time)
        ttft = base + _slot_wait(slots, running, output_len * tpot)
        if ttft <= ttft_slo:
            return slots, running, ttft, tpot, rho
    return None


def _slot_wait(slots: int, offered: float, hold_s: float) -> float:
    """Mean wait for one of `slots` sequence slots when `offered` are busy on average and each
    is held `hold_s` (M/M/c, Erlang C)."""
    if offered >= slots:
        return math.inf
    erlang_b = 1.0
    for k in range(1, slots + 1):
        erlang_b = offered * erlang_b / (k + offered * erlang_b)
    erlang_c = erlang_b / (1.0 - offered / slots * (1.0 - erlang_b))
    return erlang_c * hold_s / (slots - offered)


def _check_lengths(prompt_len: int, output_len: int) -> None:
    for name, v in (("prompt_len", prompt_len), ("output_len", output_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlanError(f"{name} must be a positive integer, got {v!r}")


def plan(config, hardware: str = "RBLN-CA25", tp: int | None = None, batch=1,
         prompt_len: int = 1024, output_len: int = 256, dtype: str = "float16",
         cards: int | None = None, exact: bool = False) -> Plan:
    """One deployment's plan for a Hugging Face config (path to config.json or its folder)."""
    return Planner(config, hardware, dtype, exact=exact).plan(tp, batch, prompt_len, output_len,
                                                             cards)


def search(config, rps: float, ttft_ms: float, tpot_ms: float, hardware: str = "RBLN-CA25",
           prompt_len: int = 1024, output_len: int = 256, dtype: str = "float16",
           max_cards: int = 8, **kwargs) -> SearchResult:
    return Planner(config, hardware, dtype).search(rps, ttft_ms, tpot_ms, prompt_len, output_len,
                                                   max_cards=max_cards, **kwargs)


def min_cards(config, hardware: str = "RBLN-CA25", prompt_len: int = 1024, output_len: int = 256,
              dtype: str = "float16", max_cards: int = 8) -> Plan:
    return Planner(config, hardware, dtype).min_cards(prompt_len, output_len, max_cards=max_cards)
