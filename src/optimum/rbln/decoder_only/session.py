"""Driving the compiled LLM graphs: `PagedGraphs` is their calling convention (one prefill chunk of
one sequence, in the smallest compiled chunk that holds it, or one decode step of a batch, each
given the block tables of the sequences it touches); `PagedSession` is a batch of sequences for
`generate`.

A session's sequences each own a KV-cache slot (slot s: blocks [s * blocks_per_seq, (s+1) *
blocks_per_seq)) reserved from the model's `SlotPool` for the session's life, so concurrent
sessions (two threads calling generate() on one model) never write each other's cache blocks:
before the pool, every session used slots 0..b-1 and concurrent generate() calls overwrote each
other's KV caches, giving wrong tokens. Prefill runs one chunk of one sequence at a time (the host loops chunks and
sequences); decode runs every unfinished sequence at once in the smallest compiled decode batch
that holds them. A serving engine (vllm_rbln) uses `PagedGraphs` with its own block tables.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field

import torch

from rebel import InputError, Runtime
from rebel.runtime.report import RunReport

from ..configuration import RBLNConfig


class PagedGraphs:
    def __init__(self, runtime: Runtime, options: RBLNConfig):
        self.runtime = runtime
        self.options = options

    def prefill_chunk(self, tokens: torch.Tensor, start: int, table: torch.Tensor
                      ) -> tuple[torch.Tensor, RunReport]:
        """Cache `tokens` (at most one chunk) at positions start.. of the sequence whose blocks
        are `table`; logits [vocab] of the last of them. Runs the smallest compiled prefill
        chunk that holds them (rbln_prefill_chunk_sizes), padded with positions -1."""
        logits = self.runtime.run(*self._prefill_inputs(tokens, start, table))
        return logits[0], self.runtime.thread_last_report

    def predict_prefill_chunk(self, n: int, start: int) -> RunReport:
        """The report `prefill_chunk` of n tokens at positions start.. would give, predicted
        without computing (a serving simulation's cost of the chunk)."""
        return self.runtime.predict(*self._prefill_inputs(
            torch.zeros(n, dtype=torch.long), start,
            torch.zeros(self.options.blocks_per_sequence, dtype=torch.long)))

    def _prefill_inputs(self, tokens: torch.Tensor, start: int, table: torch.Tensor) -> tuple:
        o = self.options
        n = len(tokens)
        if not 0 < n <= o.prefill_chunk_size:
            raise InputError(f"a prefill chunk holds 1..{o.prefill_chunk_size} tokens, got {n}")
        if start < 0 or start + n > o.max_seq_len:
            raise InputError(f"tokens {start}..{start + n - 1} exceed rbln_max_seq_len={o.max_seq_len}")
        width = o.prefill_bucket(n)
        ids = torch.zeros(1, width, dtype=torch.long)
        ids[0, :n] = tokens
        positions = torch.full((1, width), -1, dtype=torch.long)
        positions[0, :n] = torch.arange(start, start + n)
        return ids, positions, self._tables(table.view(1, -1)), torch.tensor([n - 1])

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor
               ) -> tuple[torch.Tensor, RunReport]:
        """Cache tokens[j] at positions[j] of the sequence whose blocks are tables[j]; next-token
        logits [len(tokens), vocab]. Runs the smallest compiled decode batch that holds them."""
        logits = self.runtime.run(*self._decode_inputs(tokens, positions, tables))
        return logits[:len(tokens)], self.runtime.thread_last_report

    def predict_decode(self, positions: torch.Tensor) -> RunReport:
        """The report of `decode` with sequences at these positions, predicted without
        computing (a serving simulation's cost of the step's decode batch)."""
        k = len(positions)
        return self.runtime.predict(*self._decode_inputs(
            torch.zeros(k, dtype=torch.long), positions,
            torch.zeros(k, self.options.blocks_per_sequence, dtype=torch.long)))

    def _decode_inputs(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor
                       ) -> tuple:
        o = self.options
        k = len(tokens)
        if k == 0:
            raise InputError("no sequence to decode")
        size = next((b for b in o.decoder_batch_sizes if b >= k), None)
        if size is None:
            raise InputError(f"{k} sequences exceed the largest compiled decode batch "
                             f"{max(o.decoder_batch_sizes)}")
        if int(positions.max()) >= o.max_seq_len or int(positions.min()) < 0:
            raise InputError(f"decode positions must lie in 0..{o.max_seq_len - 1} "
                             f"(rbln_max_seq_len), got {positions.tolist()}")
        ids = torch.zeros(size, 1, dtype=torch.long)
        ids[:k, 0] = tokens
        padded_positions = torch.full((size, 1), -1, dtype=torch.long)
        padded_positions[:k, 0] = positions
        padded_tables = torch.zeros(size, o.blocks_per_sequence, dtype=torch.long)
        padded_tables[:k] = self._tables(tables)
        return ids, padded_positions, padded_tables, torch.zeros(size, dtype=torch.long)

    def _tables(self, tables: torch.Tensor) -> torch.Tensor:
        bps = self.options.blocks_per_sequence
        blocks = self.options.batch_size * bps
        if tables.shape[-1] != bps:
            raise InputError(f"block tables must have {bps} entries per sequence "
                             f"(rbln_max_seq_len / rbln_kvcache_block_size), got {tables.shape[-1]}")
        if int(tables.min()) < 0 or int(tables.max()) >= blocks:
            raise InputError(f"block ids must lie in 0..{blocks - 1}, got {tables.tolist()}")
        return tables.long()


@dataclass
class Timing:
    """Predicted device time (on the modelled NPU) and wall time of the runs so far."""

    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0


class SlotPool:
    """The KV-cache slots (rbln_batch_size of them) of one model, lent to sessions.

    `take(n, wait=True)` (generate) blocks until n slots are free when the missing ones are held
    by other generate() calls, which give them back when they finish. Slots held by sessions
    from `start_session` (wait=False) may never come back (the holder may be the caller itself),
    so a request they block is refused at once with a clear error, never left hanging."""

    def __init__(self, slots: int):
        self.total = slots
        self.free = list(range(slots))
        self.held_by_open_sessions = 0
        self._cond = threading.Condition()

    def take(self, n: int, wait: bool) -> list[int]:
        with self._cond:
            while len(self.free) < n:
                if not wait or self.total - self.held_by_open_sessions < n:
                    raise InputError(
                        f"{n} KV-cache slot(s) needed but {len(self.free)} of {self.total} are "
                        "free: other sessions of this model hold them (rbln_batch_size bounds the "
                        "sequences in flight; close sessions from start_session(), or compile a "
                        "larger rbln_batch_size)")
                self._cond.wait()
            taken, self.free = self.free[:n], self.free[n:]
            if not wait:
                self.held_by_open_sessions += n
            return taken

    def give_back(self, slots: list[int], waited: bool) -> None:
        with self._cond:
            self.free = sorted(self.free + slots)
            if not waited:
                self.held_by_open_sessions -= len(slots)
            self._cond.notify_all()


class PagedSession:
    def __init__(self, runtime: Runtime, options: RBLNConfig, prompts: list[torch.Tensor],
                 pool: SlotPool | None = None, wait: bool = False):
        if len(prompts) > options.batch_size:
            raise InputError(f"batch of {len(prompts)} sequences exceeds the compiled "
                             f"rbln_batch_size={options.batch_size}")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise InputError(f"prompt {i} is empty")
            if len(p) > options.max_seq_len:
                raise InputError(f"prompt {i} has {len(p)} tokens, longer than the compiled "
                                 f"rbln_max_seq_len={options.max_seq_len}")
        self.graphs = PagedGraphs(runtime, options)
        self.options = options
        self.lengths = [len(p) for p in prompts]  # tokens in each sequence's cache so far
        self.prompts = prompts
        self.timing = Timing()
        bps = options.blocks_per_sequence
        if pool is None:  # a session alone on its model: slots 0..b-1
            self.slots = list(range(len(prompts)))
            self._release = None
        else:
            self.slots = pool.take(len(prompts), wait)
            self._release = weakref.finalize(self, pool.give_back, list(self.slots), wait)
        all_tables = torch.arange(options.batch_size * bps).view(options.batch_size, bps)
        self.tables = all_tables[self.slots]

    def close(self) -> None:
        """Give this session's KV-cache slots back to the model (also done when it is
        garbage collected)."""
        if self._release is not None:
            self._release()

    def prefill(self) -> torch.Tensor:
        """Run every prompt through the prefill graph, chunk by chunk; logits [b, vocab] of each
        prompt's last token."""
        chunk = self.options.prefill_chunk_size
        last = []
        for i, prompt in enumerate(self.prompts):
            for start in range(0, len(prompt), chunk):
                logits, report = self.graphs.prefill_chunk(prompt[start:start + chunk], start,
                                                           self.tables[i])
                self.timing.prefill_s.append(report.latency_s)
                self.timing.wall_s += report.wall_time_s
            last.append(logits)
        return torch.stack(last)

    def step(self, tokens: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Append tokens[j] to sequence rows[j] and return next-token logits [len(rows), vocab]."""
        if not rows:
            raise InputError("no sequence left to decode")
        for r in rows:
            if self.lengths[r] >= self.options.max_seq_len:
                raise InputError(f"sequence {r} is full: rbln_max_seq_len={self.options.max_seq_len}")
        positions = torch.tensor([self.lengths[r] for r in rows])
        logits, report = self.graphs.decode(tokens, positions, self.tables[rows])
        for r in rows:
            self.lengths[r] += 1
        self.timing.decode_s.append(report.latency_s)
        self.timing.wall_s += report.wall_time_s
        return logits
