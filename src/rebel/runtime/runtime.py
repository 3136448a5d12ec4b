"""`rebel.Runtime`: load a compiled model onto a virtual device and run it.

Creating a runtime is when weights go to device DRAM (accounted, and shown on the External HDMA
track of the first trace). Each run copies inputs in, runs the kernels and host fallbacks, copies
outputs out, and leaves a `RunReport` in `last_report`.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree

from ..compiler.artifact import load_artifact
from ..compiler.compile import CompiledProgram
from ..compiler.program import Program
from ..device.engine import EventEngine, Timeline
from ..device.events import HDMA, Event
from ..device.kernels import BoundOp, FunctionalKernel, run_host_ops, to_device_storage
from ..device.memory import device_memory
from ..device.timing import hdma_seconds
from ..errors import DeviceError, InputError, RBLNError
from ..ir import Ref, TensorSpec, dtype_name, to_torch_dtype
from ..npu import current_machine
from .report import RunReport
from .timeline import build_steps

TENSOR_TYPES = ("pt", "np")


class Runtime:
    """Runs a compiled model on one virtual device. Safe to call from several threads."""

    def __init__(self, compiled_model, tensor_type: str = "pt", device: int = 0,
                 activate_profiler: bool | None = None, trace_path: str | os.PathLike | None = None,
                 predictive_dma: bool | None = None):
        """predictive_dma: prefetch the next kernels' weights while the current one runs
        (default on; RBLN_PREDICTIVE_DMA=0 turns it off to measure its gain)."""
        if tensor_type not in TENSOR_TYPES:
            raise RBLNError(f"tensor_type must be one of {TENSOR_TYPES}, got {tensor_type!r}")
        self.compiled = _resolve(compiled_model)
        self.program: Program = self.compiled.program
        self.tensor_type = tensor_type
        self.device = device
        info = current_machine().device(device)
        if info.spec.name != self.program.npu:
            raise DeviceError(f"the model was compiled for {self.program.npu} but rbln:{device} is a "
                              f"{info.spec.name}; recompile with npu={info.spec.name!r}")
        self.spec = info.spec
        self._lock = threading.Lock()
        self._memory = device_memory(device)
        self._handle = self._memory.allocate(
            self.dram_bytes, f"model ({self.program.weight_bytes / 2**20:.1f} MiB weights + "
                             f"{self._activation_bytes() / 2**20:.1f} MiB activations)")
        self._finalizer = weakref.finalize(self, self._memory.free, self._handle)
        self._bind()
        if predictive_dma is None:
            predictive_dma = os.environ.get("RBLN_PREDICTIVE_DMA", "1").lower() not in ("0", "false", "off", "no")
        self.predictive_dma = bool(predictive_dma)
        engine = EventEngine(self.spec, device, prefetch=self.predictive_dma)
        self._timeline: Timeline = engine.run(build_steps(self.program, self.spec))
        self.last_report: RunReport | None = None
        self.runs = 0
        self._profile = _profiler_enabled(activate_profiler)
        self._trace_path = Path(trace_path) if trace_path else None
        self._trace_events: list[Event] = []
        self._clock = 0.0
        if self._profile:
            self._record_weight_upload()

    # --- set-up ---------------------------------------------------------------------------------

    @property
    def dram_bytes(self) -> int:
        """Device DRAM this runtime holds: weights plus activation buffers."""
        return self.program.weight_bytes + self._activation_bytes()

    def _activation_bytes(self) -> int:
        p = self.program
        dram_values = {t.value for k in p.kernels for t in (*k.plan.dma_out, *k.plan.dma_in)
                       if not t.weight}
        dram_values |= {v for s in p.segments for v in s.copy_in}
        return sum(p.values[v].nbytes() for v in dram_values if v in p.values)

    def _bind(self) -> None:
        p = self.program
        self._dtype = to_torch_dtype(p.device_dtype)
        self._weights = {n: (t.float() if t.is_floating_point() else t)
                         for n, t in self.compiled.weights.items()}
        self._segments = []
        for seg in p.segments:
            if seg.kind == "device":
                work = [FunctionalKernel(k.ops, k.outputs, p.device_dtype) for k in seg.kernels]
            else:
                work = [BoundOp.bind(op) for op in seg.ops]
            self._segments.append((seg, work))
        self._out_spec = pytree.treespec_loads(p.out_spec)

    def _record_weight_upload(self) -> None:
        nbytes = self.program.weight_bytes
        if nbytes:
            dur = hdma_seconds(nbytes, self.spec)
            self._trace_events.append(Event(HDMA, self.device, "upload weights", 0.0, dur,
                                            "dma_in", {"bytes": nbytes, "when": "runtime creation"}))
            self._clock = dur

    # --- running --------------------------------------------------------------------------------

    def run(self, *inputs):
        tensors = self._check_inputs(inputs)
        with self._lock:
            start = time.perf_counter()
            outputs = self._execute(tensors)
            wall = time.perf_counter() - start
            events = self._timeline.events
            self.last_report = RunReport.from_events(self.program.npu, self.device, events, wall)
            self.runs += 1
            if self._profile:
                self._append_trace(events)
        return self._convert(outputs)

    __call__ = run

    def _execute(self, inputs: list[torch.Tensor]):
        p = self.program
        host = {name: t for (name, _), t in zip(p.inputs, inputs)}
        dev = dict(self._weights)
        for seg, work in self._segments:
            if seg.kind == "device":
                for v in seg.copy_in:
                    dev[v] = host[v].float() if host[v].is_floating_point() else host[v]
                for kernel in work:
                    kernel(dev)
                for v in seg.copy_out:
                    host[v] = dev[v].to(to_torch_dtype(p.values[v].dtype))
            else:
                for r in {r for op in seg.ops for r in op.refs} - host.keys():
                    host[r] = self._to_host(r, dev)
                run_host_ops(work, host)
        for value, buffer in p.buffer_updates.items():
            new = dev[value] if value in dev else to_device_storage(host[value], self._dtype)
            self._weights[buffer] = new
        flat = [self._to_host(o.name, dev) if isinstance(o, Ref) and o.name not in host
                else (host[o.name] if isinstance(o, Ref) else o) for o in p.outputs]
        return pytree.tree_unflatten(flat, self._out_spec)

    def _to_host(self, name: str, dev: dict) -> torch.Tensor:
        spec = self.program.values.get(name)
        t = dev[name]
        return t.to(to_torch_dtype(spec.dtype)) if spec is not None else t

    def _convert(self, outputs):
        if self.tensor_type == "np":
            return pytree.tree_map(lambda t: t.numpy() if isinstance(t, torch.Tensor) else t, outputs)
        return outputs

    def _check_inputs(self, inputs) -> list[torch.Tensor]:
        expected = self.program.inputs
        if len(inputs) != len(expected):
            sig = ", ".join(f"{n}: {s}" for n, s in expected)
            raise InputError(f"expected {len(expected)} input(s) ({sig}), got {len(inputs)}")
        out = []
        for i, (value, (name, spec)) in enumerate(zip(inputs, expected)):
            if isinstance(value, np.ndarray):
                try:
                    value = torch.from_numpy(value)
                except TypeError as e:
                    raise InputError(f"input {i} ({name}): numpy array of dtype {value.dtype} is not "
                                     f"supported ({e})") from None
            elif not isinstance(value, torch.Tensor):
                raise InputError(f"input {i} ({name}) must be a torch.Tensor or numpy.ndarray, got "
                                 f"{type(value).__name__}")
            if value.device.type != "cpu":
                raise InputError(f"input {i} ({name}) is on {value.device}; pass a CPU tensor")
            got = TensorSpec(tuple(value.shape), dtype_name(value.dtype))
            if got.shape != spec.shape:
                raise InputError(f"input {i} ({name}) has shape {list(got.shape)}, but the model was "
                                 f"compiled for shape {list(spec.shape)}")
            if got.dtype != spec.dtype:
                raise InputError(f"input {i} ({name}) has dtype {got.dtype}, but the model was "
                                 f"compiled for dtype {spec.dtype}")
            out.append(value)
        return out

    # --- profiling ------------------------------------------------------------------------------

    @property
    def trace_path(self) -> Path | None:
        return self._trace_path if self._profile else None

    def _append_trace(self, events: list[Event]) -> None:
        from ..profiler import write_trace

        offset = self._clock
        flow_base = 2 * len(self.program.segments) * self.runs
        for e in events:
            self._trace_events.append(Event(
                e.track, e.device, e.name, e.start_s + offset, e.dur_s, e.category, e.args,
                tuple(f + flow_base for f in e.flow_out), tuple(f + flow_base for f in e.flow_in)))
        self._clock = offset + self._timeline.end_s
        first = self._trace_path is None
        if first:
            folder = Path(os.environ.get("RBLN_PROFILER_DIR", "rbln_traces"))
            self._trace_path = folder / f"rbln_{os.getpid()}_{id(self):x}.pb"
        info = current_machine().device(self.device)
        names = {self.device: f"NPU {self.device} · {info.spec.name} (card {info.card}, die {info.die})"}
        write_trace(self._trace_path, self._trace_events, names)
        if first:
            print(f"rebel: profiler trace written to {self._trace_path} "
                  "(open it at https://ui.perfetto.dev)", file=sys.stderr)

    # --- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Free this runtime's device DRAM now instead of when it is garbage collected."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        p = self.program
        return (f"{type(self).__name__}(npu={p.npu}, device=rbln:{self.device}, "
                f"inputs=[{', '.join(f'{n}: {s}' for n, s in p.inputs)}], "
                f"dram={self.dram_bytes / 2**20:.1f} MiB, predicted latency="
                f"{self._timeline.latency_s * 1e6:.1f} us, tensor_type={self.tensor_type!r}, "
                f"profiler={'on' if self._profile else 'off'})")


class AsyncRuntime(Runtime):
    """A Runtime whose runs can be awaited; runs are queued in order on one worker thread."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rbln-async")

    async def async_run(self, *inputs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: self.run(*inputs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        super().close()


def _resolve(compiled_model) -> CompiledProgram:
    if isinstance(compiled_model, (str, os.PathLike)):
        return load_artifact(compiled_model)
    inner = getattr(compiled_model, "compiled", None)
    if isinstance(inner, CompiledProgram):
        return inner
    if isinstance(compiled_model, CompiledProgram):
        return compiled_model
    raise RBLNError(f"Runtime expects a path to a .rbln file or an RBLNCompiledModel, got "
                    f"{type(compiled_model).__name__}")


def _profiler_enabled(flag: bool | None) -> bool:
    if flag is not None:
        return bool(flag)
    return os.environ.get("RBLN_PROFILER", "0").lower() in ("1", "true", "yes", "on")
