"""Capacity plans: does a model fit, how fast does it serve, what does it cost, what is cheapest.

`plan()` answers for one deployment (hardware, TP size, batch buckets, card count); `search()`
tries TP sizes, batch buckets, prefill chunks and card counts and returns the cheapest
deployments that meet TTFT / TPOT targets at a request rate; `min_cards()` is the fewest cards
one copy of the model fits on. Every figure comes from the compiled graphs
(`rebel.plan.predict`) and the spec file (die DRAM, dies per card, the card's power), none from
code.

Hardware is cards of one product, up to `cards_per_server` (8 PCIe slots) per server, on as
many servers as the search is allowed (`Placement`). A tensor-parallel group stays on one card
when it fits the card's dies (the die-to-die link) and otherwise spans whole cards of one
server (the card-to-card link, as the predictor times it); it never crosses a server, since no
link between servers is modelled, so a model that needs more dies than one server holds is
refused. Replicas fill a server before the next one is used.

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
These are means. The prefill chunk c is searched too: a step carries at most c prompt tokens of
a request (vLLM's long_prefill_token_threshold) beside the decode batch, so a prompt of L
tokens takes k = ceil(L / c) steps, and TTFT gains k x T: small chunks lengthen TTFT, large
ones make the steps that carry a chunk long (decode stalls) while reading the weights fewer
times per prompt.
A replay of a request trace through vLLM's scheduler (`rebel.plan.serving.simulate`, with
`Predictor.step_cost()` for a config alone) gives percentiles where this gives means;
`search(percentile=90)` keeps only the deployments whose replay meets the SLOs at that
percentile, replaying the estimate's candidates, cheapest first, and bisecting on the card
count (`Planner.replay`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import PlanError
from ..npu import load_spec
from ..npu.spec import GiB, ProductSpec
from .model import load_config, shape_of
from .predict import DEFAULT_BATCHES, Breakdown, Memory, Predictor

DEFAULT_CHUNKS = (128, 256, 512, 1024)  # prefill chunk sizes the search tries
CARDS_PER_SERVER = 8                    # PCIe slots of one server (rebel.npu.machine.MAX_CARDS)
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Placement:
    """Where a deployment's replicas sit: per server, the cards it uses and the replicas on them.
    A replica's TP group is on one card when tp <= dies per card, else on ceil(tp / dies) whole
    cards of one server."""

    tp: int
    dies: int                             # per card
    server_cards: tuple[int, ...]         # cards used on each server
    server_replicas: tuple[int, ...]      # replicas on each server

    @property
    def servers(self) -> int:
        return len(self.server_cards)

    @property
    def cards(self) -> int:
        return sum(self.server_cards)

    @property
    def replicas(self) -> int:
        return sum(self.server_replicas)

    def groups(self) -> list[tuple[int, tuple[tuple[int, int], ...]]]:
        """Each replica's TP group as (server, its (card, die) pairs on that server)."""
        out = []
        for server, count in enumerate(self.server_replicas):
            for i in range(count):
                if self.tp <= self.dies:
                    card, slot = divmod(i, self.dies // self.tp)
                    dies = [(card, d) for d in range(slot * self.tp, (slot + 1) * self.tp)]
                else:
                    span = -(-self.tp // self.dies)
                    dies = [(i * span + d // self.dies, d % self.dies) for d in range(self.tp)]
                out.append((server, tuple(dies)))
        return out


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


class _OnServers:
    """Servers and watts of something placed on `server_cards` (cards used per server)."""

    @property
    def servers(self) -> int:
        return len(self.server_cards)

    @property
    def watts_per_server(self) -> tuple[float, ...]:
        per_card = self.watts / self.cards
        return tuple(c * per_card for c in self.server_cards)


@dataclass(frozen=True)
class Plan(_OnServers):
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
    server_cards: tuple[int, ...] = ()   # cards used on each server
    chunk: int = 128                     # prefill chunk tokens

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
        d.update(fits=self.fits, kv_blocks_left=self.kv_blocks_left, over_bytes=self.over_bytes,
                 servers=self.servers, watts_per_server=list(self.watts_per_server))
        return d

    def __repr__(self) -> str:
        m = self.memory
        head = (f"Plan({self.model}, {self.params_label()}, {self.dtype}, "
                f"{self.hardware} x{self.cards} on {self.servers} server(s), TP={self.tp}, "
                f"{self.replicas} replica(s))")
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
class Deployment(_OnServers):
    """One deployment the search found meeting the SLOs, as it runs at the request rate."""

    tp: int
    replicas: int
    cards: int
    batch: int                    # max batch: sequence slots, the largest decode bucket
    running: float                # sequences decoding at once per replica (mean)
    ttft_s: float                 # under load (estimate, mean)
    tpot_s: float                 # under load, prefill stalls included (estimate, mean)
    prefill_utilization: float
    tokens_per_s: float           # output tokens/s served (request rate x output length)
    watts: float
    tokens_per_joule: float
    chunk: int = 128              # prefill chunk tokens (at most this many per request a step)
    server_cards: tuple[int, ...] = ()  # cards used on each server
    replayed: dict | None = None  # percentile search: its replica's replay (ServingResult.summary)

    def to_dict(self) -> dict:
        return {**asdict(self), "servers": self.servers, "watts_per_server": list(self.watts_per_server)}


@dataclass
class SearchResult:
    model: str
    hardware: str
    rps: float
    ttft_slo_s: float
    tpot_slo_s: float
    prompt_len: int               # the mean of the prompt lengths (what the estimate plans with)
    output_len: int
    deployments: list[Deployment] = field(default_factory=list)  # cheapest first
    notes: list[str] = field(default_factory=list)  # why TP sizes were left out
    percentile: int | None = None  # SLOs checked at this percentile of a replay (None: on means)
    prompt_lengths: str = ""       # the distributions, as `parse_lengths` spells them
    output_lengths: str = ""
    cards_per_server: int = CARDS_PER_SERVER
    max_cards: int = CARDS_PER_SERVER
    chunks: tuple[int, ...] = ()   # prefill chunks tried (and compiled)
    replays: int = 0               # replays the percentile search ran
    replay_requests: int = 0       # requests per replay

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "deployments"},
                "deployments": [d.to_dict() for d in self.deployments]}

    def __repr__(self) -> str:
        at = "on means" if self.percentile is None else f"at p{self.percentile} of a replay"
        head = (f"search({self.model} on {self.hardware}: {self.rps:g} req/s of "
                f"{self.prompt_lengths or self.prompt_len} in / {self.output_lengths or self.output_len} "
                f"out, TTFT <= {self.ttft_slo_s * 1e3:g} ms, TPOT <= {self.tpot_slo_s * 1e3:g} ms {at})")
        if not self.deployments:
            return "\n".join([head, "  no deployment meets the SLOs", *("  " + n for n in self.notes)])
        rows = []
        for d in self.deployments:
            row = (f"  {d.cards} card(s) on {d.servers} server(s): TP={d.tp} x {d.replicas} "
                   f"replica(s), batch {d.batch}, chunk {d.chunk}, TTFT {d.ttft_s * 1e3:.3g} ms, "
                   f"TPOT {d.tpot_s * 1e3:.3g} ms, {d.tokens_per_s:.0f} tok/s, {d.watts:.0f} W, "
                   f"{d.tokens_per_joule:.2f} tok/J")
            if d.replayed and self.percentile:
                q = self.percentile
                row += (f"; replay p{q} TTFT {d.replayed[f'ttft_p{q}_s'] * 1e3:.3g} ms, "
                        f"TPOT {d.replayed[f'tpot_p{q}_s'] * 1e3:.3g} ms")
            rows.append(row)
        return "\n".join([head, *rows])


class Planner:
    """Plans for one model config on one product, reusing compiled predictors across calls
    (a search compiles each TP size once, with every prefill chunk and batch bucket).
    cards_per_server: cards one server holds (1 .. 8)."""

    def __init__(self, config, hardware: str | ProductSpec = "RBLN-CA25", dtype: str = "float16",
                 *, block_size: int = 1024, chunk: int = 128, exact: bool = False,
                 weights: str | None = None, cards_per_server: int = CARDS_PER_SERVER):
        self.config = config
        self.table = load_config(config)
        self.shape = shape_of(self.table)
        self.spec = hardware if isinstance(hardware, ProductSpec) else load_spec(hardware)
        if self.spec.power_w is None:
            raise PlanError(f"{self.spec.source} gives no power_w for {self.spec.name}; the plan's "
                            "watts and tokens per joule need the card's TDP in the spec file")
        if isinstance(cards_per_server, bool) or not isinstance(cards_per_server, int) or \
                not 1 <= cards_per_server <= CARDS_PER_SERVER:
            raise PlanError(f"cards per server must be 1 .. {CARDS_PER_SERVER} (a server's PCIe "
                            f"slots), got {cards_per_server!r}")
        self.cards_per_server = cards_per_server
        self.dtype = dtype
        self.weights = weights  # None, "int8" or "int4": weight-only quantized linears
        self.block_size = block_size
        self.chunk = chunk
        self.exact = exact
        self._predictors: dict = {}
        self._folder: str | None = None
        self._schedulers: dict = {}

    @property
    def label_dtype(self) -> str:
        return self.dtype + (f" ({self.weights} weights)" if self.weights else "")

    @property
    def server_dies(self) -> int:
        """Dies of one server: the largest TP group (no link between servers is modelled)."""
        return self.cards_per_server * self.spec.dies

    def valid_tp(self, max_dies: int) -> list[int]:
        """TP sizes the model splits into (dividing heads and KV heads), up to max_dies and
        one server's dies."""
        s = self.shape
        return [t for t in range(1, min(max_dies, self.server_dies) + 1)
                if s.heads % t == 0 and s.kv_heads % t == 0 and (t & (t - 1)) == 0]

    def predictor(self, tp: int, batches, max_seq_len: int, chunks=None) -> Predictor:
        """The compiled predictor for these buckets; chunks: prefill chunk sizes to compile
        (the largest is the predictor's chunk), default the planner's one chunk."""
        chunks = (self.chunk,) if chunks is None else tuple(sorted(set(chunks)))
        key = (tp, tuple(sorted(batches)), max_seq_len, chunks)
        if key not in self._predictors:
            self._predictors[key] = Predictor(
                self.table, self.spec, tp, self.dtype, chunk=chunks[-1], chunk_sizes=chunks,
                batches=batches, max_seq_len=max_seq_len, block_size=self.block_size,
                exact=self.exact, weights=self.weights)
        return self._predictors[key]

    def _layers_bytes(self, tp: int) -> float:
        """A lower bound of one die's weights at `tp`: its share of the decoder layers."""
        s = self.shape
        layers = s.params - s.vocab * s.hidden * (1 if s.tied_embeddings else 2)
        return layers * 2 / tp  # float16 and bfloat16 alike

    # ---- placement ------------------------------------------------------------------------

    def _per_server(self, tp: int) -> tuple[int, int]:
        """(replicas per card, cards per replica) at `tp`; one of them is 1."""
        if tp > self.server_dies:
            raise PlanError(f"TP={tp} needs more dies than one server holds ({self.cards_per_server} "
                            f"x {self.spec.name} = {self.server_dies} dies), and a TP group cannot "
                            "span servers (no link between servers is modelled)")
        dies = self.spec.dies
        return (dies // tp, 1) if tp <= dies else (1, -(-tp // dies))

    def placement(self, tp: int, replicas: int) -> Placement:
        """`replicas` TP groups on as few cards as they fit, filling each server first."""
        per_card, span = self._per_server(tp)
        per_server = self.cards_per_server * per_card // span
        cards, counts, left = [], [], replicas
        while left > 0:
            k = min(per_server, left)
            cards.append(-(-k // per_card) * span)
            counts.append(k)
            left -= k
        return Placement(tp, self.spec.dies, tuple(cards), tuple(counts))

    def placement_on(self, tp: int, cards: int) -> Placement:
        """As many replicas as `cards` cards hold (servers filled first); cards a replica's
        group cannot use (a TP group spans whole cards) stay out of the count."""
        per_card, span = self._per_server(tp)
        useful = self.cards_per_server // span * span  # the cards of a server its groups fill
        server_cards, counts, left = [], [], cards
        while left >= span:
            k = min(useful, left) // span * span
            server_cards.append(k)
            counts.append(k * per_card // span)
            left -= k
        return Placement(tp, self.spec.dies, tuple(server_cards), tuple(counts))

    def cards_for(self, tp: int, replicas: int = 1) -> int:
        return self.placement(tp, replicas).cards

    # ---- one deployment -------------------------------------------------------------------

    def plan(self, tp: int | None = None, batch=1, prompt_len: int = 1024, output_len: int = 256,
             cards: int | None = None, max_seq_len: int | None = None) -> Plan:
        """One deployment: TP size (default: one card's dies), decode batch bucket(s), cards
        (default: as few as one replica needs; more cards run more replicas, on more servers
        beyond `cards_per_server`). max_seq_len: the longest sequence (default prompt + output)."""
        _check_lengths(prompt_len, output_len)
        tp = self.spec.dies if tp is None else tp
        batches = sorted({batch} if isinstance(batch, int) else set(batch))
        need = self.cards_for(tp)
        cards = need if cards is None else cards
        if isinstance(cards, bool) or not isinstance(cards, int) or cards < need:
            raise PlanError(f"TP={tp} spans {need} card(s) of {self.spec.dies} dies; cards={cards!r} "
                            "is too few")
        where = self.placement_on(tp, cards)
        replicas = where.replicas
        pred = self.predictor(tp, batches, max_seq_len or prompt_len + output_len)
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
        # cards given beyond what the replicas use still count (they are bought): the last server
        server_cards = list(where.server_cards)
        server_cards[-1] += cards - where.cards
        return Plan(model=self.shape.name, params=self.shape.params, hardware=self.spec.name,
                    tp=tp, cards=cards, replicas=replicas, dtype=self.label_dtype, prompt_len=prompt_len,
                    output_len=output_len, block_size=self.block_size,
                    blocks_per_seq=pred.blocks_per_seq, memory=memory,
                    kv_blocks_needed=batches[-1] * pred.blocks_per_seq, ttft_s=ttft.seconds,
                    prefill=ttft.breakdown, decode=tuple(points), watts=watts,
                    spec_file=self.spec.source, exact=self.exact,
                    active_params=self.shape.active_params,
                    server_cards=tuple(server_cards), chunk=pred.chunk)

    def min_cards(self, prompt_len: int = 1024, output_len: int = 256, batch: int = 1,
                  max_cards: int = 8) -> Plan:
        """The plan on the fewest cards one replica fits on (smallest TP among those, within one
        server); a PlanError says by how much the model misses at the largest TP tried."""
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
        cards = min(max_cards, self.cards_per_server)
        raise PlanError(f"{self.shape.name} does not fit on {cards} x {self.spec.name} at any "
                        f"TP: at TP={last.tp} it is {last.over_bytes / GiB:.2f} GiB over per die "
                        f"({last.memory.usable / GiB:.2f} GiB usable)"
                        + ("" if cards == max_cards else
                           f"; a TP group stays within one server of {self.cards_per_server} cards"))

    # ---- replay ---------------------------------------------------------------------------

    def config_folder(self) -> str:
        """A folder holding the config.json vLLM reads: the config's own, or a temporary copy."""
        import json
        import tempfile
        from pathlib import Path

        if self._folder is None:
            path = None if isinstance(self.config, dict) else Path(self.config)
            if path is not None and path.is_dir():
                self._folder = str(path)
            elif path is not None and path.name == "config.json":
                self._folder = str(path.parent)
            else:
                folder = Path(tempfile.mkdtemp(prefix="rbln-plan-"))
                (folder / "config.json").write_text(json.dumps(self.table))
                self._folder = str(folder)
        return self._folder

    def replay(self, tp: int, batches, max_seq_len: int, trace, chunk: int | None = None,
               chunks=None, slots: int | None = None, progress: bool = False):
        """One replica at `tp` with these batch buckets and the KV blocks its dies hold, serving
        `trace` through vLLM's scheduler (`rebel.plan.serving.simulate`). slots: its sequence
        slots (default the largest bucket); chunk: the prefill chunk, also the most prompt
        tokens of a request per step (default: the planner's one chunk, a step taking what
        vLLM's token budget allows); chunks: the chunk sizes the predictor compiles."""
        import contextlib
        import sys

        from .serving import scheduler_config, simulate

        batches = sorted(set(batches))
        slots = batches[-1] if slots is None else slots
        if slots not in batches:
            raise PlanError(f"slots={slots} is not one of the batch buckets {batches}")
        pred = self.predictor(tp, batches, max_seq_len, chunks)
        blocks = pred.memory().kv_blocks_total
        if blocks < pred.blocks_per_seq:
            raise PlanError(f"the KV cache holds {blocks} blocks, fewer than one sequence of "
                            f"{pred.max_seq_len} tokens needs ({pred.blocks_per_seq})")
        cost = ChunkStepCost(pred, chunk or pred.chunk, slots)
        key = (slots, pred.max_seq_len, pred.block_size, blocks, chunk)
        with contextlib.redirect_stdout(sys.stderr):  # vLLM logs to stdout: keep it for answers
            if key not in self._schedulers:  # vLLM builds a configuration in seconds: once each
                self._schedulers[key] = scheduler_config(
                    self.config_folder(), max_num_seqs=slots, max_model_len=pred.max_seq_len,
                    block_size=pred.block_size, num_blocks=blocks, prefill_chunk=chunk)
            vllm_config, kv = self._schedulers[key]
            return simulate(trace, cost, vllm_config, kv, progress=progress)

    # ---- search ---------------------------------------------------------------------------

    def search(self, rps: float, ttft_ms: float, tpot_ms: float, prompt_len=1024,
               output_len=256, batches=DEFAULT_BATCHES, max_cards: int | None = None,
               tp_sizes=None, progress=None, top: int | None = None, *, servers: int | None = None,
               chunks=DEFAULT_CHUNKS, percentile: int | None = None, replay_requests: int = 200,
               seed: int = 0) -> SearchResult:
        """The cheapest deployments (fewest cards, then most tokens per joule) meeting the
        TTFT and TPOT targets at `rps` requests/s, one per TP size, each with its batch (sequence
        slots), prefill chunk and card count.

        prompt_len / output_len: a length, or a distribution (`rebel.plan.serving.Lengths` or its
        spelling, e.g. "512:2048"): the estimate plans with the means, a replay draws from it.
        max_cards / servers: the most cards to use (default one server, `cards_per_server`; or
        `servers` x `cards_per_server`). percentile (50, 90, 99): keep only deployments whose
        replica, replaying `replay_requests` Poisson requests through vLLM's scheduler, meets
        both SLOs at that percentile; the estimate's cheapest candidates are replayed first and
        the card count is bisected upwards from the estimate's. progress: a
        callable(description, done, total) the CLI draws a bar with."""
        from .serving import parse_lengths

        prompts, outputs = parse_lengths(prompt_len, "prompt length"), parse_lengths(output_len, "output length")
        mean_prompt, mean_output = max(1, round(prompts.mean)), max(1, round(outputs.mean))
        max_seq_len = prompts.high + outputs.high
        for name, v in (("rps", rps), ("ttft_ms", ttft_ms), ("tpot_ms", tpot_ms)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise PlanError(f"{name} must be a positive number, got {v!r}")
        if percentile is not None and percentile not in PERCENTILES:
            raise PlanError(f"the SLO percentile must be one of {', '.join(map(str, PERCENTILES))}, "
                            f"got {percentile!r}")
        if percentile is not None and (isinstance(replay_requests, bool) or
                                       not isinstance(replay_requests, int) or replay_requests < 10):
            raise PlanError(f"a percentile search replays >= 10 requests per deployment, got "
                            f"{replay_requests!r}")
        if servers is not None and (isinstance(servers, bool) or not isinstance(servers, int) or servers < 1):
            raise PlanError(f"servers must be a positive integer, got {servers!r}")
        limit = max_cards if max_cards is not None else \
            (servers or 1) * self.cards_per_server
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise PlanError(f"max_cards must be a positive integer, got {max_cards!r}")
        if servers is not None:
            limit = min(limit, servers * self.cards_per_server)
        chunks = sorted({int(c) for c in chunks})
        if not chunks or chunks[0] < 1:
            raise PlanError(f"prefill chunks must be positive integers, got {chunks!r}")
        # a chunk beyond the longest prompt adds nothing the next smaller one does not
        chunks = [c for c in chunks if c < prompts.high] + [c for c in chunks if c >= prompts.high][:1]
        sizes = self.valid_tp(limit * self.spec.dies) if tp_sizes is None else sorted(tp_sizes)
        for tp in sizes:
            self._per_server(tp)  # a clear error for a TP group larger than a server
        tpot_slo, ttft_slo = tpot_ms / 1e3, ttft_ms / 1e3
        result = SearchResult(self.shape.name, self.spec.name, rps, ttft_slo, tpot_slo,
                              mean_prompt, mean_output, percentile=percentile,
                              prompt_lengths=str(prompts), output_lengths=str(outputs),
                              cards_per_server=self.cards_per_server, max_cards=limit,
                              replay_requests=replay_requests if percentile else 0,
                              chunks=tuple(chunks))
        batches = sorted(set(batches))
        where_limit = (f"{limit} card(s)" + (f" ({-(-limit // self.cards_per_server)} server(s) of "
                                             f"{self.cards_per_server})" if limit > self.cards_per_server else ""))
        steps_done, steps_total = 0, len(sizes) * (2 if percentile else 1)
        replays: dict = {}
        for tp in sizes:
            if progress:
                progress(f"TP={tp}: compiling and timing", steps_done, steps_total)
            pred = self.predictor(tp, batches, max_seq_len, chunks)
            memory = pred.memory()
            blocks = memory.kv_blocks_total
            steps_done += 1
            if blocks < pred.blocks_per_seq:
                over = memory.weights + memory.activations + pred.blocks_per_seq * memory.kv_block \
                    - memory.usable
                result.notes.append(f"TP={tp}: does not fit ({over / GiB:.2f} GiB over per die)")
                steps_done += bool(percentile)
                continue
            steps = {b: pred.tpot(b, mean_prompt, mean_output).seconds for b in batches}
            usable = [b for b in batches if b * pred.blocks_per_seq <= blocks]
            ladder = self._ladder(tp, limit)  # (cards, placement), more cards each
            estimates = {}  # chunk -> (index in ladder, _serve's answer) of the first that meets
            for c in chunks:
                prefill = _ttft_at(pred, mean_prompt, c)
                k = -(-mean_prompt // c)
                for i, (cards, where) in enumerate(ladder):
                    found = _serve(rps / where.replicas, prefill, steps, usable, mean_output,
                                   ttft_slo, tpot_slo, steps_per_prefill=k)
                    if found is not None:
                        estimates[c] = (i, found)
                        break
            if percentile is None:
                if not estimates:
                    result.notes.append(f"TP={tp}: misses the SLOs on up to {where_limit}")
                    continue
                c = min(estimates, key=lambda c: (estimates[c][0], _margin(estimates[c][1], ttft_slo, tpot_slo)))
                i, found = estimates[c]
                result.deployments.append(self._deployment(tp, c, ladder[i][1], found, rps, mean_output))
                continue
            # percentile: replay the estimate's candidates, cheapest first, then bisect upwards
            stable = self._first_stable(ladder, rps, pred, mean_prompt, steps, usable, mean_output, chunks)
            if stable is None:
                result.notes.append(f"TP={tp}: cannot keep up with {rps:g} req/s on up to {where_limit}")
                steps_done += 1
                continue
            slots = usable[-1]

            def passes(c, i):
                key = (tp, c, i)
                if key not in replays:
                    cards, where = ladder[i]
                    if progress:
                        progress(f"TP={tp}: replaying chunk {c} on {cards} card(s) "
                                 f"({len(replays) + 1} replays)", steps_done, steps_total)
                    trace = _poisson(replay_requests, rps / where.replicas, prompts, outputs, seed)
                    served = self.replay(tp, batches, max_seq_len, trace, chunk=c, chunks=chunks,
                                         slots=slots)
                    summary = served.summary()
                    replays[key] = summary
                s = replays[key]
                return (s[f"ttft_p{percentile}_s"] <= ttft_slo and s[f"tpot_p{percentile}_s"] <= tpot_slo)

            # the lower bound: where the estimate meets the SLOs on means (p90 and p99 sit above
            # the means), or, at p50, where a replica keeps up at all
            if percentile >= 90:
                lows = {c: estimates[c][0] for c in estimates}
                order = sorted(lows, key=lambda c: (lows[c], _margin(estimates[c][1], ttft_slo, tpot_slo)))
            else:
                lows = stable
                order = sorted(lows, key=lambda c: (lows[c], -c))
            chosen = None
            if order:
                low = lows[order[0]]
                for c in order:  # every candidate at the cheapest card count first
                    if lows[c] > low:
                        break
                    if passes(c, low):
                        chosen = (c, low)
                        break
                if chosen is None:
                    # the candidate whose replay came closest, on more cards: gallop, then bisect
                    tried = [c for c in order if (tp, c, low) in replays]
                    best = min(tried, key=lambda c: _replay_margin(replays[(tp, c, low)], percentile,
                                                                   ttft_slo, tpot_slo))
                    failed, step, hit = low, 1, None
                    while failed < len(ladder) - 1:
                        i = min(failed + step, len(ladder) - 1)
                        if passes(best, i):
                            hit = i
                            break
                        failed, step = i, step * 2
                    if hit is not None:
                        while hit - failed > 1:
                            mid = (failed + hit) // 2
                            if passes(best, mid):
                                hit = mid
                            else:
                                failed = mid
                        chosen = (best, hit)
            steps_done += 1
            if chosen is None:
                mine = [(i, c) for (t, c, i) in replays if t == tp]
                seen = ""
                if mine:  # what the replay on the most cards tried saw
                    i, c = max(mine)
                    r = replays[(tp, c, i)]
                    seen = (f" (replayed on {ladder[i][0]} card(s), chunk {c}: TTFT p{percentile} "
                            f"{r[f'ttft_p{percentile}_s'] * 1e3:.0f} ms, TPOT p{percentile} "
                            f"{r[f'tpot_p{percentile}_s'] * 1e3:.1f} ms)")
                result.notes.append(f"TP={tp}: misses the SLOs at p{percentile} on up to {where_limit}"
                                    + seen)
                continue
            c, i = chosen
            where = ladder[i][1]
            prefill = _ttft_at(pred, mean_prompt, c)
            found = _serve(rps / where.replicas, prefill, steps, usable, mean_output, math.inf,
                           math.inf, slots=slots, steps_per_prefill=-(-mean_prompt // c)) or \
                (slots, math.nan, math.nan, math.nan, rps / where.replicas * prefill)
            result.deployments.append(self._deployment(tp, c, where, found, rps, mean_output,
                                                       replays[(tp, c, i)]))
        if progress:
            progress("done", steps_total, steps_total)
        result.replays = len(replays)
        result.deployments.sort(key=lambda d: (d.cards, -d.tokens_per_joule, d.tpot_s))
        if top is not None:
            result.deployments = result.deployments[:top]
        return result

    def _ladder(self, tp: int, limit: int) -> list[tuple[int, Placement]]:
        """The card counts worth trying at `tp` up to `limit` cards (each holding more replicas
        than the one before), with their placements."""
        out, last = [], 0
        for cards in range(1, limit + 1):
            where = self.placement_on(tp, cards)
            if where.replicas > last:
                out.append((where.cards, where))
                last = where.replicas
        return out

    def _first_stable(self, ladder, rps, pred, prompt, steps, usable, output, chunks):
        """chunk -> index of the first card count whose replica keeps up (SLOs aside)."""
        out = {}
        for c in chunks:
            prefill = _ttft_at(pred, prompt, c)
            for i, (_, where) in enumerate(ladder):
                if _serve(rps / where.replicas, prefill, steps, usable, output, math.inf, math.inf,
                          steps_per_prefill=-(-prompt // c)) is not None:
                    out[c] = i
                    break
        return out or None

    def _deployment(self, tp, chunk, where: Placement, found, rps, output_len, replayed=None):
        batch, running, ttft, tpot, util = found
        watts = where.cards * self.spec.power_w
        tps = rps * output_len
        return Deployment(tp, where.replicas, where.cards, batch, running, ttft, tpot, util, tps,
                          watts, tps / watts, chunk, where.server_cards, replayed)


class ChunkStepCost:
    """`rebel.plan.serving.StepCost` at one prefill chunk of a predictor compiled with several
    (a deployment compiled with chunk c and the smaller sizes, as optimum.rbln's
    rbln_prefill_chunk_sizes), `decode_batch` rows per decode call (its sequence slots)."""

    def __init__(self, predictor: Predictor, chunk: int, decode_batch: int):
        if chunk not in predictor.chunk_sizes:
            raise PlanError(f"chunk {chunk} is not one of the predictor's compiled chunks "
                            f"{list(predictor.chunk_sizes)}")
        self.predictor, self.chunk, self.decode_batch = predictor, chunk, decode_batch

    def prefill_s(self, tokens: int, start: int) -> float:
        return self.predictor.prefill_chunk(start, tokens).seconds

    def decode_s(self, positions) -> float:
        return self.predictor.decode_at(positions).seconds

    def __repr__(self) -> str:
        return f"ChunkStepCost(chunk={self.chunk}, decode_batch={self.decode_batch})"


def _ttft_at(pred: Predictor, prompt_len: int, chunk: int) -> float:
    """The prompt's prefill chunks of `chunk` tokens in turn (the last one may be shorter and
    runs in the smallest compiled chunk that holds it)."""
    return sum(pred.prefill_chunk(s, min(chunk, prompt_len - s)).seconds
               for s in range(0, prompt_len, chunk))


def _margin(found, ttft_slo: float, tpot_slo: float) -> float:
    """How close an estimate comes to its SLOs (the larger ratio; lower is safer)."""
    return max(found[2] / ttft_slo, found[3] / tpot_slo)


def _replay_margin(summary: dict, q: int, ttft_slo: float, tpot_slo: float) -> float:
    return max(summary[f"ttft_p{q}_s"] / ttft_slo, summary[f"tpot_p{q}_s"] / tpot_slo)


def _poisson(n, rate, prompts, outputs, seed):
    from .serving import poisson_trace
    return poisson_trace(n, rate, prompts, outputs, seed=seed)


def _serve(rate: float, prefill: float, steps: dict[int, float], batches: list[int],
           output_len: int, ttft_slo: float, tpot_slo: float, slots: int | None = None,
           steps_per_prefill: int = 0):
    """(max batch, running, TTFT, TPOT, prefill utilization) of one replica at `rate`
    requests/s with the smallest max batch (sequence slots) that meets the SLOs (or with
    `slots` of them), or None when it cannot keep up or misses an SLO (see the module
    docstring). steps_per_prefill: the steps a prompt's chunks take, each also running the
    decode batch (0: the decode batch's time is not added)."""
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
    base = prefill + steps[bucket] * (0.5 + steps_per_prefill) + rho * prefill / (2 * (1.0 - rho))
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
           prompt_len=1024, output_len=256, dtype: str = "float16",
           max_cards: int | None = None, cards_per_server: int = CARDS_PER_SERVER,
           **kwargs) -> SearchResult:
    return Planner(config, hardware, dtype, cards_per_server=cards_per_server).search(
        rps, ttft_ms, tpot_ms, prompt_len, output_len, max_cards=max_cards, **kwargs)


def min_cards(config, hardware: str = "RBLN-CA25", prompt_len: int = 1024, output_len: int = 256,
              dtype: str = "float16", max_cards: int = 8) -> Plan:
    return Planner(config, hardware, dtype).min_cards(prompt_len, output_len, max_cards=max_cards)
