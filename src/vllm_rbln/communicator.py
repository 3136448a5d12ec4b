"""Path B's tensor-parallel collectives: vLLM's own TP layers (column/row-parallel linears, the
vocab-parallel embedding and logits gather) call these between the dies, one worker per die.

The data moves through torch.distributed (gloo) between the worker processes, as vLLM's CPU
communicator does; each collective's time is predicted on the chip-to-chip link of the machine
spec (`links.die_to_die`, ring alpha-beta, rebel.device.timing.collective_seconds) and counted,
so a step's predicted time includes its collectives. Each collective is a graph break for
torch.compile: the device graphs end before it and start again after it, as on the chip, where
the compiler places collectives between compute kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

from rebel.device.timing import collective_seconds


@dataclass
class CollectiveStats:
    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


STATS = CollectiveStats()  # this worker process's collectives (one worker per die)


def _link():
    from rebel.npu.machine import current_machine
    return current_machine().spec.links.die_to_die


class RblnCommunicator(CpuCommunicator):
    def _count(self, op: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        STATS.calls += 1
        STATS.bytes += nbytes
        STATS.seconds += collective_seconds(op, nbytes, self.world_size, _link())

    @torch._dynamo.disable
    def all_reduce(self, input_):
        self._count("all_reduce", input_)
        return super().all_reduce(input_)

    @torch._dynamo.disable
    def all_gather(self, input_, dim: int = -1):
        self._count("all_gather", input_)
        return super().all_gather(input_, dim)

    @torch._dynamo.disable
    def gather(self, input_, dst: int = 0, dim: int = -1):
        self._count("all_gather", input_)  # a gather moves what an all-gather's last hop does
        return super().gather(input_, dst, dim)
