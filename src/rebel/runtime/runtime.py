"""`rebel.Runtime`: load a compiled model onto a virtual device and run it.

Creating a runtime is when weights go to device DRAM (accounted, and shown on the External HDMA
track of the first trace). Each run copies inputs in, runs the kernels and host fallbacks, copies
outputs out, and leaves a `RunReport` in `last_report`.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree as pytree

from ..compiler.artifact import load_artifact
from ..compiler.buckets import select_bucket
from ..compiler.compile import CompiledProgram
from ..compiler.program import Program
from ..device.engine import EventEngine, Timeline
from ..device.events import HDMA, Event
from ..device.memory import device_memory
from ..device.packed_linear import packed_weights
from ..device.timing import hdma_seconds
from ..errors import ArtifactError, DeviceError, InputError, RBLNError
from ..ir import TensorSpec, dtype_name, to_torch_dtype
from ..npu import current_machine
from ..profiler.trace_file import TraceFile
from . import device_state
from .executor import (bind_segments, execute, executor_mode, pack_weights, place_weights,
                       sixteen_bit_only)
from .host_memory import is_pinned
from .report import RunReport
from .threads import run_threads_set
from .timeline import TimelineCache, group_link, paged_fill, paged_sites

TENSOR_TYPES = ("pt", "np")


class Runtime:
    """Runs a compiled model on one virtual device. Safe to call from several threads."""

    def __init__(self, compiled_model, tensor_type: str = "pt", device: int | Sequence[int] | None = 0,
                 activate_profiler: bool | None = None, trace_path: str | os.PathLike | None = None,
                 predictive_dma: bool | None = None, timeout: float | None = None):
        """device: a device index, or the devices of a tensor-parallel model (default: as many
        consecutive devices from `device` as the model was compiled for); None means device 0
        (the vendor's config defaults pass None). timeout: seconds a run waits for this runtime
        (another thread's run holds it) before raising RBLNError; None waits for ever. Runs
        themselves are not interrupted: the virtual device has no hung-hardware case. predictive_dma:
        prefetch the next kernels' weights while the current one runs (default on;
        RBLN_PREDICTIVE_DMA=0 turns it off to measure its gain)."""
        if tensor_type not in TENSOR_TYPES:
            raise RBLNError(f"tensor_type must be one of {TENSOR_TYPES}, got {tensor_type!r}")
        self.compiled = _resolve(compiled_model)
        # What a pipeline orchestrator calls this runtime's stage: settable; by default the
        # artifact's name ("text_encoder" for the vendor's text_encoder/model.rbln).
        self.name: str | None = _stage_name(compiled_model)
        if self.compiled.meta:
            raise RBLNError(
                "this model was compiled from meta tensors (shapes without weights): it is for "
                "prediction only and cannot run. Use compiled.device_memory_bytes(), "
                "compiled.predicted_latency_s() or rebel.explain(compiled), or compile it with "
                "real weights to run it")
        # The bucket that runs (bucket 0 until a run picks another by its input shapes).
        self.program: Program = self.compiled.program
        self.tensor_type = tensor_type
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or timeout < 0):
            raise RBLNError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
        self.timeout = timeout
        if device is None:
            device = 0
        self.devices = _devices(device, self.program.tensor_parallel_size)
        self.device = self.devices[0]
        for index in self.devices:
            info = current_machine().device(index)
            if info.spec.name != self.program.npu:
                raise DeviceError(f"the model was compiled for {self.program.npu} but rbln:{index} is "
                                  f"a {info.spec.name}; recompile with npu={info.spec.name!r}")
        self.spec = current_machine().device(self.device).spec
        # A runtime of a compile context joins the context's state on its devices (static
        # buffers, shared weights, one run lock for all of them); others hold their own lock.
        context = self.compiled.context
        self._state = device_state.join(context["id"], self.devices) if context else None
        self._shared_keys: list[str] = []  # weight keys this runtime holds in the shared state
        self._lock = self._state.lock if self._state is not None else threading.Lock()
        what = (f"model ({self._own_weight_bytes() / 2**20:.1f} MiB weights + "
                f"{self._activation_bytes() / 2**20:.1f} MiB activations per device)")
        held = []
        self._finalizer = weakref.finalize(self, _release, held, self._state, self._shared_keys)
        try:
            for index in self.devices:
                memory = device_memory(index)
                held.append((memory, memory.allocate(self.dram_bytes, what)))
        except Exception:
            self._finalizer()
            raise
        if predictive_dma is None:
            predictive_dma = os.environ.get("RBLN_PREDICTIVE_DMA", "1").lower() not in ("0", "false", "off", "no")
        self.predictive_dma = bool(predictive_dma)
        try:
            self._bind()
        except RBLNError:
            self._finalizer()
            raise
        try:
            link = group_link(self.devices, self.spec)  # as compiled.predicted_latency_s times it
            self._engine = EventEngine(self.spec, self.device, prefetch=self.predictive_dma,
                                       group=self.devices, link=link)
            for bucket in self._buckets:
                bucket.timeline = bucket.timelines.get(self._engine, bucket.program, self.spec,
                                                       device=self.device)[0]
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            # The loader checks a program's structure; this is the net for what it cannot see.
            # Only a file gets this treatment: in a model compiled in-process it would be our bug.
            self._finalizer()
            if not isinstance(compiled_model, (str, os.PathLike)):
                raise
            raise ArtifactError(f"{compiled_model}: the program is inconsistent "
                                f"({type(e).__name__}: {e})"[:400]) from None
        self._timeline: Timeline = self._buckets[0].timeline
        self.last_report: RunReport | None = None
        self._local = threading.local()  # each thread's own latest report (thread_last_report)
        self.runs = 0
        self._profile = _profiler_enabled(activate_profiler)
        self._trace: TraceFile | None = None
        if self._profile:
            self._start_trace(trace_path)

    # --- set-up ---------------------------------------------------------------------------------

    @property
    def dram_bytes(self) -> int:
        """Device DRAM this runtime holds itself: its weights (none when its compile context
        shares weights: the context holds those) plus activation buffers. Static buffers are
        the context's (see `context_dram_bytes`)."""
        return self._own_weight_bytes() + self._activation_bytes()

    def _own_weight_bytes(self) -> int:
        context = self.compiled.context
        if not (context and context.get("weight_sharing")):
            return self.program.weight_bytes
        p = self.program  # shared weights are the context's; buffers a graph writes stay ours
        return sum(TensorSpec(p.sharding.local_shape(n, p.weights[n].shape), p.weights[n].dtype).nbytes()
                   for n in p.mutable_buffers if n not in p.static_buffers)

    @property
    def context_dram_bytes(self) -> int:
        """Device DRAM (per device) the compile context's shared state holds on this runtime's
        devices: static buffers plus shared weights, counted once for all its runtimes."""
        if self._state is None:
            return 0
        return self._state.dram_bytes

    def _activation_bytes(self) -> int:
        # Buckets run one at a time, so they reuse one activation area: the largest one's.
        return max(activation_bytes(p) for p in self.compiled.buckets)

    def _bind(self) -> None:
        self._dtype = to_torch_dtype(self.program.device_dtype)
        mode = executor_mode()
        # Weights shared through the compile context keep their plain copy for the other
        # runtimes, so a 16-bit copy per runtime would only add memory: oneDNN's packing only.
        sharing = self._state is not None and bool((self.compiled.context or {}).get("weight_sharing"))
        packed = packed_weights(self.compiled.buckets, sixteen_bit=not sharing) \
            if mode == "generated" else {}
        self._die_weights = place_weights(self.program, self.compiled.weights,
                                          sixteen_bit_only(self.compiled.buckets, packed), self._dtype)
        self._static = None
        if self._state is not None:
            self._join_context_state()
        pack_weights(self.compiled.buckets, self._die_weights, packed, self._dtype)
        self._buckets = []
        for p in self.compiled.buckets:
            segments = bind_segments(p, mode, packed)
            self._buckets.append(_Bucket(p, segments, pytree.treespec_loads(p.out_spec),
                                         paged=paged_sites(p)))
        self._segments, self._out_spec = self._buckets[0].segments, self._buckets[0].out_spec

    def _join_context_state(self) -> None:
        """Use the context's static buffers (allocating the missing ones) and, with weight
        sharing, the context's copy of each weight this model holds (registering the others)."""
        context = self.compiled.context
        for program in self.compiled.buckets:
            for name in program.static_buffers:
                self._state.ensure_static(program, name)
        self._static = self._state.static
        if not context.get("weight_sharing"):
            return
        keys = context.get("weight_keys", {})
        program = self.program
        for name in self._die_weights[0]:
            key = keys.get(name)
            if key is None:
                raise ArtifactError(f"weight {name!r} has no content key in the compile context "
                                    "record, so it cannot be shared")
            if name in program.mutable_buffers:  # a module buffer a graph writes is per runtime
                continue
            mine = [die[name] for die in self._die_weights]
            stored = self.compiled.weights[name]  # floats already in the device dtype
            local = TensorSpec(program.sharding.local_shape(name, tuple(stored.shape)),
                               dtype_name(stored.dtype))
            shared = self._state.shared_weight(key, lambda mine=mine: mine, local.nbytes(),
                                               f"shared weight {name!r}")
            self._shared_keys.append(key)
            for die, tensor in zip(self._die_weights, shared):
                die[name] = tensor

    def _select_bucket(self, inputs) -> _Bucket:
        """The bucket whose input shapes and dtypes match `inputs` (the only one if one)."""
        if len(self._buckets) == 1 or not all(hasattr(t, "shape") for t in inputs):
            return self._buckets[0]  # _check_inputs explains what is wrong with these inputs
        for bucket in self._buckets:
            if bucket.matches(inputs):
                return bucket
        got = [TensorSpec(tuple(t.shape), dtype_name(t.dtype) if isinstance(t, torch.Tensor)
                          else str(getattr(t, "dtype", type(t).__name__))) for t in inputs]
        return self._buckets[select_bucket([b.program.inputs for b in self._buckets], got)]

    def _start_trace(self, path) -> None:
        if path is None:
            folder = Path(os.environ.get("RBLN_PROFILER_DIR", "rbln_traces"))
            path = folder / f"rbln_{os.getpid()}_{id(self):x}.pb"
        names = {}
        for index in self.devices:
            info = current_machine().device(index)
            names[index] = f"NPU {index} · {info.spec.name} (card {info.card}, die {info.die})"
        self._trace = TraceFile(Path(path), names)  # each run is appended as it finishes
        nbytes = self.program.weight_bytes
        if nbytes:  # weights go to device DRAM once, when the runtime is created
            dur = hdma_seconds(nbytes, self.spec)
            upload = [Event(HDMA, index, "upload weights", 0.0, dur, "dma_in",
                            {"bytes": nbytes, "when": "runtime creation"}) for index in self.devices]
            self._trace.add(upload, span_s=dur)

    # --- running --------------------------------------------------------------------------------

    @property
    def thread_last_report(self) -> RunReport | None:
        """The report of the calling thread's latest run: `last_report` is whichever thread ran
        last, so a caller that shares the runtime with other threads reads this one."""
        return getattr(self._local, "report", None)

    @property
    def _index_to_input_name(self) -> dict[int, str]:
        """Input position -> name: input_info's names when compiled with them, else the graph's."""
        return dict(enumerate(self._input_names(self.compiled.program)))

    @staticmethod
    def _input_names(program: Program) -> list[str]:
        return list(program.input_names) if program.input_names else [n for n, _ in program.inputs]

    def run(self, *inputs, out=None, **named_inputs):
        """Run the model. Inputs by position, or by input name as keywords (the names given in
        compile_from_torch's input_info), or both (keywords fill the positions after the
        positional ones). out: a tensor or list of tensors the results are copied into; those
        are then returned."""
        inputs, bucket, tensors, pinned = self._prepare(inputs, named_inputs)
        entered = time.perf_counter()
        if not self._lock.acquire(timeout=-1 if self.timeout is None else self.timeout):
            raise RBLNError(f"the runtime stayed busy with another run for longer than "
                            f"timeout={self.timeout} s")
        try:
            self.program, self._segments = bucket.program, bucket.segments
            self._out_spec, self._timeline = bucket.out_spec, bucket.timeline
            start = time.perf_counter()
            with run_threads_set():  # the free cores: see threads.py
                outputs = self._execute(tensors)
                wall = time.perf_counter() - start
                fill, (self._timeline, report) = self._timed(bucket, tensors, pinned)
            events = self._timeline.events
            # Each run's report owns its containers (the memoised one stays as predicted).
            self._local.report = report = self.last_report = report.copy(wall_time_s=wall)
            self.runs += 1
            if self._trace is not None:
                self._trace.add(events, self._timeline.end_s)
        finally:
            self._lock.release()
        if bucket.program.flat_outputs or out is not None:
            outputs = _flat(outputs)
        result = self._write_out(outputs, out) if out is not None else self._convert(outputs)
        recorder = _recorder
        if recorder is not None:  # an orchestrator's request is open: it sees every run
            recorder(RunRecord(self, bucket.program, fill, pinned, report, inputs, result,
                               entered, time.perf_counter()))
        return result

    def predict(self, *inputs, **named_inputs) -> RunReport:
        """The report `run` would give for these inputs, without computing anything: the
        predicted timeline only (what a serving simulation costs a step by). Inputs are checked
        as `run` checks them; only their shapes, the positions paged attention reads and whether
        they are pinned matter. wall_time_s is 0."""
        _, bucket, tensors, pinned = self._prepare(inputs, named_inputs)
        with self._lock, run_threads_set():  # even the fill's small reductions: see threads.py
            return self._timed(bucket, tensors, pinned)[1][1]

    def _prepare(self, inputs: tuple, named: dict):
        """(inputs by position, their bucket, checked tensors, the names of those passed pinned)."""
        if named:
            inputs = self._bind_named(inputs, named)
        bucket = self._select_bucket(inputs)
        # Host copies take the pinned or the pageable path according to the tensors passed.
        pinned = frozenset(name for (name, _), value in zip(bucket.program.inputs, inputs)
                           if is_pinned(value))
        if bucket.matches(inputs):  # CPU tensors of the compiled shapes and dtypes: nothing to convert
            return inputs, bucket, list(inputs), pinned
        # Errors name inputs as the caller knows them (input_info's names when there are some).
        expected = list(zip(self._input_names(bucket.program), (s for _, s in bucket.program.inputs)))
        return inputs, bucket, self._check_inputs(inputs, expected), pinned

    def _timed(self, bucket: _Bucket, tensors: list, pinned: frozenset):
        """The paged fill of a run with these inputs, and its (timeline, report): attention work
        follows the context reached, and pinned inputs take another copy path, so both are
        memoised by exactly what the timing reads."""
        fill = paged_fill(bucket.paged, {n: t for (n, _), t in zip(bucket.program.inputs, tensors)}) \
            if bucket.paged else None
        return fill, bucket.timelines.get(self._engine, bucket.program, self.spec, fill, pinned,
                                          self.device)

    def __call__(self, *inputs, out=None, **named_inputs):
        return self.run(*inputs, out=out, **named_inputs)

    def forward(self, *inputs, out=None, **named_inputs):
        """The same as calling the runtime (the vendor calls both)."""
        return self.run(*inputs, out=out, **named_inputs)

    def _bind_named(self, inputs: tuple, named: dict) -> tuple:
        """Positional plus keyword inputs as one positional tuple, in the compiled order."""
        names = self._input_names(self.compiled.program)
        slots = list(inputs) + [_MISSING] * max(0, len(names) - len(inputs))
        for key, value in named.items():
            if key not in names:
                raise InputError(f"unknown input {key!r}; the model's inputs are {names}")
            index = names.index(key)
            if slots[index] is not _MISSING:
                raise InputError(f"input {key!r} was given twice (by position {index} and by name)")
            slots[index] = value
        missing = [names[i] for i, v in enumerate(slots) if v is _MISSING]
        if missing:
            raise InputError(f"missing input(s) {missing}; the model's inputs are {names}")
        return tuple(slots)

    def _write_out(self, results: list, out):
        """Copy results into the caller's `out` buffers (one tensor, or one per output)."""
        results = [results] if isinstance(results, torch.Tensor) else list(results)
        buffers = [out] if isinstance(out, torch.Tensor) else list(out)
        if len(buffers) != len(results):
            raise InputError(f"out= has {len(buffers)} tensor(s) but the model has {len(results)} output(s)")
        for i, (buffer, result) in enumerate(zip(buffers, results)):
            if not isinstance(buffer, torch.Tensor):
                raise InputError(f"out[{i}] must be a torch.Tensor, got {type(buffer).__name__}")
            if tuple(buffer.shape) != tuple(result.shape) or buffer.dtype != result.dtype:
                raise InputError(f"out[{i}] is {list(buffer.shape)} {dtype_name(buffer.dtype)} but output "
                                 f"{i} is {list(result.shape)} {dtype_name(result.dtype)}")
            buffer.copy_(result)
        return out

    def _execute(self, inputs: list[torch.Tensor]):
        return execute(self.program, self._segments, self._die_weights, inputs, self._out_spec,
                       self._dtype, self._static)

    def _convert(self, outputs):
        if self.tensor_type == "np":
            return pytree.tree_map(lambda t: t.numpy() if isinstance(t, torch.Tensor) else t, outputs)
        return outputs

    def _check_inputs(self, inputs, expected=None) -> list[torch.Tensor]:
        expected = self.program.inputs if expected is None else expected
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
        """The profiler's trace file, complete up to the last run (None when not profiling)."""
        return None if self._trace is None else self._trace.path

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
        where = ", ".join(f"rbln:{d}" for d in self.devices)
        return (f"{type(self).__name__}(npu={p.npu}, device={where}, "
                f"inputs=[{', '.join(f'{n}: {s}' for n, s in p.inputs)}], "
                f"dram={self.dram_bytes / 2**20:.1f} MiB, predicted latency="
                f"{self._timeline.latency_s * 1e6:.1f} us, tensor_type={self.tensor_type!r}, "
                f"profiler={'on' if self._profile else 'off'})")


@dataclass(frozen=True)
class RunRecord:
    """One finished run as an orchestrator records it: what ran (the bucket's program, with the
    paged-attention fill and pinned inputs its timing read), its report, the caller's inputs and
    what the run returned (to tell which inputs came from earlier runs), and when on this
    machine's clock the call entered and returned (the host work between runs is the gap)."""

    runtime: Runtime
    program: Program
    fill: dict | None
    pinned: frozenset
    report: RunReport
    inputs: tuple
    outputs: object
    entered_s: float
    returned_s: float


# The open orchestrator request's recorder (rebel.runtime.orchestrator sets it), or None.
_recorder = None


def set_recorder(recorder) -> object:
    """Install `recorder` (called with each run's RunRecord, or None to stop); returns the one
    it replaces."""
    global _recorder
    previous, _recorder = _recorder, recorder
    return previous


class AsyncRuntime(Runtime):
    """A Runtime whose runs can be awaited; runs are queued in order on one worker thread."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rbln-async")

    async def async_run(self, *inputs, out=None, **named_inputs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor,
                                          lambda: self.run(*inputs, out=out, **named_inputs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        super().close()


@dataclass
class _Bucket:
    """One shape bucket bound for execution: its program, kernels, output tree and timeline."""

    program: Program
    segments: list
    out_spec: object
    timeline: Timeline | None = None
    paged: list = field(default_factory=list)  # paged-attention kernels, re-timed per run
    timelines: TimelineCache = field(default_factory=TimelineCache)  # per-run timings, memoised

    def __post_init__(self):
        self._signature = tuple((tuple(spec.shape), to_torch_dtype(spec.dtype))
                                for _, spec in self.program.inputs)

    def matches(self, inputs) -> bool:
        """Whether `inputs` are CPU torch tensors of exactly this bucket's input shapes and
        dtypes: the check every run makes, done without building specs (a run of a 1 ms model
        paid ~20 us for them)."""
        if len(inputs) != len(self._signature):
            return False
        for value, (shape, dtype) in zip(inputs, self._signature):
            if type(value) is not torch.Tensor or value.dtype is not dtype or value.shape != shape \
                    or value.device.type != "cpu":
                return False
        return True


_MISSING = object()  # an input slot no positional or keyword input filled


def _flat(outputs):
    """The vendor's convention: a tensor for one output, else a flat list."""
    leaves = pytree.tree_leaves(outputs)
    return leaves[0] if len(leaves) == 1 else leaves


def _devices(device, tensor_parallel_size: int) -> tuple[int, ...]:
    """The devices a runtime uses: as given, or consecutive ones from a single index."""
    if isinstance(device, (list, tuple)):
        devices = tuple(device)
        if len(devices) != tensor_parallel_size:
            raise DeviceError(f"the model was compiled for tensor_parallel_size={tensor_parallel_size} "
                              f"but {len(devices)} device(s) were given: {list(devices)}")
        if len(set(devices)) != len(devices):
            raise DeviceError(f"devices must be distinct, got {list(devices)}")
    else:
        devices = tuple(device + i for i in range(tensor_parallel_size)) \
            if isinstance(device, int) and not isinstance(device, bool) else (device,)
    for d in devices:
        current_machine().device(d)  # DeviceError names what exists
    return devices


def _release(held, state, shared_keys) -> None:
    """Free a runtime's own DRAM and leave its compile context's state (the last one out frees
    the context's static buffers and shared weights)."""
    for memory, handle in held:
        memory.free(handle)
    held.clear()
    if state is not None:
        device_state.leave(state, list(shared_keys))
        shared_keys.clear()


def activation_bytes(program: Program, exclude: frozenset[str] = frozenset()) -> int:
    """Device DRAM per die the activations need when buffers are reused once dead: the largest
    total, over the kernel sequence, of the activations live at one kernel (a value is live from
    the kernel that writes it, or its segment's start if the host copies it in, to the last kernel
    that reads it, or its segment's end if the host copies it out). Sizes are as one die holds
    them (tensor-parallel splits applied, floats in the device dtype), as a compiler's memory
    planner lays them out. One buffer per tensor instead would count most of a deep model's
    layer intermediates many times over (a 7B DiT: hundreds of GiB for a 2 GiB working set).
    exclude: values that need no buffer of their own, such as a paged KV cache's updated copy,
    which is written back into the persistent cache in place (rebel.plan counts the cache once)."""
    p = program
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    index = 0
    for seg in p.segments:
        start = index
        for v in seg.copy_in:
            first.setdefault(v, start)
            last[v] = max(last.get(v, start), start)
        for k in seg.kernels:
            for t in k.plan.dma_in:
                if not t.weight:
                    first.setdefault(t.value, index)
                    last[t.value] = max(last.get(t.value, index), index)
            for t in k.plan.dma_out:
                if not t.weight:
                    first[t.value] = min(first.get(t.value, index), index)
                    last[t.value] = max(last.get(t.value, index), index)
            index += 1
        end = max(start, index - 1)
        for v in seg.copy_out:
            first.setdefault(v, end)
            last[v] = max(last.get(v, end), end)
    deltas: dict[int, int] = {}
    for v, lo in first.items():
        if v not in p.values or v in exclude:
            continue
        spec = p.values[v]
        nbytes = TensorSpec(p.sharding.local_shape(v, spec.shape), spec.dtype).nbytes(p.device_dtype)
        deltas[lo] = deltas.get(lo, 0) + nbytes
        deltas[last[v] + 1] = deltas.get(last[v] + 1, 0) - nbytes
    peak = live = 0
    for i in sorted(deltas):
        live += deltas[i]
        peak = max(peak, live)
    return peak


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


def _stage_name(compiled_model) -> str | None:
    """A model's name from its file: the folder for the vendor's `<submodule>/model.rbln`."""
    path = compiled_model if isinstance(compiled_model, (str, os.PathLike)) \
        else getattr(compiled_model, "source_path", None)
    if path is None:
        return None
    path = Path(path)
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def _profiler_enabled(flag: bool | None) -> bool:
    if flag is not None:
        return bool(flag)
    return os.environ.get("RBLN_PROFILER", "0").lower() in ("1", "true", "yes", "on")
