"""The predicted NPU time of a serving step on a compiled LLM, without running it: the cost a
serving simulation (`rebel.plan.serving.simulate`) charges per step, read from the same
compiled graphs and timing model a served model reports (`Runtime.predict`), so a simulated
trace and the same trace served by vllm_rbln see the same step times."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .session import PagedGraphs


class GraphStepCost:
    """`rebel.plan.serving.StepCost` of a compiled model's prefill and decode graphs."""

    def __init__(self, graphs: PagedGraphs):
        self.graphs = graphs
        self.chunk = graphs.options.prefill_chunk_size
        self.decode_batch = max(graphs.options.decoder_batch_sizes)

    @classmethod
    def of(cls, model) -> GraphStepCost:
        """From an `RBLNDecoderOnlyModelForCausalLM` (loaded or just compiled)."""
        return cls(model.paged_graphs())

    def prefill_s(self, tokens: int, start: int) -> float:
        return self.graphs.predict_prefill_chunk(tokens, start).latency_s

    def decode_s(self, positions: Sequence[int]) -> float:
        return self.graphs.predict_decode(torch.tensor(list(positions), dtype=torch.long)).latency_s

    def __repr__(self) -> str:
        return f"GraphStepCost(chunk={self.chunk}, decode_batch={self.decode_batch})"
