"""One vLLM engine step on the compiled LLM: keep each request's tokens and KV-cache blocks, run
the scheduled tokens through the prefill graph (one chunk of one request at a time) or the decode
graph (every single-token request at once), then sample.

vLLM's scheduler owns the KV cache: it hands each request its block ids and may split a prompt
over several steps (chunked prefill), share blocks between requests (prefix caching) or preempt
and resume a request. The compiled graphs take block tables as inputs, so they follow it as is.
Block 0 is vLLM's null block (never given to a request), so block id b is cache block b - 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from vllm import SamplingParams
from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, LogprobsLists, ModelRunnerOutput
from vllm.v1.sample.ops.bad_words import apply_bad_words

from optimum.rbln.decoder_only.session import PagedGraphs

from .sampler import apply_bitmask, apply_penalties, apply_token_rules, sample


@dataclass
class RequestState:
    prompt: list[int]
    params: SamplingParams
    blocks: list[int]                 # vLLM block ids, in sequence order
    computed: int = 0                 # tokens already in the KV cache
    output: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclass
class RunnerStats:
    """What the runner did so far, and the NPU time the timing model predicts for it."""

    steps: int = 0
    prefill_chunks: int = 0
    decode_batches: int = 0
    cached_prompt_tokens: int = 0     # prompt tokens vLLM's prefix cache supplied
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def __str__(self) -> str:
        return (f"{self.steps} steps: {self.prefill_chunks} prefill chunks, {self.decode_batches} "
                f"decode batches, {self.cached_prompt_tokens} prompt tokens from the prefix cache; "
                f"predicted NPU time {self.prefill_s * 1e3:.2f} ms prefill, "
                f"{self.decode_s * 1e3:.2f} ms decode")


class RblnModelRunner:
    def __init__(self, graphs: PagedGraphs):
        self.graphs = graphs
        self.options = graphs.options
        self.requests: dict[str, RequestState] = {}
        self.stats = RunnerStats()
        self._pending: tuple[list[str], dict[str, torch.Tensor]] | None = None

    # --- bookkeeping ----------------------------------------------------------------------------

    def update_states(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            params = new.sampling_params
            generator = None
            if params.seed is not None:
                generator = torch.Generator().manual_seed(params.seed)
            self.stats.cached_prompt_tokens += new.num_computed_tokens
            self.requests[new.req_id] = RequestState(list(new.prompt_token_ids), params,
                                                     list(new.block_ids[0]), new.num_computed_tokens,
                                                     generator=generator)
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests[req_id]
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.blocks = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                state.blocks.extend(new_blocks[0])
            if req_id in cached.all_token_ids:  # resumed: vLLM sends what it has
                state.output = cached.all_token_ids[req_id][len(state.prompt):]
            state.computed = cached.num_computed_tokens[i]

    def _table(self, state: RequestState) -> torch.Tensor:
        table = torch.zeros(self.options.blocks_per_sequence, dtype=torch.long)
        table[:len(state.blocks)] = torch.tensor(state.blocks, dtype=torch.long) - 1
        return table

    # --- running --------------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput | None:
        """Run the step's tokens; None means `sample` follows (vLLM's two-phase step, which lets
        structured outputs mask the logits first)."""
        self.update_states(out)
        if out.total_num_scheduled_tokens == 0:
            return EMPTY_MODEL_RUNNER_OUTPUT
        order = list(out.num_scheduled_tokens)
        logits: dict[str, torch.Tensor] = {}
        single = [r for r in order if out.num_scheduled_tokens[r] == 1]
        for req_id in order:
            if out.num_scheduled_tokens[req_id] > 1:
                self._prefill(req_id, out.num_scheduled_tokens[req_id], logits)
        biggest = max(self.options.decoder_batch_sizes)
        for start in range(0, len(single), biggest):
            self._decode(single[start:start + biggest], logits)
        self.stats.steps += 1
        self._pending = (order, logits)
        return None

    def _prefill(self, req_id: str, count: int, logits: dict[str, torch.Tensor]) -> None:
        state = self.requests[req_id]
        table, tokens = self._table(state), torch.tensor(state.tokens)
        chunk = self.options.prefill_chunk_size
        end = state.computed + count
        for start in range(state.computed, end, chunk):
            last, report = self.graphs.prefill_chunk(tokens[start:min(start + chunk, end)], start, table)
            self.stats.prefill_s += report.latency_s
            self.stats.prefill_chunks += 1
        if end == len(state.tokens):  # the whole prompt is cached: sample its next token
            logits[req_id] = last

    def _decode(self, req_ids: list[str], logits: dict[str, torch.Tensor]) -> None:
        states = [self.requests[r] for r in req_ids]
        tokens = torch.tensor([s.tokens[s.computed] for s in states])
        positions = torch.tensor([s.computed for s in states])
        tables = torch.stack([self._table(s) for s in states])
        rows, report = self.graphs.decode(tokens, positions, tables)
        self.stats.decode_s += report.latency_s
        self.stats.decode_batches += 1
        for req_id, state, row in zip(req_ids, states, rows):
            if state.computed + 1 == len(state.tokens):
                logits[req_id] = row

    def sample(self, grammar: GrammarOutput | None) -> ModelRunnerOutput:
        if self._pending is None:
            raise RuntimeError("sample_tokens called without a preceding execute_model")
        order, logits = self._pending
        self._pending = None
        masks = {}
        if grammar is not None:
            masks = dict(zip(grammar.structured_output_request_ids, grammar.grammar_bitmask))
        sampled: list[list[int]] = []
        logprobs: dict[int, tuple[torch.Tensor, int]] = {}
        for index, req_id in enumerate(order):
            if req_id not in logits:  # a prompt chunk that does not end the prompt
                sampled.append([])
                continue
            state = self.requests[req_id]
            scores = logits[req_id].float().clone()
            if req_id in masks:
                scores = apply_bitmask(scores, masks[req_id])
            scores = apply_token_rules(scores, state.params)
            if state.params.bad_words_token_ids:
                apply_bad_words(scores.view(1, -1), {0: state.params.bad_words_token_ids},
                                [state.output])
            scores = apply_penalties(scores, state.params, state.prompt, state.output)
            token = sample(scores, state.params, state.generator)
            state.output.append(token)
            sampled.append([token])
            if state.params.logprobs is not None:
                logprobs[index] = (logits[req_id], token)
        return ModelRunnerOutput(req_ids=order, req_id_to_index={r: i for i, r in enumerate(order)},
                                 sampled_token_ids=sampled,
                                 logprobs=self._logprobs(order, logprobs) if logprobs else None)

    def _logprobs(self, order: list[str], chosen: dict[int, tuple[torch.Tensor, int]]) -> LogprobsLists:
        """vLLM's default (raw) logprobs: log-softmax of the model's logits; per request a row of
        the sampled token then the top `logprobs` tokens, and the sampled token's rank."""
        vocab = next(iter(chosen.values()))[0].shape[-1]
        top = {i: self.requests[order[i]].params.logprobs for i in chosen}
        width = 1 + max(vocab if k == -1 else k for k in top.values())
        ids = np.zeros((len(order), width), dtype=np.int64)
        values = np.zeros((len(order), width), dtype=np.float32)
        ranks = np.zeros(len(order), dtype=np.int64)
        for i, (raw, token) in chosen.items():
            lp = torch.log_softmax(raw.float(), -1)
            k = vocab if top[i] == -1 else top[i]
            best = torch.topk(lp, k)
            ids[i, 0], values[i, 0] = token, float(lp[token])
            ids[i, 1:1 + k], values[i, 1:1 + k] = best.indices.numpy(), best.values.numpy()
            ranks[i] = int((lp > lp[token]).sum()) + 1
        return LogprobsLists(ids, values, ranks)
