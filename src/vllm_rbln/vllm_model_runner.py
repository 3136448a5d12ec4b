"""Path B's model runner: vLLM's CPU model runner (its input batch, attention metadata, sampler,
logits processors) with vLLM's own model class, compiled by our Dynamo backend
(`torch.compile(backend="rbln")`), attending through `attention.py`'s backend.

Compiling: each attention layer is a graph break (its forward is excluded from Dynamo), so the
model's layers between attentions become device graphs, and attention runs the device's paged
attention op on vLLM's cache between them. The device runs static shapes: every step's token count
is padded up to a bucket (`buckets`: one per decode batch size 1, 2, 4... up to max_num_seqs, and
max_num_batched_tokens for any step that prefills), and `warm_up` compiles every bucket before
serving, so nothing compiles on the hot path. Compiled graphs go to an on-disk cache
(`VLLM_RBLN_CACHE_DIR`, else $TORCH_RBLN_CACHE_DIR, else ~/.cache/open-rbln/vllm): a second process
with the same model loads them and compiles nothing. `VLLM_RBLN_COMPILE=0` runs the model eagerly
on host tensors instead (a reference for the compiled path).

Predicted NPU time: a step's is what its device graphs, its attention calls (attention.py times
each one, as the op's kernel in a compiled graph would be timed) and its collectives on the
die-to-die link (communicator.py) are predicted to take on this worker's die, summed. The runner
keeps it per step (`metrics.StepMetrics`, a step counted as prefill when any request brings more
than one token, else decode), reports it in `rbln_stats`, and the first tensor-parallel rank
writes it for `/metrics` (the dies run the same steps in lockstep, so one die's figure is the
step's).

One thing of vLLM's runner does not run on this host: the slot mapping of a step's tokens is a
Triton kernel (vllm/v1/worker/block_table.py, `_COMPUTE_SLOT_MAPPING_KERNEL`), and Triton has no
CPU target here. The runner computes the same mapping in PyTorch (`_slot_mapping`).
"""
from __future__ import annotations

import dataclasses
import os
import time
import types
from pathlib import Path

import torch
from vllm.logger import init_logger
from vllm.v1.attention.backends.utils import PAD_SLOT_ID
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from . import metrics

logger = init_logger("vllm.rbln.vllm_model_runner")

COMPILE_ENV = "VLLM_RBLN_COMPILE"
CACHE_ENV = "VLLM_RBLN_CACHE_DIR"


def compile_enabled() -> bool:
    return os.environ.get(COMPILE_ENV, "1") != "0"


def cache_folder() -> str:
    return os.environ.get(CACHE_ENV) or os.environ.get("TORCH_RBLN_CACHE_DIR") or str(
        Path.home() / ".cache" / "open-rbln" / "vllm")


def buckets(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """Token counts the device graphs are compiled for: decode batches 1, 2, 4... (powers of two
    up to max_num_seqs, and max_num_seqs itself) and max_num_batched_tokens."""
    sizes, b = set(), 1
    while b < max_num_seqs:
        sizes.add(b)
        b *= 2
    sizes.update((max_num_seqs, max_num_batched_tokens))
    return sorted(s for s in sizes if s <= max_num_batched_tokens)


def bucket_for(sizes: list[int], num_tokens: int) -> int:
    for size in sizes:
        if size >= num_tokens:
            return size
    raise ValueError(f"vllm_rbln: a step of {num_tokens} tokens exceeds max_num_batched_tokens "
                     f"({sizes[-1]})")


def _slot_mapping(self, num_reqs: int, query_start_loc: torch.Tensor,
                  positions: torch.Tensor) -> None:
    """What vLLM's Triton kernel computes (no context parallelism): token t of request r at
    position p goes to slot block_table[r, p // block_size] * block_size + p % block_size; slots
    past the step's tokens are PAD_SLOT_ID."""
    out = self.slot_mapping.gpu
    starts = query_start_loc[:num_reqs + 1].long()
    tokens = int(starts[-1])
    lengths = starts[1:] - starts[:-1]
    rows = torch.repeat_interleave(torch.arange(num_reqs), lengths)
    pos = positions[:tokens].long()
    table = self.block_table.gpu
    out[:tokens] = table[rows, pos // self.block_size].long() * self.block_size \
        + pos % self.block_size
    out[tokens:] = PAD_SLOT_ID


# What a step's predicted NPU time is made of (counters of `_counters`): device graphs, attention
# calls between them, collectives.
PARTS = ("device_time_s", "attention_s", "collective_s")


class RblnVllmModelRunner(CPUModelRunner):
    compiled = False
    sizes: list[int] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step_metrics = metrics.StepMetrics()
        self.phases: dict[str, dict[str, float]] = {}  # phase -> PARTS -> predicted seconds
        self.last_step: tuple[float, float] | None = None  # predicted (prefill, decode) seconds
        self._step_start: dict | None = None

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        """vLLM's step, with its predicted NPU time counted from here to the end of sampling."""
        self.last_step = None
        self._step_start = self._counters() if scheduler_output.total_num_scheduled_tokens \
            else None
        self._step_prefill = any(n > 1 for n in scheduler_output.num_scheduled_tokens.values())
        output = super().execute_model(scheduler_output, intermediate_tensors)
        if output is not None:  # no sampling follows
            self._end_step()
        return output

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        self._end_step()
        return output

    def _end_step(self) -> None:
        start, self._step_start = self._step_start, None
        if start is None:
            return
        now = self._counters()
        parts = {k: now[k] - start[k] for k in PARTS}
        seconds = sum(parts.values())
        self.last_step = (seconds, 0.0) if self._step_prefill else (0.0, seconds)
        phase = self.phases.setdefault("prefill" if self._step_prefill else "decode",
                                       dict.fromkeys(PARTS, 0.0))
        for k, v in parts.items():
            phase[k] += v
        self.step_metrics.observe(*self.last_step)
        if self._die() == 0:  # the first tensor-parallel rank speaks for the step
            metrics.export(self.step_metrics)

    def load_model(self, load_dummy_weights: bool = False) -> None:
        super().load_model(load_dummy_weights)
        if not compile_enabled():
            return
        from vllm.model_executor.layers.attention import Attention
        import torch_rbln  # noqa: F401  (registers the "rbln" Dynamo backend)

        for module in self.model.modules():
            if isinstance(module, Attention):  # a graph break: attention runs between graphs
                module.forward = torch._dynamo.disable(module.forward)
        self.sizes = buckets(self.scheduler_config.max_num_seqs,
                             self.scheduler_config.max_num_batched_tokens)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                   2 * len(self.sizes))
        inner = self.model.model
        self.model.model = torch.compile(
            inner, backend="rbln", dynamic=False,
            options={"cache_dir": cache_folder(), "max_shapes": len(self.sizes),
                     "device": self._die()})
        self.compiled = True

    def _die(self) -> int:
        """One worker per die: tensor-parallel rank r runs its graphs on rbln:r."""
        from vllm.distributed import get_tensor_model_parallel_rank
        return get_tensor_model_parallel_rank()

    def _determine_batch_execution_and_padding(self, num_tokens: int, *args, **kwargs):
        """vLLM's choice, with the token count padded up to a compiled bucket."""
        mode, descriptor, *rest = super()._determine_batch_execution_and_padding(
            num_tokens, *args, **kwargs)
        if self.compiled:
            descriptor = dataclasses.replace(descriptor,
                                             num_tokens=bucket_for(self.sizes, num_tokens))
        return (mode, descriptor, *rest)

    def _use_torch_slot_mapping(self) -> None:
        for table in self.input_batch.block_table.block_tables:
            if getattr(table, "_rbln_slots", False):
                continue
            table.compute_slot_mapping = types.MethodType(_slot_mapping, table)
            table._rbln_slots = True

    def _prepare_inputs(self, *args, **kwargs):
        self._use_torch_slot_mapping()
        return super()._prepare_inputs(*args, **kwargs)

    def warm_up(self) -> float:
        """Compile (or load from the cache) the device graphs of every bucket; the seconds taken."""
        if not self.compiled:
            return 0.0
        from torch_rbln import stats
        before = stats.current()
        compiles, hits = len(before.graph_compiles), before.graph_cache_hits
        start = time.perf_counter()
        for size in reversed(self.sizes):
            self._dummy_run(size, skip_eplb=True, remove_lora=False)
        seconds = time.perf_counter() - start
        after = stats.current()
        self.warm = {"buckets": list(self.sizes), "graphs_compiled": len(after.graph_compiles) - compiles,
                     "graphs_from_cache": after.graph_cache_hits - hits, "seconds": seconds}
        logger.info("vllm_rbln: warm-up for token buckets %s: %d graphs compiled, %d loaded from "
                    "the cache %s in %.1f s", self.sizes, self.warm["graphs_compiled"],
                    self.warm["graphs_from_cache"], cache_folder(), seconds)
        self._base = self._counters()  # rbln_stats reports serving only
        return seconds

    def _counters(self) -> dict:
        from torch_rbln import stats

        from .attention import STATS as attention
        from .communicator import STATS as collectives
        r = stats.current()
        return {"graph_runs": r.graph_runs, "graph_fallback_runs": r.graph_fallback_runs,
                "device_time_s": r.device_time_s, "graphs_compiled": len(r.graph_compiles),
                "attention_calls": attention.calls, "attention_s": attention.seconds,
                "collectives": collectives.calls, "collective_bytes": collectives.bytes,
                "collective_s": collectives.seconds}

    def rbln_stats(self) -> dict:
        """Warm-up figures, then what serving did since: graphs compiled (0 when every step hit
        a bucket), device graph runs, graphs that ran on the host instead, predicted device time
        of the graphs (device_time_s), of the attention calls between them and of this worker's
        collectives on the die-to-die link; the steps and their predicted time (the three
        summed per step: step_s, split into prefill_s and decode_s; `phases` splits each phase
        into the three)."""
        now, base = self._counters(), getattr(self, "_base", None) or {}
        since = {k: v - base.get(k, 0) for k, v in now.items()}
        since["graphs_compiled_after_warm_up"] = since.pop("graphs_compiled")
        steps = self.step_metrics
        return {"compiled": self.compiled, "die": self._die(), **getattr(self, "warm", {}),
                **since, "steps": steps.steps, "step_s": steps.step_s,
                "prefill_s": steps.prefill_s, "decode_s": steps.decode_s,
                "phases": {k: dict(v) for k, v in self.phases.items()}}
