"""The vLLM worker for a compiled RBLN LLM: loads the compiled folder, tells vLLM the KV-cache
layout the graphs were compiled with, and hands each scheduled step to `RblnModelRunner`."""
from __future__ import annotations

import dataclasses
import os
import time

import torch
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec
from vllm.v1.worker.worker_base import CompilationTimes, WorkerBase

from optimum.rbln.auto import RBLNAutoModelForCausalLM
from rebel.plan.paged import kv_heads_and_dim

from . import metrics
from .model_runner import RblnModelRunner
from .platform import vllm_blocks
from .threads import set_serving_threads

logger = init_logger("vllm.rbln.worker")


class RblnWorker(WorkerBase):
    def init_device(self) -> None:
        # torch_rbln (normally autoloaded with torch) makes "rbln" torch's accelerator; vLLM's
        # shutdown calls torch.accelerator.empty_cache() on it.
        import torch_rbln  # noqa: F401
        from vllm.v1.worker.gpu_worker import init_worker_distributed_environment
        self.device = torch.device("cpu")
        # vLLM's model runner asks for its (single-rank) process groups, as on the CPU platform
        init_worker_distributed_environment(self.vllm_config, self.rank,
                                            self.distributed_init_method, self.local_rank, "gloo")

    def load_model(self, *, load_dummy_weights: bool = False) -> None:
        self.model = RBLNAutoModelForCausalLM.from_pretrained(self.model_config.model, export=False)
        self.runner = RblnModelRunner(self.vllm_config, self.device)
        self.runner.attach(self.model.paged_graphs())
        logger.info("loaded %r", self.model)
        set_serving_threads()  # the graphs compute on the host's cores: threads.py says why

    def get_model(self):
        return self.model

    def get_supported_tasks(self):
        return ("generate",)

    def _kv_spec(self) -> FullAttentionSpec:
        kv_heads, head_dim = kv_heads_and_dim(self.model.config)
        o = self.model.rbln_config
        return FullAttentionSpec(block_size=o.block_size, num_kv_heads=kv_heads,
                                 head_size=head_dim, dtype=getattr(torch, o.device_dtype))

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        spec = self._kv_spec()
        return {f"model.layers.{i}.self_attn.attn": spec
                for i in range(self.model.config.num_hidden_layers)}

    def get_supported_kv_cache_layouts(self) -> list[str]:
        from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts
        return [layout.name for layout in get_supported_kv_cache_layouts([])]

    def determine_available_memory(self) -> int:
        """The bytes of the KV-cache blocks vLLM manages (`vllm_blocks`: the compiled model's
        device blocks plus vLLM's null block), so vLLM's own count from these bytes equals
        num_gpu_blocks_override."""
        return (vllm_blocks(self.model.rbln_config) * self._kv_spec().page_size_bytes
                * self.model.config.num_hidden_layers)

    def initialize_from_config(self, kv_cache_config) -> None:
        self.cache_config.num_gpu_blocks = kv_cache_config.num_blocks
        self.runner.initialize_kv_cache(kv_cache_config)

    def compile_or_warm_up_model(self) -> CompilationTimes:
        return CompilationTimes(language_model=0.0, encoder=0.0)  # compiled ahead of time

    def execute_model(self, scheduler_output):
        output = self.runner.execute_model(scheduler_output)
        self._log_npu_time()
        self._export_npu_time()
        return output

    def _export_npu_time(self) -> None:
        """This step's predicted NPU time into the file the API server's /metrics reads."""
        if os.environ.get(metrics.ENV) is None or self.runner.last_step is None:
            return
        if not hasattr(self, "_metrics"):
            self._metrics = metrics.StepMetrics()
        self._metrics.observe(*self.runner.last_step)
        metrics.export(self._metrics)

    def _log_npu_time(self) -> None:
        """Put the predicted NPU time per step in the server's log: at the first step, then at
        most every VLLM_LOG_STATS_INTERVAL seconds (vLLM's own throughput line's interval), over
        the steps since the last line. The wall time of this emulation says nothing about the
        chip; this figure is what a served model would cost on it."""
        import vllm.envs as envs
        now, stats = time.monotonic(), self.runner.stats
        last_time, last = getattr(self, "_npu_logged", (None, None))
        if last_time is not None and now - last_time < envs.VLLM_LOG_STATS_INTERVAL:
            return
        last = last or type(stats)()
        steps = stats.steps - last.steps
        if not steps:
            return
        prefill, decode = stats.prefill_s - last.prefill_s, stats.decode_s - last.decode_s
        logger.info("vllm_rbln: predicted NPU time per step %.3f ms over %d steps "
                    "(%.2f ms prefill in %d chunks, %.2f ms decode in %d batches)",
                    (prefill + decode) * 1e3 / steps, steps, prefill * 1e3,
                    stats.prefill_chunks - last.prefill_chunks, decode * 1e3,
                    stats.decode_batches - last.decode_batches)
        self._npu_logged = (now, dataclasses.replace(stats))

    def sample_tokens(self, grammar_output):
        return self.runner.sample_tokens(grammar_output)

    def rbln_stats(self) -> dict:
        """What the runner did and the NPU time predicted for it:
        `llm.collective_rpc("rbln_stats")`."""
        return dataclasses.asdict(self.runner.stats)

    def shutdown(self) -> None:
        if hasattr(self, "runner"):
            logger.info("vllm_rbln: %s", self.runner.stats)
