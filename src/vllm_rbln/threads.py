"""How many torch threads the engine process computes with once the model is loaded.

The virtual NPU computes on the host's cores: its kernels are torch ops on CPU tensors, so the
engine process is in the position of vLLM's CPU worker, not of its GPU worker. vLLM's CPU platform
gives its worker every usable core but one, which it keeps for the scheduler / front-end process,
and vLLM's GPU worker drops to one thread (`set_torch_threads_for_runtime`), since there the host
only schedules. Without either, torch keeps its default (every core) and on a busy or small host
each of the graphs' many small ops waits at an OpenMP barrier for a thread that another process
holds: on a 2-core box shared with other jobs one SmolLM2 decode step of 4 sequences took
1.5-4 s with 2 threads and 0.2-0.5 s with 1, in the same process, one after the other.

So: the usable cores (scheduling affinity and cgroup quota, vLLM's `available_cpu_count`) minus
one, shared by the workers of this host, at least 1. An OMP_NUM_THREADS the user set wins (vLLM
marks the one it sets itself for start-up)."""
from __future__ import annotations

import os

import torch
from vllm.logger import init_logger

logger = init_logger("vllm.rbln.threads")


def serving_threads(local_workers: int = 1) -> int | None:
    """The thread count for one worker, or None where the user chose it (OMP_NUM_THREADS)."""
    from vllm.utils.torch_utils import OMP_NUM_THREADS_SET_BY_VLLM, available_cpu_count

    if os.environ.get("OMP_NUM_THREADS") is not None and \
            os.environ.get(OMP_NUM_THREADS_SET_BY_VLLM) != "1":
        return None
    return max(1, (available_cpu_count() - 1) // max(1, local_workers))


def set_serving_threads(local_workers: int = 1) -> None:
    threads = serving_threads(local_workers)
    if threads is not None and torch.get_num_threads() != threads:
        logger.info("vllm_rbln: torch threads %d -> %d for serving (set OMP_NUM_THREADS to "
                    "choose)", torch.get_num_threads(), threads)
        torch.set_num_threads(threads)
