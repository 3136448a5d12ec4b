"""How many torch threads the engine process computes with once the model is loaded.

The virtual NPU computes on the host's cores: its kernels are torch ops on CPU tensors, so the
engine process is in the position of vLLM's CPU worker, not of its GPU worker. Two kinds of host
work run there:

- the device's runs (`Runtime.run`): the runtime picks their thread count per run
  (`rebel.runtime.threads`: the usable cores no other process is running on right now, looked at
  again at most once a second; `RBLN_NUM_THREADS` chooses). On an idle 2-core box that is 2 and
  a SmolLM2 decode step of 4 sequences takes ~55 ms instead of ~97 ms with 1; with another job
  on a core it is 1, which keeps the graphs' small ops from waiting at an OpenMP barrier for a
  thread that other process holds (a step took 1.5-4 s with 2 threads on a busy box). vLLM's
  scheduler runs in this process between steps, never during one, so it needs no core kept for
  it; a front-end process that is busy shows in the runnable count the runtime reads.
- vLLM's own torch work between runs (sampling on [batch, vocab] logits): one thread, as vLLM's
  GPU worker does (`set_torch_threads_for_runtime`), since none of it gains from more.

vLLM starts its workers with OMP_NUM_THREADS set for start-up and marks it as its own
(VLLM_OMP_NUM_THREADS_SET_BY_VLLM=1); left in place, the runtime would take it for the user's
choice and every run would compute with that count (measured: all 307 runs of a 16-request
benchmark at 1 thread). So that value is dropped here once the model is loaded. An
OMP_NUM_THREADS the user set wins: torch and the runtime keep it."""
from __future__ import annotations

import os

import torch
from vllm.logger import init_logger

from rebel.device import gemm_threads

logger = init_logger("vllm.rbln.threads")


def user_chose_threads() -> bool:
    """Whether OMP_NUM_THREADS is the user's (set, and not marked as set by vLLM)."""
    from vllm.utils.torch_utils import OMP_NUM_THREADS_SET_BY_VLLM

    return os.environ.get("OMP_NUM_THREADS") is not None and \
        os.environ.get(OMP_NUM_THREADS_SET_BY_VLLM) != "1"


def set_serving_threads() -> None:
    """After loading: drop vLLM's start-up OMP_NUM_THREADS (the runtime then picks each run's
    count from the free cores) and compute vLLM's own ops with one thread; a user's choice
    stays."""
    from vllm.utils.torch_utils import OMP_NUM_THREADS_SET_BY_VLLM

    if user_chose_threads():
        return
    if os.environ.pop(OMP_NUM_THREADS_SET_BY_VLLM, None) is not None:
        os.environ.pop("OMP_NUM_THREADS", None)
        gemm_threads.refresh()  # multi-row products: the machine's fixed count again
    if torch.get_num_threads() != 1:
        logger.info("vllm_rbln: torch threads %d -> 1 between device runs; each run uses the "
                    "free cores (set RBLN_NUM_THREADS or OMP_NUM_THREADS to choose)",
                    torch.get_num_threads())
        torch.set_num_threads(1)


def set_fixed_serving_threads(local_workers: int = 1) -> None:
    """Path B's policy (vLLM's model class compiled with torch.compile): a fixed count, the
    usable cores less one, shared by this host's workers, at least 1; vLLM's OMP_NUM_THREADS
    stays. Its workers run in lockstep (tensor parallel) and Dynamo guards on the thread count
    it compiled under, so the count does not follow the load. A user's OMP_NUM_THREADS wins."""
    from vllm.utils.torch_utils import available_cpu_count

    if user_chose_threads():
        return
    threads = max(1, (available_cpu_count() - 1) // max(1, local_workers))
    if torch.get_num_threads() != threads:
        logger.info("vllm_rbln: torch threads %d -> %d for serving (set OMP_NUM_THREADS to "
                    "choose)", torch.get_num_threads(), threads)
        torch.set_num_threads(threads)
