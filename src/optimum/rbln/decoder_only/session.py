"""A batch of sequences on the device: slots, block tables, chunked prefill and decode steps.

Sequence i of a batch owns KV-cache slot i, i.e. blocks [i * blocks_per_seq, (i+1) *
blocks_per_seq). Prefill runs one chunk of one sequence at a time (the host loops chunks and
sequences); decode runs every unfinished sequence at once in the smallest compiled decode batch
that holds them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rebel import InputError, Runtime

from ..configuration import RBLNConfig


@dataclass
class Timing:
    """Predicted device time (on the modelled NPU) and wall time of the runs so far."""

    prefill_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0


class PagedSession:
    def __init__(self, runtime: Runtime, options: RBLNConfig, prompts: list[torch.Tensor]):
        if len(prompts) > options.batch_size:
            raise InputError(f"batch of {len(prompts)} sequences exceeds the compiled "
                             f"rbln_batch_size={options.batch_size}")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise InputError(f"prompt {i} is empty")
            if len(p) > options.max_seq_len:
                raise InputError(f"prompt {i} has {len(p)} tokens, longer than the compiled "
                                 f"rbln_max_seq_len={options.max_seq_len}")
        self.runtime = runtime
        self.options = options
        self.lengths = [len(p) for p in prompts]  # tokens in each sequence's cache so far
        self.prompts = prompts
        self.timing = Timing()
        bps = options.blocks_per_sequence
        self.tables = torch.arange(options.batch_size * bps).view(options.batch_size, bps)

    def _run(self, *inputs) -> torch.Tensor:
        logits = self.runtime.run(*inputs)
        report = self.runtime.last_report
        self.timing.wall_s += report.wall_time_s
        return logits, report.latency_s

    def prefill(self) -> torch.Tensor:
        """Run every prompt through the prefill graph, chunk by chunk; logits [b, vocab] of each
        prompt's last token."""
        chunk = self.options.prefill_chunk_size
        last = []
        for i, prompt in enumerate(self.prompts):
            for start in range(0, len(prompt), chunk):
                part = prompt[start:start + chunk]
                n = len(part)
                ids = torch.zeros(1, chunk, dtype=torch.long)
                ids[0, :n] = part
                positions = torch.full((1, chunk), -1, dtype=torch.long)
                positions[0, :n] = torch.arange(start, start + n)
                logits, seconds = self._run(ids, positions, self.tables[i:i + 1],
                                            torch.tensor([n - 1]))
                self.timing.prefill_s.append(seconds)
            last.append(logits[0])
        return torch.stack(last)

    def step(self, tokens: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Append tokens[j] to sequence rows[j] and return next-token logits [len(rows), vocab]."""
        if not rows:
            raise InputError("no sequence left to decode")
        for r in rows:
            if self.lengths[r] >= self.options.max_seq_len:
                raise InputError(f"sequence {r} is full: rbln_max_seq_len={self.options.max_seq_len}")
        size = next((b for b in self.options.decoder_batch_sizes if b >= len(rows)), None)
        if size is None:
            raise InputError(f"{len(rows)} sequences exceed the largest compiled decode batch "
                             f"{max(self.options.decoder_batch_sizes)}")
        ids = torch.zeros(size, 1, dtype=torch.long)
        positions = torch.full((size, 1), -1, dtype=torch.long)
        tables = self.tables[:size].clone()
        for j, r in enumerate(rows):
            ids[j, 0] = tokens[j]
            positions[j, 0] = self.lengths[r]
            tables[j] = self.tables[r]
            self.lengths[r] += 1
        logits, seconds = self._run(ids, positions, tables, torch.zeros(size, dtype=torch.long))
        self.timing.decode_s.append(seconds)
        return logits[:len(rows)]
