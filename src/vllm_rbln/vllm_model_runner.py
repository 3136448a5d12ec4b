"""Path B's model runner: vLLM's CPU model runner (its input batch, attention metadata, sampler,
logits processors) with vLLM's own model class on host tensors, attending through
`attention.py`'s backend.

One thing of vLLM's runner does not run on this host: the slot mapping of a step's tokens is a
Triton kernel (vllm/v1/worker/block_table.py, `_COMPUTE_SLOT_MAPPING_KERNEL`), and Triton has no
CPU target here. The runner computes the same mapping in PyTorch (`_slot_mapping`).
"""
from __future__ import annotations

import types

import torch
from vllm.v1.attention.backends.utils import PAD_SLOT_ID
from vllm.v1.worker.cpu_model_runner import CPUModelRunner


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


class RblnVllmModelRunner(CPUModelRunner):
    def _use_torch_slot_mapping(self) -> None:
        for table in self.input_batch.block_table.block_tables:
            if getattr(table, "_rbln_slots", False):
                continue
            if table.dcp_world_size != 1:
                raise NotImplementedError("vllm_rbln: decode context parallelism is not supported")
            table.compute_slot_mapping = types.MethodType(_slot_mapping, table)
            table._rbln_slots = True

    def _prepare_inputs(self, *args, **kwargs):
        self._use_torch_slot_mapping()
        return super()._prepare_inputs(*args, **kwargs)

    def warm_up(self) -> float:
        return 0.0

    def rbln_stats(self) -> dict:
        return {}
