"""Path B's worker (`VLLM_RBLN_USE_VLLM_MODEL=1`): vLLM loads its own model class (Llama, Qwen2,
Qwen3...) from the Hugging Face folder, and its layers attend through `attention.py`'s backend,
which keeps vLLM's paged KV cache and runs the device's paged attention op on it.

It is vLLM's GPU worker with the CPU worker's host-side choices (host tensors, gloo process
groups), minus the CPU worker's C kernels (`torch.ops._C.init_cpu_memory_env`: vllm._C dies with
SIGILL on a host without AVX-512). The KV cache is sized from the request limits (max_num_seqs
sequences of max_model_len tokens, plus vLLM's null block; see platform.py), as device DRAM holds
it, not from free host memory.
"""
from __future__ import annotations

import contextlib

import torch
from vllm.logger import init_logger
from vllm.v1.worker.gpu_worker import Worker, init_worker_distributed_environment
from vllm.v1.worker.worker_base import CompilationTimes

from .threads import set_fixed_serving_threads
from .vllm_model_runner import RblnVllmModelRunner

logger = init_logger("vllm.rbln.vllm_worker")


class RblnVllmWorker(Worker):
    def init_device(self) -> None:
        import torch_rbln  # noqa: F401  ("rbln" as torch's accelerator, as in Path A)
        from vllm.utils.torch_utils import set_random_seed

        self.device = torch.device("cpu")
        init_worker_distributed_environment(self.vllm_config, self.rank,
                                            self.distributed_init_method, self.local_rank, "gloo")
        set_random_seed(self.model_config.seed)
        self.model_runner = RblnVllmModelRunner(self.vllm_config, self.device)

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)  # ends at 1 thread, a GPU worker's choice
        # before warm-up compiles the graphs (Dynamo guards on the thread count)
        set_fixed_serving_threads(self.parallel_config.local_world_size)

    def _maybe_get_memory_pool_context(self, tag: str):
        return contextlib.nullcontext()  # no sleep-mode allocator: host tensors, device DRAM

    def sleep(self, level: int = 1) -> None:
        logger.warning("vllm_rbln: sleep mode is not supported; ignored")

    def wake_up(self, tags=None) -> None:
        logger.warning("vllm_rbln: sleep mode is not supported; ignored")

    def determine_available_memory(self) -> int:
        """The bytes of the KV cache: the block count platform.py fixed (num_gpu_blocks_override),
        at this worker's page size."""
        specs = self.get_kv_cache_spec()
        blocks = self.cache_config.num_gpu_blocks_override
        return blocks * sum(spec.page_size_bytes for spec in specs.values())

    def compile_or_warm_up_model(self) -> CompilationTimes:
        seconds = self.model_runner.warm_up()
        from vllm.utils.torch_utils import set_random_seed
        set_random_seed(self.model_config.seed)
        return CompilationTimes(language_model=seconds, encoder=0.0)

    def rbln_stats(self) -> dict:
        """What the runner did: `llm.collective_rpc("rbln_stats")`."""
        return self.model_runner.rbln_stats()
