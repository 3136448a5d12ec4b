"""vLLM's configuration for Path B (`VLLM_RBLN_USE_VLLM_MODEL=1`): vLLM's own model classes on
a Hugging Face folder, one worker per die.

The KV cache lives in device DRAM and is sized by the request limits, not by free host memory:
max_num_seqs sequences of max_model_len tokens, in block_size-token blocks, plus vLLM's null
block 0. vLLM's own compilation (Inductor, CUDA graphs) stays off; the worker compiles with our
Dynamo backend instead.
"""
from __future__ import annotations

import os

from vllm.logger import init_logger

from . import metrics

logger = init_logger("vllm.rbln.vllm_config")

WORKER = "vllm_rbln.vllm_worker.RblnVllmWorker"
DEFAULT_BLOCK_SIZE = 32


def check_and_update_config(vllm_config) -> None:
    from vllm.config import CompilationMode
    from vllm.config.compilation import CUDAGraphMode

    parallel, cache = vllm_config.parallel_config, vllm_config.cache_config
    scheduler, model = vllm_config.scheduler_config, vllm_config.model_config
    if parallel.decode_context_parallel_size != 1:
        raise ValueError(f"decode_context_parallel_size={parallel.decode_context_parallel_size}: "
                         "vllm_rbln Path B has no decode context parallelism; use 1 "
                         "(tensor_parallel_size splits the model over dies)")
    if parallel.worker_cls == "auto":
        parallel.worker_cls = WORKER
    if parallel.distributed_executor_backend is None:
        parallel.distributed_executor_backend = "uni" if parallel.world_size == 1 else "mp"
    scheduler.async_scheduling = False
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    compilation = vllm_config.compilation_config
    compilation.mode = CompilationMode.NONE
    compilation.cudagraph_mode = CUDAGraphMode.NONE
    compilation.cudagraph_capture_sizes = []
    # vLLM IR ops (rms_norm, fused_add_rms_norm...) wrapped as torch custom ops would reach our
    # compiler as opaque, in-place ops; unwrapped they dispatch to their PyTorch implementations,
    # which Dynamo traces into ATen. vLLM decided this before our hook from its default mode
    # (VLLM_COMPILE + Inductor), so it is overridden here.
    compilation.ir_enable_torch_wrap = False
    metrics.install_collector()  # the predicted NPU time per step on /metrics (see metrics.py)
    if not cache.user_specified_block_size or cache.block_size is None:
        cache.block_size = DEFAULT_BLOCK_SIZE
    if model is None:
        return
    per_sequence = -(-model.max_model_len // cache.block_size)
    cache.num_gpu_blocks_override = scheduler.max_num_seqs * per_sequence + 1
