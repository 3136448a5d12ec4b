"""Serving simulation: a request trace replayed through vLLM's own scheduler in virtual time.

Each engine step is what `vllm_rbln` would run: vLLM's scheduler (its v1 `Scheduler`, unchanged:
chunked prefill, token budget, KV-block allocation, preemption, prefix caching) picks the step's
tokens; the step then costs the predicted NPU time of the compiled graphs that step would call,
and nothing is computed. The clock jumps by that time, requests arrive when the clock passes
their arrival, and each request's tokens are stamped with the clock of the step that produced
them, which gives TTFT and time per output token exactly as a served model would show them on
the chip. Sampled tokens do not matter to the schedule (requests run to their output length with
`ignore_eos`), so the simulation hands the scheduler a fixed token.

The cost of a step (`StepCost`) follows `vllm_rbln`'s model runner: every request scheduled more
than one token runs its tokens as prefill chunks of at most `chunk` tokens, one graph call each;
every request scheduled one token joins the step's decode batch, `decode_batch` rows per call.
`vllm_rbln.replay` serves the same trace for real, in the same virtual time, for comparison.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import InputError, PlanError

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: when it arrives (seconds from the trace's start), how many prompt
    tokens it brings and how many tokens it generates."""

    arrival_s: float
    prompt_len: int
    output_len: int

    def __post_init__(self):
        if not (self.arrival_s >= 0 and math.isfinite(self.arrival_s)):
            raise InputError(f"a request's arrival time must be a finite time >= 0 s, got {self.arrival_s}")
        if self.prompt_len < 1 or self.output_len < 1:
            raise InputError(f"a request needs prompt_len >= 1 and output_len >= 1, got "
                             f"{self.prompt_len} and {self.output_len}")


@dataclass(frozen=True)
class Lengths:
    """A distribution of token counts (prompt or output lengths) a synthetic trace draws from:
    `fixed` (low), `uniform` (low..high inclusive), `exp` (exponential of mean `mean`, redrawn
    above `high`) or `normal` (mean, std; redrawn outside 1..high). `parse_lengths` reads the
    command line's spelling."""

    kind: str
    low: int
    high: int
    mean_arg: float = 0.0
    std: float = 0.0

    KINDS = ("fixed", "uniform", "exp", "normal")

    @property
    def mean(self) -> float:
        """The distribution's mean (what the steady-state estimate plans with)."""
        if self.kind == "fixed":
            return float(self.low)
        if self.kind == "uniform":
            return (self.low + self.high) / 2
        if self.kind == "exp":  # exponential of rate 1/mean truncated at high
            m, h = self.mean_arg, self.high
            return min(float(h), max(1.0, m - h / math.expm1(h / m)))
        return self.mean_arg

    def draw(self, g: random.Random) -> int:
        if self.kind == "fixed":
            return self.low
        if self.kind == "uniform":
            return g.randint(self.low, self.high)
        while True:
            x = g.expovariate(1 / self.mean_arg) if self.kind == "exp" else g.gauss(self.mean_arg, self.std)
            v = max(1, round(x)) if self.kind == "exp" else round(x)
            if 1 <= v <= self.high:
                return v

    def __str__(self) -> str:
        return {"fixed": f"{self.low}", "uniform": f"{self.low}:{self.high}",
                "exp": f"exp:{self.mean_arg:g}:{self.high}",
                "normal": f"normal:{self.mean_arg:g}:{self.std:g}"}[self.kind]


def parse_lengths(text, what: str = "length") -> Lengths:
    """`1024` (every request), `512:2048` (uniform, inclusive), `exp:MEAN[:MAX]` (exponential,
    MAX default 4 x MEAN) or `normal:MEAN:STD` (clipped to 1 .. MEAN + 4 STD by redrawing);
    an int or an inclusive (low, high) tuple as well."""
    if isinstance(text, Lengths):
        return text
    if isinstance(text, tuple):
        text = f"{text[0]}:{text[1]}"
    text = str(text).strip()
    parts = text.split(":")
    hint = (f"{what} {text!r}: give N, LOW:HIGH (uniform), exp:MEAN[:MAX] or normal:MEAN:STD, "
            "with positive token counts")

    def number(v: str, integer: bool = True):
        try:
            x = int(v) if integer else float(v)
        except ValueError:
            raise InputError(hint) from None
        if not x > 0 or not math.isfinite(x):
            raise InputError(hint)
        return x

    name = parts[0].lower()
    if name == "exp" and len(parts) in (2, 3):
        mean = number(parts[1], False)
        high = number(parts[2]) if len(parts) == 3 else max(1, round(4 * mean))
        if high < mean:
            raise InputError(f"{what} {text!r}: MAX {high} is below the mean {mean:g}")
        return Lengths("exp", 1, high, mean)
    if name == "normal" and len(parts) == 3:
        mean, std = number(parts[1], False), number(parts[2], False)
        return Lengths("normal", 1, max(1, round(mean + 4 * std)), mean, std)
    if len(parts) == 1:
        n = number(parts[0])
        return Lengths("fixed", n, n)
    if len(parts) == 2:
        low, high = number(parts[0]), number(parts[1])
        if low > high:
            raise InputError(f"{what} {text!r}: the range's low end is above its high end")
        return Lengths("uniform", low, high) if low < high else Lengths("fixed", low, low)
    raise InputError(hint)


def poisson_trace(n: int, rate: float, prompt_len: int | tuple[int, int] | str | Lengths,
                  output_len: int | tuple[int, int] | str | Lengths, seed: int = 0) -> list[TraceRequest]:
    """n requests arriving as a Poisson process of `rate` requests/s; each length fixed, drawn
    uniformly from an inclusive (low, high) range, or from a `Lengths` (or its spelling, see
    `parse_lengths`)."""
    if n < 1 or not rate > 0:
        raise InputError(f"a Poisson trace needs n >= 1 requests and a rate > 0, got n={n}, rate={rate}")
    g = random.Random(seed)
    prompt_len, output_len = parse_lengths(prompt_len, "prompt length"), parse_lengths(output_len, "output length")

    def draw(length: Lengths):
        return length.draw(g)

    now, trace = 0.0, []
    for _ in range(n):
        now += g.expovariate(rate)
        trace.append(TraceRequest(now, draw(prompt_len), draw(output_len)))
    return trace


def load_trace(path: str | Path) -> list[TraceRequest]:
    """A JSONL trace: one object per line with `arrival_s` (or `arrival_time`), `prompt_len`
    (or `prompt_tokens`) and `output_len` (or `output_tokens`)."""
    trace = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            trace.append(TraceRequest(float(row.get("arrival_s", row.get("arrival_time"))),
                                      int(row.get("prompt_len", row.get("prompt_tokens"))),
                                      int(row.get("output_len", row.get("output_tokens")))))
        except (ValueError, TypeError, AttributeError) as e:
            raise InputError(f"{path}:{number}: a trace line needs arrival_s, prompt_len and "
                             f"output_len numbers ({e})") from None
    if not trace:
        raise InputError(f"{path} holds no requests")
    return sorted(trace, key=lambda r: r.arrival_s)


class StepCost(Protocol):
    """The predicted NPU time of the graph calls one engine step makes."""

    chunk: int         # tokens per prefill graph call, at most
    decode_batch: int  # rows per decode graph call, at most

    def prefill_s(self, tokens: int, start: int) -> float:
        """One prefill chunk of `tokens` tokens at positions start.."""

    def decode_s(self, positions: Sequence[int]) -> float:
        """One decode call for sequences at these positions."""


def step_seconds(cost: StepCost, scheduled: Iterable[tuple[int, int]]) -> float:
    """The step's time for (tokens scheduled, tokens already computed) per request, the way
    vllm_rbln's runner calls the graphs: prefill chunks one by one, the decode batch at once."""
    seconds, singles = 0.0, []
    for count, start in scheduled:
        if count == 1:
            singles.append(start)
            continue
        for offset in range(0, count, cost.chunk):
            seconds += cost.prefill_s(min(cost.chunk, count - offset), start + offset)
    for first in range(0, len(singles), cost.decode_batch):
        seconds += cost.decode_s(singles[first:first + cost.decode_batch])
    return seconds


@dataclass
class RequestResult:
    arrival_s: float
    prompt_len: int
    output_len: int
    first_scheduled_s: float | None = None
    token_s: list[float] = field(default_factory=list)  # the clock when each output token came
    preemptions: int = 0

    @property
    def ttft_s(self) -> float:
        return self.token_s[0] - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None for a one-token answer."""
        n = len(self.token_s)
        return (self.token_s[-1] - self.token_s[0]) / (n - 1) if n > 1 else None

    @property
    def queued_s(self) -> float | None:
        """Arrival to first scheduled step (None where unknown: a real run's replay)."""
        return None if self.first_scheduled_s is None else self.first_scheduled_s - self.arrival_s


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), without numpy."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class ServingResult:
    """What serving a trace took, in predicted time on the chip."""

    requests: list[RequestResult]
    steps: int
    busy_s: float  # the clock's time in steps (the rest it waited for arrivals)

    @property
    def makespan_s(self) -> float:
        return max(r.token_s[-1] for r in self.requests) - min(r.arrival_s for r in self.requests)

    @property
    def preemptions(self) -> int:
        return sum(r.preemptions for r in self.requests)

    @property
    def output_tokens_per_s(self) -> float:
        return sum(len(r.token_s) for r in self.requests) / self.makespan_s

    def percentiles(self, metric: str) -> dict[int, float]:
        """p50/p90/p99 of "ttft", "tpot" or "queued" in seconds."""
        values = [getattr(r, f"{metric}_s") for r in self.requests]
        values = [v for v in values if v is not None]
        return {q: percentile(values, q) for q in PERCENTILES}

    def summary(self) -> dict:
        return {"requests": len(self.requests), "steps": self.steps,
                "makespan_s": self.makespan_s, "busy_s": self.busy_s,
                "output_tokens_per_s": self.output_tokens_per_s, "preemptions": self.preemptions,
                **{f"{m}_p{q}_s": v for m in ("ttft", "tpot", "queued")
                   for q, v in self.percentiles(m).items()}}

    def to_json(self) -> str:
        return json.dumps({"summary": self.summary(), "requests": [asdict(r) for r in self.requests]})

    def __repr__(self) -> str:
        ttft, tpot = self.percentiles("ttft"), self.percentiles("tpot")
        return (f"ServingResult({len(self.requests)} requests in {self.steps} steps, "
                f"{self.makespan_s:.3f} s: TTFT p50/p90/p99 "
                f"{'/'.join(f'{ttft[q] * 1e3:.1f}' for q in PERCENTILES)} ms, TPOT "
                f"{'/'.join(f'{tpot[q] * 1e3:.2f}' for q in PERCENTILES)} ms, "
                f"{self.output_tokens_per_s:.1f} output tokens/s, {self.preemptions} preemptions)")


def scheduler_config(model: str | Path, *, max_num_seqs: int, max_model_len: int, block_size: int,
                     num_blocks: int, max_num_batched_tokens: int = 8192,
                     enable_prefix_caching: bool = True, prefill_chunk: int | None = None):
    """vLLM's engine configuration and KV-cache layout for a simulation, built by vLLM's own
    `EngineArgs` from the model's config.json folder (no weights or tokenizer are read). The
    defaults are those vllm_rbln serves with (vLLM's offline defaults: 8192 batched tokens,
    prefix caching on).

    The configuration needs a vLLM platform: a process that has not chosen one yet takes vLLM's
    CPU platform (the scheduler is the same on every platform); one already on vllm_rbln's is
    told the configuration is for a simulation, so it asks for no compiled folder. To simulate
    what a served engine would do, pass that engine's own configuration to `simulate`.

    prefill_chunk: at most this many prompt tokens of a request per step (vLLM's
    `long_prefill_token_threshold`), so a long prompt is spread over several steps, each also
    running the decode batch (a step then carries a chunk, and decoding stalls for one chunk
    at a time instead of a whole prompt); None: a step takes what the token budget allows."""
    import torch
    _choose_platform()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    args = EngineArgs(model=str(model), skip_tokenizer_init=True, max_num_seqs=max_num_seqs,
                      max_model_len=max_model_len, block_size=block_size,
                      max_num_batched_tokens=max_num_batched_tokens,
                      enable_chunked_prefill=True, enable_prefix_caching=enable_prefix_caching,
                      num_gpu_blocks_override=num_blocks,
                      **({"long_prefill_token_threshold": prefill_chunk} if prefill_chunk else {}))
    # a process already on vllm_rbln's platform (it serves compiled folders only) is told that
    # this configuration is for a simulation (vllm_rbln.platform.SIMULATION)
    with _environ(RBLN_VLLM_SIMULATION="1"):
        vllm_config = args.create_engine_config()
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    hf = vllm_config.model_config.hf_config
    heads = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    spec = FullAttentionSpec(block_size, num_kv_heads=heads, head_size=head_dim, dtype=torch.float16)
    kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                       kv_cache_groups=[KVCacheGroupSpec(["model"], spec)])
    return vllm_config, kv


def _choose_platform() -> None:
    try:
        import vllm.platforms as platforms
    except ImportError:
        raise PlanError("the serving simulation runs vLLM's own scheduler, and vLLM is not "
                        "installed: pip install 'open-rbln[vllm]'") from None
    if platforms._current_platform is not None:
        return
    with _environ(RBLN_VLLM_PLATFORM="0", VLLM_TARGET_DEVICE="cpu"):
        platforms.current_platform  # noqa: B018  (resolves and keeps it)


@contextlib.contextmanager
def _environ(**values: str):
    """These environment variables set inside the block, restored (or removed) after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def simulate(trace: Sequence[TraceRequest], cost: StepCost, vllm_config, kv_cache_config,
             progress: bool = False) -> ServingResult:
    """Replay `trace` through vLLM's scheduler, each step costing `cost`'s predicted time.
    vllm_config and kv_cache_config: a served engine's own (to simulate what it would do), or
    `scheduler_config(...)`'s."""
    _choose_platform()  # a clear error without vLLM; the CPU platform if none is chosen yet
    from vllm import SamplingParams
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager
    from vllm.utils.hashing import get_hash_fn_by_name

    trace = sorted(trace, key=lambda r: r.arrival_s)
    too_long = [r for r in trace if r.prompt_len + r.output_len > vllm_config.model_config.max_model_len]
    if too_long:
        raise InputError(f"{len(too_long)} request(s) exceed max_model_len="
                         f"{vllm_config.model_config.max_model_len} (e.g. {too_long[0]})")
    block_size = vllm_config.cache_config.block_size
    scheduler = Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                          structured_output_manager=StructuredOutputManager(vllm_config),
                          block_size=block_size)
    hasher = None
    if vllm_config.cache_config.enable_prefix_caching:
        hash_fn = get_hash_fn_by_name(vllm_config.cache_config.prefix_caching_hash_algo)
        init_none_hash(hash_fn)
        hasher = get_request_block_hasher(block_size, hash_fn)
    results = {str(i): RequestResult(r.arrival_s, r.prompt_len, r.output_len) for i, r in enumerate(trace)}
    rng = random.Random(0)  # prompts that share no prefix (a prefix cache would see no hits)
    clock, busy, steps, nxt = 0.0, 0.0, 0, 0
    bar = _progress(len(trace)) if progress else None
    while nxt < len(trace) or scheduler.has_requests():
        while nxt < len(trace) and trace[nxt].arrival_s <= clock:
            r = trace[nxt]
            params = SamplingParams(max_tokens=r.output_len, min_tokens=r.output_len, ignore_eos=True)
            scheduler.add_request(Request(str(nxt), [rng.randrange(1000, 30000) for _ in range(r.prompt_len)],
                                          params, None, arrival_time=r.arrival_s, block_hasher=hasher))
            nxt += 1
        if not scheduler.has_requests():
            clock = trace[nxt].arrival_s
            continue
        out = scheduler.schedule()
        for rid in out.preempted_req_ids or ():
            results[rid].preemptions += 1
        scheduled, ids, tokens = [], [], []
        for rid, count in out.num_scheduled_tokens.items():
            request = scheduler.requests[rid]
            scheduled.append((count, request.num_computed_tokens - count))
            ids.append(rid)
            tokens.append([] if request.is_prefill_chunk else [0])
            if results[rid].first_scheduled_s is None:
                results[rid].first_scheduled_s = clock
        seconds = step_seconds(cost, scheduled)
        clock += seconds
        busy += seconds
        steps += bool(scheduled)  # a step that only retires finished requests runs nothing
        runner_out = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                       sampled_token_ids=tokens)
        before = {rid: results[rid] for rid, t in zip(ids, tokens) if t}
        scheduler.update_from_output(out, runner_out)
        for rid, result in before.items():
            result.token_s.append(clock)
            if bar is not None and len(result.token_s) == result.output_len:
                bar.update(1)
    if bar is not None:
        bar.close()
    return ServingResult(list(results.values()), steps, busy)


def _progress(total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc="simulating requests", unit="req", leave=False)
