"""`RBLNCompiledModel`: what `compile_from_torch` returns; saves to .rbln and makes runtimes."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..compiler.artifact import load_artifact, save_artifact
from ..compiler.compile import CompiledProgram
from ..errors import CompileError
from ..ir import TensorSpec
from .runtime import AsyncRuntime, Runtime, activation_bytes
from .timeline import predict


class RBLNCompiledModel:
    def __init__(self, compiled: CompiledProgram | str | os.PathLike):
        """compiled: what the compiler produced, or the path of a saved .rbln artifact (the
        vendor's `rebel.RBLNCompiledModel(path)` loads a model this way)."""
        self.source_path = None  # the .rbln it was loaded from (names its runtimes' stage)
        if isinstance(compiled, (str, os.PathLike)):
            self.source_path = Path(compiled)
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
        activations (buckets run one at a time and share the activation area), plus its static
        buffers (held once per compile context, whichever of its runtimes comes first)."""
        return (self.program.weight_bytes + max(activation_bytes(p) for p in self.buckets)
                + sum(self._static_local_bytes().values()))

    # --- the vendor's memory queries (answered from our DRAM accounting) ------------------------
    # Nodes are the devices a runtime uses (the tensor-parallel dies); an ATOM die is one
    # chiplet. Sizes are bytes per die, as the runtime allocates them (device_memory).

    def get_alloc_per_chiplet_by_key(self) -> dict[str, list[list[int]]]:
        """{kind: [[bytes per chiplet] per node]} for what a runtime of this model allocates:
        "Weight" (with weight sharing, only the weights this model is the first of its context
        to hold: the others are counted by the model that owns them, so summing over a
        context's models counts each weight once), "Activation" (largest bucket) and
        "DramTensor" (static buffers: shared by the context, so count them from one model)."""
        nodes = self.program.tensor_parallel_size
        return {"Weight": [[self._counted_weight_bytes()] for _ in range(nodes)],
                "Activation": [[max(activation_bytes(p) for p in self.buckets)] for _ in range(nodes)],
                "DramTensor": [[sum(self._static_local_bytes().values())] for _ in range(nodes)]}

    def exp_get_dram_tensor_sizes(self) -> dict[str, list[list[int]]]:
        """{static buffer name: [[bytes per chiplet] per node]} at their allocated sizes."""
        nodes = self.program.tensor_parallel_size
        return {name: [[nbytes] for _ in range(nodes)]
                for name, nbytes in self._static_local_bytes().items()}

    def exp_multiply_buffer_size(self, factors: dict[str, int]) -> None:
        """Grow static buffers along their first dim (a paged KV cache's blocks): `{name: m}`
        makes buffer `name` m times its current size. Runtimes created afterwards allocate the
        new size; a saved artifact keeps it."""
        for name, m in self._resizable(factors).items():
            if isinstance(m, bool) or not isinstance(m, int) or m < 1:
                raise CompileError(f"exp_multiply_buffer_size: factor for {name!r} must be an int "
                                   f">= 1, got {m!r}")
            self._set_first_dim(name, self._first_dim(name) * m)

    def exp_rescale_buffer_size(self, ratios: dict[str, tuple[int, int]]) -> None:
        """`{name: (target, current)}`: scale buffer `name`'s first dim by target/current (the
        vendor's post-compile KV-block resize); the result must be a whole number of rows."""
        for name, ratio in self._resizable(ratios).items():
            try:
                target, current = (int(x) for x in ratio)
            except (TypeError, ValueError):
                raise CompileError(f"exp_rescale_buffer_size: {name!r} needs (target, current), "
                                   f"got {ratio!r}") from None
            if target < 1 or current < 1:
                raise CompileError(f"exp_rescale_buffer_size: {name!r} needs positive counts, "
                                   f"got {ratio!r}")
            rows = self._first_dim(name) * target
            if rows % current:
                raise CompileError(f"exp_rescale_buffer_size: {name!r} has {self._first_dim(name)} "
                                   f"rows, which {target}/{current} does not scale to a whole number")
            self._set_first_dim(name, rows // current)

    def _static_local_bytes(self) -> dict[str, int]:
        out = {}
        for p in self.buckets:
            for name in p.static_buffers:
                out.setdefault(name, p.static_local_bytes(name))
        return out

    def _counted_weight_bytes(self) -> int:
        context = self.compiled.context
        if not (context and context.get("weight_sharing")):
            return self.program.weight_bytes
        p = self.program
        owned = set(context.get("owned_weights", [])) | (set(p.mutable_buffers) - set(p.static_buffers))
        return sum(TensorSpec(p.sharding.local_shape(n, s.shape), s.dtype).nbytes()
                   for n, s in p.weights.items() if n in owned)

    def _resizable(self, table: dict) -> dict:
        if not isinstance(table, dict):
            raise CompileError(f"expected a dict of static buffer names, got {type(table).__name__}")
        names = self._static_local_bytes()
        unknown = sorted(set(table) - set(names))
        if unknown:
            raise CompileError(f"no static buffer named {unknown} in this model; its static buffers "
                               f"are {sorted(names)}")
        return table

    def _first_dim(self, name: str) -> int:
        return next(p.static_buffers[name][0] for p in self.buckets if name in p.static_buffers)

    def _set_first_dim(self, name: str, rows: int) -> None:
        compiled = next(p.weights[name].shape[0] for p in self.buckets if name in p.static_buffers)
        if rows < compiled:
            raise CompileError(f"static buffer {name!r} cannot shrink to {rows} rows: it was "
                               f"compiled with {compiled} and its kernels address all of them")
        for p in self.buckets:
            if name in p.static_buffers:
                p.resize_static_buffer(name, rows)

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

    def predicted_latency_s(self, device: int | Sequence[int] = 0, predictive_dma: bool = True,
                            bucket: int = 0) -> float:
        """Predicted time of one run (of shape bucket `bucket`) on the modelled NPU, without
        running it. device: as for `Runtime` (a first index, or every die of a tensor-parallel
        model): its collectives take the die-to-die link when the dies share a card, else the
        card-to-card link, as the runtime placed there times them."""
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
        if self.compiled.context:
            c = self.compiled.context
            buffers = ", ".join(f"{n}: {p.static_buffer_spec(n)}" for n in p.static_buffers)
            lines[-1] = lines[-1][:-1] + ","
            lines.append(f"  compile context={c['id'][:8]} (weight sharing "
                         f"{'on' if c['weight_sharing'] else 'off'}), static buffers=[{buffers}])")
        return "\n".join(lines)
