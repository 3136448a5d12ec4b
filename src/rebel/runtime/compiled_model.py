"""`RBLNCompiledModel`: what `compile_from_torch` returns; saves to .rbln and makes runtimes."""
from __future__ import annotations

import os
from pathlib import Path

from ..compiler.artifact import load_artifact, save_artifact
from ..compiler.compile import CompiledProgram
from .runtime import AsyncRuntime, Runtime, activation_bytes
from .timeline import predict


class RBLNCompiledModel:
    def __init__(self, compiled: CompiledProgram | str | os.PathLike):
        """compiled: what the compiler produced, or the path of a saved .rbln artifact (the
        vendor's `rebel.RBLNCompiledModel(path)` loads a model this way)."""
        if isinstance(compiled, (str, os.PathLike)):
            compiled = load_artifact(compiled)
        elif not isinstance(compiled, CompiledProgram):
            raise TypeError(f"RBLNCompiledModel expects a compiled program or a .rbln path, got "
                            f"{type(compiled).__name__}")
        self.compiled = compiled

    @property
    def program(self):
        return self.compiled.program

    @property
    def buckets(self):
        """The shape buckets' programs; the runtime runs the one matching its inputs."""
        return self.compiled.buckets

    @property
    def is_meta(self) -> bool:
        """Compiled from meta tensors: predicts memory and latency, cannot run."""
        return self.compiled.meta

    def device_memory_bytes(self) -> int:
        """Device DRAM a runtime of this model takes: weights plus the largest bucket's
        activations (buckets run one at a time and share the activation area)."""
        return self.program.weight_bytes + max(activation_bytes(p) for p in self.buckets)

    @property
    def npu(self) -> str:
        return self.program.npu

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as a .rbln artifact (zip of JSON program + safetensors weights)."""
        return save_artifact(self.compiled, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RBLNCompiledModel:
        return cls(load_artifact(path))

    def create_runtime(self, **kwargs) -> Runtime:
        return Runtime(self, **kwargs)

    def create_async_runtime(self, **kwargs) -> AsyncRuntime:
        return AsyncRuntime(self, **kwargs)

    def predicted_latency_s(self, device: int = 0, predictive_dma: bool = True,
                            bucket: int = 0) -> float:
        """Predicted time of one run (of shape bucket `bucket`) on the modelled NPU, without
        running it."""
        return predict(self.buckets[bucket], self.compiled.spec, device, predictive_dma).latency_s

    def __repr__(self) -> str:
        p = self.program
        kernels = p.kernels
        fused = sum(1 for k in kernels if len([o for o in k.ops if o.kind != "alias"]) > 1)
        lines = [f"RBLNCompiledModel(npu={p.npu}, device_dtype={p.device_dtype},",
                 f"  inputs=[{', '.join(f'{n}: {s}' for n, s in p.inputs)}],",
                 f"  outputs={len(p.outputs)}, weights={p.weight_bytes / 2**20:.2f} MiB,",
                 f"  kernels={len(kernels)} ({fused} fused), host fallbacks={len(p.host_ops)}, "
                 f"segments={len(p.segments)}, buckets={len(self.buckets)}"
                 f"{', meta (prediction only)' if self.is_meta else ''},",
                 f"  predicted latency={self.predicted_latency_s() * 1e6:.1f} us)"]
        return "\n".join(lines)
