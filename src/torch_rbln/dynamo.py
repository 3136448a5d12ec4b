"""torch.compile(backend="rbln"): Dynamo graphs through the same compiler as compile_from_torch.

Dynamo hands the backend an FX GraphModule per captured region (graph breaks between regions run
in Python, as with any backend). The backend returns a callable that, on its first call with real
tensors, turns the graph into a module whose parameters and buffers are weights (so they go to
device DRAM once, as with compile_from_torch) and compiles it for the shapes it sees. The device
runs static shapes, so a new input shape means a new compiled program: those are kept per graph,
counted and reported (torch.rbln.explain()), and bounded by `max_shapes`; past the bound the graph
runs in Python on the host with a warning, instead of compiling without end.

Options (torch.compile(..., options={...})):
  npu                    product name or spec path (default: the virtual machine's product)
  tensor_parallel_size   passed to the compiler (this version compiles for one device)
  device_dtype           "float16" (default) or "bfloat16"
  cache_dir              on-disk cache of compiled graphs (default $TORCH_RBLN_CACHE_DIR, else none)
  mode                   "default" (compile and run on the virtual NPU) or "compile_only" (compile,
                         fill the cache, and run the graph in Python on the host)
  max_shapes             compiled shapes kept per graph (default 8)
  device                 the die that runs CPU-tensor graphs (default 0; rbln tensors run on their
                         own device), e.g. one per tensor-parallel worker
Works on CPU tensors and on eager "rbln" tensors (outputs return on the inputs' rbln device).
Inference only: outputs carry no autograd history.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.utils._pytree as pytree

import rebel
from rebel.errors import CompileError, RBLNError

from . import cache, profiler, stats
from .device import _register_dynamo_interface

_register_dynamo_interface()  # Dynamo is loaded by now: let it trace code on rbln tensors

log = logging.getLogger("torch_rbln")

MODES = ("default", "compile_only")
# torch.compile's own mode names mean nothing to this backend; they run as "default".
TORCH_MODES = ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OPTIONS = ("npu", "tensor_parallel_size", "device_dtype", "cache_dir", "mode", "max_shapes",
           "device")
DEFAULT_MAX_SHAPES = 8


def rbln_backend(gm: torch.fx.GraphModule, example_inputs, *, options: dict | None = None,
                 mode: str | None = None):
    """The Dynamo backend registered as "rbln" (entry point torch_dynamo_backends)."""
    return RBLNGraph(gm, _parse_options(options, mode))


def _parse_options(options: dict | None, mode: str | None) -> dict:
    opts = dict(options or {})
    unknown = sorted(set(opts) - set(OPTIONS))
    if unknown:
        raise RBLNError(f"torch.compile(backend='rbln'): unknown option(s) {unknown}; "
                        f"valid options are {list(OPTIONS)}")
    chosen = opts.get("mode", mode) or "default"
    if chosen in TORCH_MODES:
        chosen = "default"
    if chosen not in MODES:
        raise RBLNError(f"torch.compile(backend='rbln'): mode {chosen!r} is not one of {list(MODES)}")
    opts["mode"] = chosen
    opts.setdefault("tensor_parallel_size", 1)
    opts.setdefault("device_dtype", None)
    opts.setdefault("npu", None)
    opts.setdefault("cache_dir", None)
    opts.setdefault("device", None)
    max_shapes = opts.setdefault("max_shapes", DEFAULT_MAX_SHAPES)
    if not isinstance(max_shapes, int) or max_shapes < 1:
        raise RBLNError(f"torch.compile(backend='rbln'): max_shapes must be a positive int, got {max_shapes!r}")
    return opts


class _Specialized(torch.nn.Module):
    """The Dynamo graph at one shape: weights as buffers, Python scalars fixed, tensors as inputs."""

    def __init__(self, gm: torch.fx.GraphModule, args: list, const_pos: set[int]):
        super().__init__()
        self.gm = gm
        self.slots = []  # per graph input: ("w", buffer name) | ("in", None) | ("lit", value)
        for i, a in enumerate(args):
            if i in const_pos:
                name = f"w{i}"
                self.register_buffer(name, a.detach())
                self.slots.append(("w", name))
            elif isinstance(a, torch.Tensor):
                self.slots.append(("in", None))
            else:
                self.slots.append(("lit", a))

    def forward(self, *inputs):
        it = iter(inputs)
        args = [getattr(self, v) if k == "w" else next(it) if k == "in" else v for k, v in self.slots]
        return self.gm(*args)


class _Entry:
    def __init__(self, runtime, compiled):
        self.runtime = runtime
        self.compiled = compiled


class RBLNGraph:
    """The callable the backend returns for one Dynamo graph; compiles lazily per shape."""

    _counter = 0

    def __init__(self, gm: torch.fx.GraphModule, options: dict):
        RBLNGraph._counter += 1
        self.name = f"graph_{RBLNGraph._counter}"
        self.gm = _drop_data_reads(gm)
        self.options = options
        self.const_pos = _constant_positions(gm)
        self.entries: dict[tuple, _Entry | None] = {}
        self._warned = False

    # --- calls ------------------------------------------------------------------------------

    def __call__(self, *args):
        key = self._key(args)
        entry = self.entries.get(key, False)
        if entry is False:
            entry = self._compile_for(args, key)
        if entry is None or entry.runtime is None:
            stats.current().graph_fallback_runs += 1
            return self.gm(*args)
        return self._run(entry, args)

    def _key(self, args) -> tuple:
        parts = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                if i in self.const_pos:
                    parts.append(("w", id(a), a._version, a.device))
                else:
                    parts.append((tuple(a.shape), a.dtype, a.device))
            else:
                parts.append(a)
        return tuple(parts)

    def _run(self, entry: _Entry, args):
        device = _rbln_index(args)
        inputs = [a.cpu() if a.device.type != "cpu" else a
                  for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in self.const_pos]
        runtime = entry.runtime
        out = runtime.run(*inputs)
        report = runtime.last_report
        rec = stats.current()
        rec.graph_runs += 1
        rec.device_time_s += report.device_time_s
        profiler.record_graph_run(self.name, report)
        if device is not None:
            target = torch.device("rbln", device)
            out = pytree.tree_map(lambda t: t.to(target) if isinstance(t, torch.Tensor) else t, out)
        return out

    # --- compiling --------------------------------------------------------------------------

    def _compile_for(self, args, key) -> _Entry | None:
        reason = "first call" if not self.entries else _why(self.entries, key)
        if len(self.entries) >= self.options["max_shapes"]:
            self._warn(f"{self.name} has been compiled for {len(self.entries)} input shapes "
                       f"(max_shapes={self.options['max_shapes']}); new shapes run in Python on "
                       "the host. Pad inputs to a few fixed shapes, or raise max_shapes.")
            return None
        try:
            entry = self._compile(args, reason)
        except RBLNError as e:
            if os.environ.get("TORCH_RBLN_DISABLE_FALLBACK", "0") == "1":
                raise
            self._warn(f"{self.name} could not be compiled for the NPU, so it runs in Python on the "
                       f"host: {e}")
            entry = None
        self.entries[key] = entry
        return entry

    def _compile(self, args, reason: str) -> _Entry:
        opts = self.options
        cpu_args = [a.cpu() if isinstance(a, torch.Tensor) and a.device.type != "cpu" else a for a in args]
        consts = [a for i, a in enumerate(cpu_args) if i in self.const_pos]
        inputs = [a for i, a in enumerate(cpu_args) if isinstance(a, torch.Tensor) and i not in self.const_pos]
        dtype = opts["device_dtype"] or _device_dtype(cpu_args)
        compile_opts = {"npu": opts["npu"], "tensor_parallel_size": opts["tensor_parallel_size"],
                        "device_dtype": dtype}
        folder = cache.cache_dir(opts["cache_dir"])
        key = None
        compiled = None
        if folder is not None:
            key = cache.graph_key(self.gm.code, inputs, consts, opts["npu"], compile_opts)
            compiled = cache.load(folder, key)
            if compiled is not None:
                stats.current().graph_cache_hits += 1
                log.info("torch_rbln: %s loaded from the compile cache (%s)", self.name, key)
        if compiled is None:
            module = _Specialized(self.gm, cpu_args, self.const_pos)
            compiled = rebel.compile_from_torch(module, inputs, **compile_opts)
            shapes = [tuple(t.shape) for t in inputs]
            stats.current().graph_compiles.append((self.name, f"{reason}; input shapes {shapes}"))
            log.info("torch_rbln: compiled %s (%s)", self.name, reason)
            if folder is not None:
                cache.store(folder, key, compiled)
        runtime = None
        if opts["mode"] == "default":
            device = _rbln_index(args)
            if device is None:
                device = opts["device"] or 0
            runtime = rebel.Runtime(compiled, tensor_type="pt", device=device)
        return _Entry(runtime, compiled)

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, stacklevel=3)
        log.warning("torch_rbln: %s", message)

    @property
    def compiled_shapes(self) -> int:
        return sum(1 for e in self.entries.values() if e is not None)


def _drop_data_reads(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`param.data` (Dynamo records `torch._C._autograd._get_data_attr`) is the parameter itself
    for inference; torch.export cannot lift it (it leaves a fake constant), so use the parameter.
    vLLM's RMSNorm reads its weight this way."""
    reads = [n for n in gm.graph.nodes
             if n.op == "call_function" and n.target is torch._C._autograd._get_data_attr]
    for node in reads:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    if reads:
        gm.recompile()
    return gm


def _constant_positions(gm: torch.fx.GraphModule) -> set[int]:
    """Graph inputs that are the module's parameters or buffers (Dynamo lifts them to inputs).

    They become weights of the compiled program, so they are placed in device DRAM once rather
    than copied in on every call.
    """
    out = set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        arg = node.meta.get("grapharg")
        source = getattr(arg, "source", None)
        name = source.name if isinstance(getattr(source, "name", None), str) else (
            source.name() if callable(getattr(source, "name", None)) else "")
        example = getattr(arg, "example", None)
        if isinstance(example, torch.nn.Parameter) or "_parameters" in name or "_buffers" in name:
            out.add(i)
    return out


def _rbln_index(args) -> int | None:
    for a in args:
        if isinstance(a, torch.Tensor) and a.device.type == "rbln":
            return a.device.index or 0
    return None


def _device_dtype(args) -> str:
    return "bfloat16" if any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args) \
        else "float16"


def _why(entries: dict, key: tuple) -> str:
    """Why a graph recompiles: compare the new key with an existing one (tensors first)."""
    old = next(iter(entries))
    pairs = [(a, b) for a, b in zip(old, key) if a != b]
    for a, b in pairs:
        if isinstance(b, tuple) and b and b[0] == "w":
            return "weights changed (a parameter was replaced or updated in place)"
    for a, b in pairs:
        if isinstance(b, tuple) and len(b) == 3:
            return f"new input shape {list(b[0])} (was {list(a[0])})"
    for a, b in pairs:
        return f"new scalar input {b!r} (was {a!r})"
    return "new inputs"


__all__ = ["CompileError", "RBLNGraph", "rbln_backend"]
