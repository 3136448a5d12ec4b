"""rebel: the RBLN compiler and runtime, on a virtual ATOM NPU.

    compiled = rebel.compile_from_torch(torch.nn.Linear(16, 16), example_inputs=[torch.randn(16, 16)])
    compiled.save("compiled.rbln")
    runtime = rebel.Runtime("compiled.rbln", tensor_type="pt")
    y = runtime.run(torch.randn(16, 16))
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .compile_context import CompileContext
from .compiler import compile_module
from .compiler.buckets import split_buckets
from .errors import (ArtifactError, CompileError, DeviceError, DeviceMemoryError, InputError,
                     RBLNError, SpecError)
from .npu import device_count, npu_is_available
from .npu import get_npu_name as _machine_npu_name
from .profiler import summarize_file
from .runtime import AsyncRuntime, RBLNCompiledModel, RunReport, Runtime
from .runtime.explain import explain
from .runtime.host_memory import pin

__version__ = "0.1.0"


# The dtype strings the vendor's input_info carries, and the torch dtype each one means.
INPUT_INFO_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                     "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
                     "int8": torch.int8, "bool": torch.bool}


def compile_from_torch(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor] | None = None,
                       *, input_info: Sequence | None = None, npu: str | None = None,
                       tensor_parallel_size: int | None = None, num_devices: int | None = None,
                       device_dtype: str | torch.dtype = "float16",
                       progress: bool | None = None, fusion: bool = True,
                       compile_context: CompileContext | None = None,
                       **unsupported) -> RBLNCompiledModel:
    """Compile `module` for the NPU at the shapes of `example_inputs` or `input_info`.

    example_inputs: a list of tensors, or a list of such lists to compile one shape bucket each
    (the runtime runs the bucket whose shapes match its inputs). A module or inputs on the meta
    device compile for prediction only (memory and latency; the model cannot run).
    input_info: the vendor's form, `[(name, shape, dtype_str), ...]` or a list of such lists (one
    bucket each). The names are kept (a Runtime binds keyword inputs by them, and
    `runtime._index_to_input_name` lists them) and the runtime returns a flat tensor or list
    instead of the module's pytree, as the vendor's runtime does. Without example_inputs, inputs
    are built from it: zeros for floats, ones for ints (so embedding lookups stay in range).
    progress: show compile progress on stderr (default: for models of 100M+ parameters).

    npu: product name or spec path (default: the virtual machine's product). device_dtype:
    "float16" (default) or "bfloat16", the 16-bit format FP32 tensors become on the device.
    tensor_parallel_size (alias num_devices, the vendor's name): shard linear layers and attention
    heads over that many dies (run the result with a Runtime on as many devices).
    fusion: True (default) fuses element-wise ops into the kernel before them; False makes every
    op its own kernel, as PyTorch eager runs, a baseline for what fusion saves (each kernel rounds
    its own output to device_dtype, so results still match FP32 within 16-bit tolerance).
    compile_context: a `rebel.compile_context.CompileContext`. Example inputs it marked with
    `mark_static_address` (found by identity) become static device buffers shared by the
    context's graphs and runtimes: not inputs of the program, so callers omit them (and
    `_index_to_input_name` lists only the others). See rebel/compile_context.py.
    """
    if unsupported:
        raise CompileError(f"compile_from_torch got unsupported argument(s): {sorted(unsupported)}")
    if num_devices is not None and tensor_parallel_size is not None and num_devices != tensor_parallel_size:
        raise CompileError(f"num_devices={num_devices} and tensor_parallel_size={tensor_parallel_size} "
                           f"disagree; they are the same setting, pass one")
    size = num_devices if num_devices is not None else (
        1 if tensor_parallel_size is None else tensor_parallel_size)
    names = None
    if input_info is not None:
        buckets = _input_info_buckets(input_info)
        names = [n for n, _, _ in buckets[0]]
        if any([n for n, _, _ in b] != names for b in buckets):
            raise CompileError("every input_info bucket must list the same input names in the same order")
        if example_inputs is None:
            built = [[_example_from_info(n, shape, dtype) for n, shape, dtype in b] for b in buckets]
            example_inputs = built[0] if len(built) == 1 else built
    elif example_inputs is None:
        raise CompileError("example_inputs must be a non-empty list of tensors (or give input_info: "
                           "[(name, shape, dtype), ...])")
    static = _static_positions(compile_context, example_inputs)
    compiled = compile_module(module, example_inputs, npu=npu, device_dtype=device_dtype,
                              tensor_parallel_size=size, progress=progress, fusion=fusion,
                              static=static)
    if names is not None:
        skipped = set(static[0]) if static else set()
        caller_names = [n for i, n in enumerate(names) if i not in skipped]
        for program in compiled.buckets:
            if len(program.inputs) != len(caller_names):
                raise CompileError(f"input_info names {len(caller_names)} caller input(s) "
                                   f"{caller_names} but the module was captured with "
                                   f"{len(program.inputs)}")
            program.input_names = caller_names
            program.flat_outputs = True
    if compile_context is not None:
        compiled.context = compile_context.record(compiled.weights)
    return RBLNCompiledModel(compiled)


def _static_positions(context, example_inputs) -> list[dict[int, str]] | None:
    """Per bucket, the example-input positions a compile context marked static (None without
    a context). Every bucket must mark the same positions: they are not the caller's inputs."""
    if context is None:
        return None
    if not isinstance(context, CompileContext):
        raise CompileError(f"compile_context must be a rebel.compile_context.CompileContext, got "
                           f"{type(context).__name__}")
    buckets = split_buckets(example_inputs)
    static = [context.static_positions(b) for b in buckets]
    if any(set(s) != set(static[0]) for s in static):
        raise CompileError("every example-input bucket must mark the same positions static")
    return static


def compile(module: torch.nn.Module, example_inputs=None, *, input_info=None, npu: str | None = None,
            num_devices: int | None = None, tensor_parallel_size: int | None = None,
            **kwargs) -> RBLNCompiledModel:
    """Same as compile_from_torch. The vendor's optimum-rbln reads only this signature: a
    `num_devices` parameter tells it to pass `num_devices=` (else `tensor_parallel_size=`)."""
    return compile_from_torch(module, example_inputs, input_info=input_info, npu=npu,
                              num_devices=num_devices, tensor_parallel_size=tensor_parallel_size,
                              **kwargs)


def _input_info_buckets(input_info) -> list[list[tuple[str, tuple[int, ...], str]]]:
    """input_info as a list of buckets, each a list of (name, shape, dtype_str), checked."""
    items = list(input_info)
    if not items:
        raise CompileError("input_info is empty")
    one_bucket = isinstance(items[0], (tuple, list)) and len(items[0]) == 3 and isinstance(items[0][0], str)
    buckets = [items] if one_bucket else [list(b) for b in items]
    out = []
    for bucket in buckets:
        checked = []
        for entry in bucket:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 3 and isinstance(entry[0], str)):
                raise CompileError(f"input_info entries are (name, shape, dtype_str), got {entry!r}")
            name, shape, dtype = entry
            if dtype not in INPUT_INFO_DTYPES:
                raise CompileError(f"input_info {name!r}: dtype {dtype!r} is not one of "
                                   f"{sorted(INPUT_INFO_DTYPES)}")
            checked.append((name, tuple(int(d) for d in shape), dtype))
        names = [n for n, _, _ in checked]
        if len(set(names)) != len(names):
            raise CompileError(f"input_info names repeat: {names}")
        out.append(checked)
    return out


def _example_from_info(name: str, shape, dtype: str) -> torch.Tensor:
    """An example input for one input_info entry: zeros for floats, ones for ints (index 1 is a
    valid row of any embedding table with two or more rows)."""
    torch_dtype = INPUT_INFO_DTYPES[dtype]
    if torch_dtype.is_floating_point or torch_dtype == torch.bool:
        return torch.zeros(shape, dtype=torch_dtype)
    return torch.ones(shape, dtype=torch_dtype)


def get_npu_name(index: int = 0) -> str | None:
    """The product name of device `index`, or None when there is no such device (the vendor
    probes devices this way)."""
    if not npu_is_available(index):
        return None
    return _machine_npu_name(index)


def trace_summary(path) -> str:
    """Plain-text summary of a profiler trace: top kernels, time per track, host fallbacks."""
    return summarize_file(path)


__all__ = ["ArtifactError", "AsyncRuntime", "CompileContext", "CompileError", "DeviceError", "DeviceMemoryError",
           "InputError", "RBLNCompiledModel", "RBLNError", "RunReport", "Runtime", "SpecError",
           "compile", "compile_from_torch", "device_count", "explain", "get_npu_name",
           "npu_is_available", "pin", "trace_summary"]
