"""Capacity plans for encoder models (BERT, RoBERTa, XLM-R, DistilBERT, a T5 encoder) from a config.

An encoder has no KV cache and no decode loop: one call maps a batch of sequences to hidden
states, so a plan asks how long one call takes per (batch, sequence length) bucket, how many
sequences and tokens per second a die serves, what bounds each bucket, and whether weights and
activations fit one die. The model is transformers' own class for the config's `model_type`
(`AutoModel`'s base model, `T5EncoderModel` for `t5`), built on the meta device and compiled by
the same compiler as every run, one shape bucket per (batch, length), then timed by the event
engine. Every encoder layer is the same, so, as for decoders, 1 and 2 layers are compiled and N
extrapolated (`exact=True` compiles all of them).

Model types other than the tested ones are refused unless `allow_untested=True`: then any
config whose class transformers' `AutoModel` maps to a base (not causal-LM) model is built and
compiled, and a graph the compiler cannot lower is a PlanError naming the op and the model type
(`explain_compile_error`).

Serving at a request rate (`search`): each replica runs batches of up to `b` requests back to
back; a batch of `b` sequences takes `L(b)`, so a replica serves at most `b / L(b)` requests/s.
With arrival rate `l` per replica, utilization `rho = l * L(b) / b`, the mean latency is
`L(b)` (the request's own batch) + `L(b) / 2` (the batch in flight when it arrives) +
`rho * L(b) / (2 (1 - rho))` (M/D/1 queueing of batches): a steady-state estimate, a mean.
"""
from __future__ import annotations

import inspect
import linecache
import math
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..errors import CompileError, PlanError
from ..npu import load_spec
from ..npu.spec import GiB, ProductSpec
from .model import DTYPES, read_table  # noqa: F401  (read_table: re-exported for the CLI)
from .predict import Breakdown, PhaseTime

# model_type -> transformers class: the encoders the planner is tested on.
ENCODERS = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel",
            "distilbert": "DistilBertModel", "t5": "T5EncoderModel", "electra": "ElectraModel",
            "albert": "AlbertModel"}
DEFAULT_SEQ_LENS = (128,)
DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64)
_DROP = ("model_type", "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map",
         "quantization_config")


def untested_encoder_class(model_type: str) -> str | None:
    """transformers' base-model class for a model_type outside ENCODERS, when AutoModel maps it
    and it is not a causal LM (those are planned as decoders); None otherwise."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_MAPPING_NAMES)

    try:
        AutoConfig.for_model(model_type)
    except (ValueError, KeyError):
        return None
    name = MODEL_MAPPING_NAMES.get(model_type)
    if not isinstance(name, str) or model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return None
    return name


def is_encoder(table: dict, allow_untested: bool = False) -> bool:
    """Whether the planner plans this config as an encoder."""
    model_type = table.get("model_type")
    if model_type in ENCODERS:
        return True
    return bool(allow_untested and isinstance(model_type, str) and untested_encoder_class(model_type))


def encoder_class_name(table: dict, allow_untested: bool = False) -> str:
    model_type = table.get("model_type")
    if model_type is None:
        raise PlanError("the config has no 'model_type'; a Hugging Face config names its "
                        f"architecture there (encoders: {', '.join(sorted(ENCODERS))})")
    if model_type in ENCODERS:  # a t5 config (encoder-decoder or not) is planned as its encoder
        return ENCODERS[model_type]
    if allow_untested:
        name = untested_encoder_class(model_type)
        if name:
            return name
        raise PlanError(f"model_type {model_type!r}: transformers maps no base (non-causal-LM) "
                        "model class to it, so it cannot be planned as an encoder")
    hint = (" (transformers knows it: --allow-untested / allow_untested=True builds and compiles "
            "it anyway)" if untested_encoder_class(model_type) else "")
    raise PlanError(f"model_type {model_type!r} is not a tested encoder; tested encoders: "
                    f"{', '.join(sorted(ENCODERS))}{hint}")


def hf_config(table: dict, num_layers: int | None = None):
    """transformers' config object for the table, optionally with fewer layers (through the
    config's own attribute map: `n_layers` for DistilBERT, `num_layers` for T5)."""
    from transformers import AutoConfig

    values = {k: v for k, v in table.items() if not k.startswith("_") and k not in _DROP}
    try:
        config = AutoConfig.for_model(table["model_type"], **values)
    except (TypeError, ValueError, KeyError) as e:
        raise PlanError(f"transformers rejects the {table['model_type']} config: {e}") from None
    if table["model_type"] == "t5":
        config.is_encoder_decoder, config.use_cache = False, False
    if num_layers is not None:
        if not hasattr(config, "num_hidden_layers"):
            raise PlanError(f"{table['model_type']}: its config names no layer count "
                            "(num_hidden_layers); plan it with exact=True")
        config.num_hidden_layers = num_layers
    return config


def layer_count(table: dict) -> int:
    return int(hf_config(table).num_hidden_layers)


def build_meta_encoder(table: dict, num_layers: int | None = None, allow_untested: bool = False):
    """transformers' encoder for the config on the meta device, in FP32 (the compiler casts to
    the device dtype, as optimum.rbln compiles a checkpoint loaded in FP32)."""
    import transformers

    cls = getattr(transformers, encoder_class_name(table, allow_untested))
    config = hf_config(table, num_layers)
    if "attn_implementation" not in table:
        config._attn_implementation = "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"
    with torch.device("meta"):
        try:
            return cls(config).float().eval()
        except (TypeError, ValueError, NotImplementedError) as e:
            raise PlanError(f"transformers cannot build {cls.__name__} from the "
                            f"{table['model_type']} config: {e}") from None


def encoder_inputs(model, batch: int, seq_len: int) -> list[torch.Tensor]:
    """Meta token ids (and an attention mask when forward's second parameter takes one)."""
    names = list(inspect.signature(model.forward).parameters)
    if not names or names[0] != "input_ids":
        raise PlanError(f"{type(model).__name__}.forward does not take input_ids first; "
                        "the planner feeds encoders token ids")
    ids = torch.empty(batch, seq_len, dtype=torch.long, device="meta")
    if len(names) > 1 and names[1] == "attention_mask":
        return [ids, torch.empty(batch, seq_len, dtype=torch.long, device="meta")]
    return [ids]


def explain_compile_error(e: BaseException, model_type: str, cls: str) -> PlanError:
    """A PlanError naming the op the compiler cannot lower and the model type. The compiler's
    own errors already name the node and op; a capture that fails because the model branches on
    tensor data (torch.export's data-dependent guard) is traced to the source line and to the op
    that reads the value back (`Tensor.item()`, aten._local_scalar_dense)."""
    text = str(e)
    cause = e.__cause__
    if cause is not None and type(cause).__name__ == "GuardOnDataDependentSymNode":
        where = re.search(r"Caused by: \(?(\S+?):(\d+) in (\w+)\)?", str(cause))
        line = ""
        if where:
            path, lineno, fn = where.group(1), int(where.group(2)), where.group(3)
            full = _site_file(path)
            code = linecache.getline(full, lineno).strip() if full else ""
            line = f" at {path}:{lineno} in {fn}" + (f" (`{code}`)" if code else "")
        return PlanError(
            f"model_type {model_type!r} ({cls}): the compiler cannot lower op "
            f"aten._local_scalar_dense (Tensor.item()): the graph branches on a value read back "
            f"from a tensor{line}; compiled graphs are static (no data-dependent control flow)")
    op = re.search(r"op (\S+) has no device kernel", text)
    if op:
        return PlanError(f"model_type {model_type!r} ({cls}): the compiler cannot lower op "
                         f"{op.group(1)}: {text}")
    return PlanError(f"model_type {model_type!r} ({cls}): the compiler cannot lower it: {text}")


def _site_file(path: str) -> str | None:
    """The file a torch message's shortened path (transformers/models/...) names."""
    import importlib.util

    top = path.split("/", 1)[0]
    spec = importlib.util.find_spec(top) if top.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        return None
    full = Path(list(spec.submodule_search_locations)[0]).parent / path
    return str(full) if full.is_file() else None


# ---- prediction -------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncoderMemory:
    """Device DRAM one die holds, bytes."""

    weights: int
    activations: int  # peak live activations over every bucket's graph
    usable: int

    @property
    def fits(self) -> bool:
        return self.weights + self.activations <= self.usable

    @property
    def over_bytes(self) -> int:
        return max(0, self.weights + self.activations - self.usable)


class EncoderPredictor:
    """Compiles an encoder config at one hardware / TP / dtype for (batch, seq_len) buckets."""

    def __init__(self, config, hardware: str | ProductSpec = "RBLN-CA25", tp: int = 1,
                 dtype: str = "float16", *, batches=(1,), seq_lens=DEFAULT_SEQ_LENS,
                 exact: bool = False, allow_untested: bool = False):
        self.table = read_table(config)
        self.cls = encoder_class_name(self.table, allow_untested)
        self.allow_untested = allow_untested
        self.spec = hardware if isinstance(hardware, ProductSpec) else load_spec(hardware)
        if dtype not in DTYPES:
            raise PlanError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise PlanError(f"tp must be a positive integer, got {tp!r}")
        self.dtype, self.tp, self.exact = dtype, tp, exact
        self.batches = _positive_sorted(batches, "batch buckets")
        self.seq_lens = _positive_sorted(seq_lens, "sequence lengths")
        limit = self.table.get("max_position_embeddings") or self.table.get("n_positions")
        if isinstance(limit, int) and self.table.get("model_type") != "t5" and self.seq_lens[-1] > limit:
            raise PlanError(f"sequence length {self.seq_lens[-1]} exceeds the model's "
                            f"max_position_embeddings {limit}")
        self.layers = layer_count(self.table)
        self._times: dict = {}

    @property
    def layer_counts(self) -> tuple[int, ...]:
        n = self.layers
        return (n,) if self.exact or n <= 2 else (1, 2)

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return [(b, s) for s in self.seq_lens for b in self.batches]

    @cached_property
    def _compiled(self) -> dict[int, dict[tuple[int, int], object]]:
        """layers -> (batch, seq_len) -> Program."""
        from ..compiler.compile import compile_module

        out = {}
        for layers in self.layer_counts:
            model = build_meta_encoder(self.table, layers, self.allow_untested)
            inputs = [encoder_inputs(model, b, s) for b, s in self.buckets]
            try:
                compiled = _quiet(lambda: compile_module(
                    model, inputs, npu=self.spec.source or self.spec.name, device_dtype=self.dtype,
                    tensor_parallel_size=self.tp, progress=False))
            except CompileError as e:
                raise explain_compile_error(e, self.table["model_type"], self.cls) from e
            out[layers] = dict(zip(self.buckets, compiled.buckets))
        return out

    def _time(self, layers: int, bucket: tuple[int, int]) -> PhaseTime:
        from ..device.engine import EventEngine
        from ..runtime.timeline import build_steps, group_link
        from .predict import _breakdown

        key = (layers, bucket)
        if key not in self._times:
            program = self._compiled[layers][bucket]
            group = tuple(range(self.tp))
            engine = EventEngine(self.spec, 0, group=group, link=group_link(group, self.spec))
            steps = build_steps(program, self.spec)
            timeline = engine.run(steps)
            self._times[key] = PhaseTime(timeline.latency_s,
                                         *_breakdown(program, steps, timeline.events, self.spec))
        return self._times[key]

    def call(self, batch: int, seq_len: int) -> PhaseTime:
        """One call of `batch` sequences of `seq_len` tokens, in the smallest bucket holding it
        (padding rows and tokens computed like real ones)."""
        b = next((x for x in self.batches if x >= batch), None)
        s = next((x for x in self.seq_lens if x >= seq_len), None)
        if b is None or s is None or batch < 1 or seq_len < 1:
            raise PlanError(f"({batch}, {seq_len}) is outside the buckets: batch 1..{self.batches[-1]}, "
                            f"sequence length 1..{self.seq_lens[-1]}")
        counts = self.layer_counts
        if len(counts) == 1:
            return self._time(counts[0], (b, s))
        one, two = (self._time(n, (b, s)) for n in counts)
        extra = self.layers - 1
        return one.combine(two, 1.0 - extra, float(extra))

    def memory(self) -> EncoderMemory:
        from ..runtime.runtime import activation_bytes

        per_depth = {}
        for layers, programs in self._compiled.items():
            p = next(iter(programs.values()))
            per_depth[layers] = (p.weight_bytes, max(activation_bytes(q) for q in programs.values()))
        counts = self.layer_counts
        if len(counts) == 1:
            weights, acts = per_depth[counts[0]]
        else:
            (w1, _), (w2, acts) = per_depth[1], per_depth[2]
            weights = w1 + (self.layers - 1) * (w2 - w1)
        return EncoderMemory(weights, acts, self.spec.die.memory.dram_usable_bytes)


# ---- plans ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncoderPoint:
    """One (batch, sequence length) bucket, every replica running it back to back."""

    batch: int
    seq_len: int
    latency_s: float
    sequences_per_s: float     # all replicas
    tokens_per_s: float
    sequences_per_joule: float
    tokens_per_joule: float
    breakdown: Breakdown

    @property
    def bottleneck(self) -> str:
        return self.breakdown.bottleneck


@dataclass(frozen=True)
class EncoderPlan:
    model: str
    model_type: str
    model_class: str
    hardware: str
    tp: int
    cards: int
    replicas: int
    dtype: str
    memory: EncoderMemory
    points: tuple[EncoderPoint, ...]
    watts: float
    spec_file: str
    exact: bool = False

    @property
    def fits(self) -> bool:
        return self.memory.fits

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = "encoder"
        d["memory"] = {**asdict(self.memory), "fits": self.memory.fits,
                       "over_bytes": self.memory.over_bytes}
        d["points"] = [{**{k: v for k, v in asdict(p).items() if k != "breakdown"},
                        "breakdown": p.breakdown.as_dict(), "bottleneck": p.bottleneck}
                       for p in self.points]
        d["fits"] = self.fits
        return d

    def __repr__(self) -> str:
        m = self.memory
        lines = [f"EncoderPlan({self.model}, {self.model_class}, {self.dtype}, {self.hardware} "
                 f"x{self.cards}, TP={self.tp}, {self.replicas} replica(s))",
                 f"  {'fits' if self.fits else 'DOES NOT FIT'}: weights {m.weights / GiB:.2f} + "
                 f"activations {m.activations / GiB:.2f} GiB of {m.usable / GiB:.2f} GiB per die"]
        for p in self.points:
            lines.append(f"  batch {p.batch:>3} x {p.seq_len:>4} tokens: {p.latency_s * 1e3:.2f} ms, "
                         f"{p.sequences_per_s:.1f} seq/s, {p.tokens_per_s:.0f} tok/s, "
                         f"{p.tokens_per_joule:.1f} tok/J (bound by {p.bottleneck})")
        lines.append(f"  {self.watts:.0f} W at TDP")
        return "\n".join(lines)


@dataclass(frozen=True)
class EncoderDeployment:
    tp: int
    replicas: int
    cards: int
    batch: int
    seq_len: int
    latency_s: float           # mean, under load
    utilization: float
    sequences_per_s: float     # the request rate served
    tokens_per_s: float
    watts: float
    sequences_per_joule: float
    tokens_per_joule: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EncoderSearch:
    model: str
    hardware: str
    rps: float
    latency_slo_s: float
    seq_len: int
    deployments: list[EncoderDeployment] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "deployments"}, "kind": "encoder",
                "deployments": [d.to_dict() for d in self.deployments]}

    def __repr__(self) -> str:
        head = (f"search({self.model} on {self.hardware}: {self.rps:g} req/s of {self.seq_len} "
                f"tokens, latency <= {self.latency_slo_s * 1e3:g} ms)")
        if not self.deployments:
            return "\n".join([head, "  no deployment meets the SLO", *("  " + n for n in self.notes)])
        return "\n".join([head, *(f"  {d.cards} card(s): TP={d.tp} x {d.replicas}, batch {d.batch}, "
                                  f"{d.latency_s * 1e3:.1f} ms, {d.sequences_per_joule:.2f} seq/J"
                                  for d in self.deployments)])


class EncoderPlanner:
    """Plans for one encoder config on one product; predictors are reused across calls."""

    def __init__(self, config, hardware: str | ProductSpec = "RBLN-CA25", dtype: str = "float16",
                 *, exact: bool = False, allow_untested: bool = False):
        self.table = read_table(config)
        self.cls = encoder_class_name(self.table, allow_untested)
        self.spec = hardware if isinstance(hardware, ProductSpec) else load_spec(hardware)
        if self.spec.power_w is None:
            raise PlanError(f"{self.spec.source} gives no power_w for {self.spec.name}; the plan's "
                            "watts and per-joule figures need the card's TDP in the spec file")
        self.dtype, self.exact, self.allow_untested = dtype, exact, allow_untested
        self.heads = hf_config(self.table).num_attention_heads
        self._predictors: dict = {}

    @property
    def name(self) -> str:
        return str(self.table.get("_name", self.table.get("model_type")))

    def predictor(self, tp: int, batches, seq_lens) -> EncoderPredictor:
        key = (tp, tuple(sorted(set(batches))), tuple(sorted(set(seq_lens))))
        if key not in self._predictors:
            self._predictors[key] = EncoderPredictor(
                self.table, self.spec, tp, self.dtype, batches=key[1], seq_lens=key[2],
                exact=self.exact, allow_untested=self.allow_untested)
        return self._predictors[key]

    def valid_tp(self, max_dies: int) -> list[int]:
        return [t for t in range(1, max_dies + 1) if self.heads % t == 0 and (t & (t - 1)) == 0]

    def plan(self, tp: int = 1, batch=1, seq_len=DEFAULT_SEQ_LENS, cards: int | None = None) -> EncoderPlan:
        batches = _positive_sorted([batch] if isinstance(batch, int) else batch, "batch buckets")
        seq_lens = _positive_sorted([seq_len] if isinstance(seq_len, int) else seq_len,
                                    "sequence lengths")
        if tp not in self.valid_tp(tp):
            raise PlanError(f"TP={tp} must be a power of two dividing the model's {self.heads} heads")
        need = math.ceil(tp / self.spec.dies)
        cards = need if cards is None else cards
        if isinstance(cards, bool) or not isinstance(cards, int) or cards < need:
            raise PlanError(f"TP={tp} spans {need} card(s) of {self.spec.dies} dies; cards={cards!r} "
                            "is too few")
        replicas = cards * self.spec.dies // tp
        pred = self.predictor(tp, batches, seq_lens)
        watts = cards * self.spec.power_w
        points = []
        for s in seq_lens:
            for b in batches:
                t = pred.call(b, s)
                seqs = replicas * b / t.seconds
                points.append(EncoderPoint(b, s, t.seconds, seqs, seqs * s, seqs / watts,
                                           seqs * s / watts, t.breakdown))
        return EncoderPlan(self.name, self.table["model_type"], self.cls, self.spec.name, tp, cards,
                           replicas, self.dtype, pred.memory(), tuple(points), watts,
                           self.spec.source, self.exact)

    def search(self, rps: float, latency_ms: float, seq_len: int = 128,
               batches=DEFAULT_BATCHES, max_cards: int = 8, tp_sizes=None,
               top: int | None = None, progress=None) -> EncoderSearch:
        """The cheapest deployments (fewest cards, then most sequences per joule) serving `rps`
        requests/s of `seq_len` tokens with a mean latency within `latency_ms` (module doc)."""
        for name, v in (("rps", rps), ("latency_ms", latency_ms)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise PlanError(f"{name} must be a positive number, got {v!r}")
        max_dies = max_cards * self.spec.dies
        sizes = self.valid_tp(max_dies) if tp_sizes is None else sorted(tp_sizes)
        batches = _positive_sorted(batches, "batch buckets")
        result = EncoderSearch(self.name, self.spec.name, rps, latency_ms / 1e3, seq_len)
        for i, tp in enumerate(sizes):
            if progress:
                progress(f"TP={tp}: compiling and timing", i, len(sizes))
            pred = self.predictor(tp, batches, [seq_len])
            memory = pred.memory()
            if not memory.fits:
                result.notes.append(f"TP={tp}: does not fit ({memory.over_bytes / GiB:.2f} GiB over "
                                    "per die)")
                continue
            calls = {b: pred.call(b, seq_len).seconds for b in batches}
            found = None
            for replicas in range(1, max_dies // tp + 1):
                found = _serve(rps / replicas, calls, latency_ms / 1e3)
                if found:
                    break
            if not found:
                result.notes.append(f"TP={tp}: misses the SLO on up to {max_cards} card(s)")
                continue
            batch, latency, util = found
            cards = math.ceil(tp * replicas / self.spec.dies)
            watts = cards * self.spec.power_w
            result.deployments.append(EncoderDeployment(
                tp, replicas, cards, batch, seq_len, latency, util, rps, rps * seq_len, watts,
                rps / watts, rps * seq_len / watts))
        if progress:
            progress("done", len(sizes), len(sizes))
        result.deployments.sort(key=lambda d: (d.cards, -d.sequences_per_joule, d.latency_s))
        if top is not None:
            result.deployments = result.deployments[:top]
        return result


def _serve(rate: float, calls: dict[int, float], slo_s: float):
    """(batch, mean latency, utilization) of one replica at `rate` requests/s with the smallest
    batch bucket that keeps up and meets the SLO, or None (module docstring)."""
    for b in sorted(calls):
        latency = calls[b]
        rho = rate * latency / b
        if rho >= 1.0:
            continue
        mean = latency + latency / 2 + rho * latency / (2 * (1.0 - rho))
        if mean <= slo_s:
            return b, mean, rho
    return None


def _positive_sorted(values, what: str) -> tuple[int, ...]:
    out = tuple(sorted({int(v) for v in values})) if values else ()
    if not out or out[0] < 1 or any(isinstance(v, bool) for v in values):
        raise PlanError(f"{what} must be positive integers, got {list(values) if values else values!r}")
    return out


def _quiet(work):
    """Run `work()` with stderr held back: torch.export prints its partial graph there when a
    capture fails (thousands of lines), which the PlanError replaces. On success whatever was
    written is passed on."""
    import contextlib
    import io
    import sys

    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            out = work()
    except CompileError:
        raise
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
    sys.stderr.write(held.getvalue())
    return out
