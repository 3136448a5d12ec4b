"""The "rbln" platform: vLLM's scheduler, tokenizer and API on top, a compiled RBLN LLM below.

vLLM serves a folder written by `RBLN<Model>ForCausalLM.from_pretrained(..., export=True)
.save_pretrained(folder)`. Its rbln_config.json fixes what vLLM must agree with: the KV-cache block
size (rbln_kvcache_block_size, which defaults to rbln_kvcache_partition_len), the number of
blocks (rbln_batch_size sequences of rbln_max_seq_len tokens, plus vLLM's null block), the longest
sequence and the batch. Tensors on the vLLM side stay on the host ("cpu"); the virtual NPU runs
inside the compiled model's runtime.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger
from vllm.platforms.interface import Platform, PlatformEnum

from . import metrics

logger = init_logger("vllm.rbln.platform")  # under "vllm" so vLLM's handlers print it

WORKER = "vllm_rbln.worker.RblnWorker"
VLLM_MODEL_WORKER = "vllm_rbln.vllm_worker.RblnVllmWorker"
USE_VLLM_MODEL = "VLLM_RBLN_USE_VLLM_MODEL"
# Set by rebel.plan.serving while it builds a scheduler configuration for a model that exists
# only as a config.json (a capacity plan): no compiled folder to agree with, nothing will run.
SIMULATION = "RBLN_VLLM_SIMULATION"


def use_vllm_model() -> bool:
    """Path B: vLLM's own model classes on a Hugging Face folder (see vllm_worker.py), instead of
    a folder compiled by optimum.rbln."""
    return os.environ.get(USE_VLLM_MODEL, "0") == "1"


class RblnPlatformError(ValueError):
    """A vLLM option that the compiled model cannot honour."""


class RblnRequestError(VLLMValidationError, ValueError):
    """A request the compiled model cannot honour. vLLM's `VLLMValidationError` is what its
    servers map to HTTP 400 (a request error) rather than 500; `ValueError` keeps
    `except ValueError` in offline callers working."""


def compiled_options(folder: str | Path):
    """The folder's `RBLNConfig` (its defaults filled as for a folder loaded to run it)."""
    from optimum.rbln.configuration import CONFIG_NAME, RBLNConfig
    if not (Path(folder) / CONFIG_NAME).is_file():
        raise RblnPlatformError(
            f"vllm_rbln serves compiled models: {folder} has no rbln_config.json. Compile it first, "
            f"e.g. RBLNLlamaForCausalLM.from_pretrained(model_id, export=True, rbln_batch_size=4)"
            f".save_pretrained(folder), then LLM(model=folder)")
    return RBLNConfig.load(Path(folder))


def vllm_blocks(o) -> int:
    """The KV-cache blocks vLLM manages for a compiled folder: its rbln_batch_size x
    blocks_per_sequence device blocks plus vLLM's null block 0 (never given to a request; vLLM's
    block id b is cache block b - 1)."""
    return o.batch_size * o.blocks_per_sequence + 1


class RblnPlatform(Platform):
    _enum = PlatformEnum.OOT
    device_name = "rbln"
    device_type = "cpu"        # torch.device() of the host tensors vLLM handles
    dispatch_key = "CPU"
    dist_backend = "gloo"
    device_control_env_var = "RBLN_DEVICES"

    @property
    def supported_dtypes(self) -> list[torch.dtype]:
        # float32 first: with dtype="auto" vLLM keeps an FP32 checkpoint's dtype for host tensors;
        # the device computes in its own 16-bit format whatever vLLM's dtype says.
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def import_kernels(cls) -> None:
        """vLLM's C kernels (vllm._C) are not used: the compiled graphs run in our runtime and
        vLLM's sampler has PyTorch paths. Importing them kills the process (SIGILL) on a host CPU
        without the AVX-512 the CPU wheel was built for, before any Python error can be raised."""

    @classmethod
    def get_device_name(cls, device_id: int = 0) -> str:
        import rebel
        return rebel.get_npu_name(device_id)

    @classmethod
    def get_device_total_memory(cls, device_id: int = 0) -> int:
        from rebel.npu.machine import current_machine
        return current_machine().spec.die.memory.dram_bytes

    @classmethod
    def set_device(cls, device: torch.device) -> None:
        pass  # the compiled model's runtime places itself (rbln_device)

    @classmethod
    def manual_seed_all(cls, seed: int) -> None:
        pass  # sampling uses host generators; torch.manual_seed covers them

    @classmethod
    def inference_mode(cls):
        return torch.no_grad()

    @classmethod
    def is_pin_memory_available(cls) -> bool:
        return False

    @classmethod
    def get_current_memory_usage(cls, device=None) -> float:
        return 0.0

    @classmethod
    def get_device_communicator_cls(cls) -> str:
        if use_vllm_model():
            return "vllm_rbln.communicator.RblnCommunicator"
        return "vllm.distributed.device_communicators.cpu_communicator.CpuCommunicator"

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        # vLLM never builds its own attention here (the worker runs compiled graphs), but config
        # checks ask for a backend; the CPU one describes host tensors correctly.
        if use_vllm_model():
            from . import attention
            return attention.register()
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        return AttentionBackendEnum.CPU_ATTN.get_path()

    @classmethod
    def update_block_size_for_backend(cls, vllm_config) -> None:
        pass  # the compiled model fixed the block size (check_and_update_config)

    @classmethod
    def validate_request(cls, processed_inputs, params) -> None:
        from vllm import SamplingParams
        if not isinstance(params, SamplingParams):
            raise RblnPlatformError("vllm_rbln serves text generation only (no pooling models)")
        if params.prompt_logprobs is not None:
            # vLLM's validation error: the OpenAI server answers it with HTTP 400, not 500
            raise RblnRequestError("vllm_rbln does not support prompt_logprobs: the compiled "
                                   "prefill graph returns the logits of a chunk's last token only",
                                   parameter="prompt_logprobs", value=params.prompt_logprobs)

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        """Make vLLM's configuration agree with the compiled model (runs in every process)."""
        from vllm.config import CompilationMode
        from vllm.config.compilation import CUDAGraphMode

        parallel, cache = vllm_config.parallel_config, vllm_config.cache_config
        scheduler, model = vllm_config.scheduler_config, vllm_config.model_config
        if use_vllm_model():
            from .vllm_config import check_and_update_config
            check_and_update_config(vllm_config)
            return
        if parallel.worker_cls == "auto":
            parallel.worker_cls = WORKER
        if parallel.distributed_executor_backend is None:
            parallel.distributed_executor_backend = "uni"
        scheduler.async_scheduling = False  # the worker samples in sample_tokens, step by step
        # A forked engine process deadlocks once the parent has used torch's OpenMP thread pool
        # (compiling or running a model first): start it fresh, as vLLM's CPU platform does.
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        compilation = vllm_config.compilation_config
        compilation.mode = CompilationMode.NONE
        compilation.cudagraph_mode = CUDAGraphMode.NONE
        compilation.cudagraph_capture_sizes = []
        metrics.install_collector()  # the predicted NPU time on /metrics (see metrics.py)
        if model is None or os.environ.get(SIMULATION) == "1":
            return
        o = compiled_options(model.model)
        if parallel.world_size != 1:
            raise RblnPlatformError(
                f"tensor/pipeline parallelism is compiled into the model "
                f"(rbln_tensor_parallel_size={o.tensor_parallel_size}); run vLLM with "
                f"tensor_parallel_size=1 and pipeline_parallel_size=1")
        block = o.block_size
        if cache.user_specified_block_size and cache.block_size != block:
            raise RblnPlatformError(f"block_size={cache.block_size} differs from the compiled "
                                    f"rbln_kvcache_block_size={block}; pass block_size={block} "
                                    f"(or recompile with rbln_kvcache_block_size="
                                    f"{cache.block_size}, a divisor of rbln_kvcache_partition_len="
                                    f"{o.kvcache_partition_len})")
        cache.block_size = block
        cache.num_gpu_blocks_override = vllm_blocks(o)
        if model.max_model_len > o.max_seq_len:
            if model.original_max_model_len is not None:
                raise RblnPlatformError(f"max_model_len={model.max_model_len} exceeds the compiled "
                                        f"rbln_max_seq_len={o.max_seq_len}")
            model.max_model_len = o.max_seq_len
        if scheduler.max_num_seqs > o.batch_size:
            logger.info("max_num_seqs %d -> %d (the compiled rbln_batch_size)",
                        scheduler.max_num_seqs, o.batch_size)
            scheduler.max_num_seqs = o.batch_size
