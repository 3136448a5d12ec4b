"""One vLLM engine step on the compiled LLM: vLLM's own model runner keeps the requests (its
persistent `InputBatch`: tokens, block tables, sampling parameters, seeded generators, logits
processors) and samples (its v1 `Sampler`, grammar bitmask, logprobs and logprobs_mode); this
subclass only replaces the forward pass with the compiled prefill graphs (one chunk of one request
at a time, in the smallest compiled chunk that holds it) and decode graph (every single-token
request at once: one call per step while they fit the largest decode batch). The step's inputs
(tokens, positions, block tables) come from vLLM's persistent batch arrays in whole-batch numpy /
torch operations, not per-request Python.

It subclasses vLLM's CPU model runner, as the CPU platform does with the GPU one: the tensors on
the vLLM side are host tensors, and the compiled model's runtime owns the device and its KV cache.
vLLM's scheduler hands each request its block ids and may split a prompt over several steps
(chunked prefill), share blocks between requests (prefix caching) or preempt and resume a
request; the compiled graphs take block tables as inputs, so they follow it as is. Block 0 is
vLLM's null block (never given to a request), so block id b is cache block b - 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from vllm.v1.core.sched.output import GrammarOutput, SchedulerOutput
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import ExecuteModelState

from optimum.rbln.decoder_only.session import PagedGraphs


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


class RblnModelRunner(CPUModelRunner):
    """vLLM's CPU model runner with the compiled graphs as its model (`attach` them after
    construction: the worker loads the compiled folder)."""

    graphs: PagedGraphs

    def attach(self, graphs: PagedGraphs) -> None:
        self.graphs = graphs
        self.options = graphs.options
        self.stats = RunnerStats()
        self.last_step: tuple[float, float] | None = None  # predicted (prefill, decode) seconds

    # --- what vLLM's runner would allocate or load: the compiled model has it already ----------

    def load_model(self, load_dummy_weights: bool = False) -> None:
        raise RuntimeError("RblnModelRunner runs a compiled folder: RblnWorker loads it")

    def initialize_kv_cache(self, kv_cache_config, is_profiling: bool = False,
                            kv_cache_allocation_context=None) -> None:
        """The KV cache lives in the compiled model's device memory; vLLM's runner only needs the
        layout (its batch reordering reads the cache groups)."""
        self.kv_cache_config = kv_cache_config

    def _zero_block_ids(self, block_ids: list[int]) -> None:
        """vLLM zeroes fresh blocks of its own host cache; the device cache is the runtime's, and
        the graphs never read a position past a sequence's length."""

    # --- the forward pass ----------------------------------------------------------------------

    @torch.inference_mode()
    def execute_model(self, scheduler_output: SchedulerOutput, intermediate_tensors=None):
        """Run the step's tokens through the graphs; None means `sample_tokens` follows (vLLM's
        two-phase step, which lets structured outputs mask the logits first)."""
        if self.execute_model_state is not None:
            raise RuntimeError("execute_model called twice without sample_tokens in between")
        self._update_states(scheduler_output)
        self.stats.cached_prompt_tokens += sum(new.num_computed_tokens
                                               for new in scheduler_output.scheduled_new_reqs)
        self.last_step = None
        if not scheduler_output.total_num_scheduled_tokens:
            return EMPTY_MODEL_RUNNER_OUTPUT
        batch = self.input_batch
        n = batch.num_reqs
        scheduled = scheduler_output.num_scheduled_tokens
        counts = np.fromiter((scheduled[r] for r in batch.req_ids), dtype=np.int64, count=n)
        logits = torch.zeros(n, batch.vocab_size, dtype=torch.float32)
        before = self.stats.prefill_s, self.stats.decode_s
        tables = self._tables(n)
        for i in np.flatnonzero(counts > 1).tolist():
            self._prefill(i, int(counts[i]), tables[i], logits)
        singles = torch.from_numpy(np.flatnonzero(counts == 1))
        biggest = max(self.options.decoder_batch_sizes)
        for start in range(0, len(singles), biggest):  # one call a step when the batch fits
            self._decode(singles[start:start + biggest], tables, logits)
        self.stats.steps += 1
        self.last_step = self.stats.prefill_s - before[0], self.stats.decode_s - before[1]
        # a chunk that does not end its prompt: vLLM samples the row and drops the token
        self.discard_request_mask.np[:n] = \
            batch.num_computed_tokens_cpu[:n] + counts < batch.num_tokens_no_spec[:n]
        nothing = logits.new_empty(0, 0)
        self.execute_model_state = ExecuteModelState(
            scheduler_output, logits, None, None, nothing, nothing, None, None, None, None)
        return None

    def _tables(self, n: int) -> torch.Tensor:
        """The device block tables [n, blocks_per_sequence] of the batch's rows, from vLLM's
        persistent block table (its numpy array, kept by `_update_states` as the scheduler hands
        out blocks): vLLM's block b is cache block b - 1 (block 0 is its null block), and entries
        past a row's blocks are 0."""
        group = self.input_batch.block_table.block_tables[0]
        width = min(group.block_table.np.shape[1], self.options.blocks_per_sequence)
        used = np.arange(width) < group.num_blocks_per_row[:n, None]  # a row's own blocks only
        tables = np.zeros((n, self.options.blocks_per_sequence), dtype=np.int64)
        tables[:, :width] = np.where(used, group.block_table.np[:n, :width].astype(np.int64) - 1, 0)
        return torch.from_numpy(tables)

    def _prefill(self, i: int, count: int, table: torch.Tensor, logits: torch.Tensor) -> None:
        """This step's `count` prompt tokens of row i, chunk by chunk (the prefill graphs run one
        request: each chunk in the smallest compiled chunk that holds it)."""
        batch = self.input_batch
        chunk = self.options.prefill_chunk_size
        begin = int(batch.num_computed_tokens_cpu[i])
        tokens = torch.from_numpy(batch.token_ids_cpu[i, begin:begin + count].astype(np.int64))
        for start in range(0, count, chunk):
            last, report = self.graphs.prefill_chunk(tokens[start:start + chunk], begin + start,
                                                     table)
            self.stats.prefill_s += report.latency_s
            self.stats.prefill_chunks += 1
        logits[i] = last.float()

    def _decode(self, rows: torch.Tensor, tables: torch.Tensor, logits: torch.Tensor) -> None:
        """One decode graph run for these rows: each row's token at its next position."""
        batch = self.input_batch
        positions = batch.num_computed_tokens_cpu_tensor[rows].long()
        tokens = batch.token_ids_cpu_tensor[rows, positions].long()
        out, report = self.graphs.decode(tokens, positions, tables[rows])
        self.stats.decode_s += report.latency_s
        self.stats.decode_batches += 1
        logits[rows] = out.float()

    @torch.inference_mode()
    def sample_tokens(self, grammar_output: GrammarOutput | None) -> ModelRunnerOutput:
        """vLLM's sampling step. A row whose token is dropped (a prompt chunk that does not end
        the prompt) must not draw from its request's seeded generator: vLLM's GPU runner winds a
        CUDA generator's offset back afterwards, which a CPU generator cannot do (it has no
        offset), so those generators sit out the step instead."""
        n = self.input_batch.num_reqs
        generators = self.input_batch.generators  # the dict the sampling metadata holds
        dropped = [int(i) for i in np.nonzero(self.discard_request_mask.np[:n])[0]]
        held = {i: generators.pop(i) for i in dropped if i in generators}
        try:
            return super().sample_tokens(grammar_output)
        finally:
            generators.update(held)
