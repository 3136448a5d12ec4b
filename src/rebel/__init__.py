"""rebel: the RBLN compiler and runtime, on a virtual ATOM NPU.

    compiled = rebel.compile_from_torch(torch.nn.Linear(16, 16), example_inputs=[torch.randn(16, 16)])
    compiled.save("compiled.rbln")
    runtime = rebel.Runtime("compiled.rbln", tensor_type="pt")
    y = runtime.run(torch.randn(16, 16))
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .compiler import compile_module
from .errors import (ArtifactError, CompileError, DeviceError, DeviceMemoryError, InputError,
                     RBLNError, SpecError)
from .npu import device_count, get_npu_name, npu_is_available
from .profiler import summarize_file
from .runtime import AsyncRuntime, RBLNCompiledModel, RunReport, Runtime
from .runtime.explain import explain
from .runtime.host_memory import pin

__version__ = "0.1.0"


def compile_from_torch(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], *,
                       npu: str | None = None, tensor_parallel_size: int = 1,
                       device_dtype: str | torch.dtype = "float16",
                       progress: bool | None = None) -> RBLNCompiledModel:
    """Compile `module` for the NPU at the shapes of `example_inputs`.

    example_inputs: a list of tensors, or a list of such lists to compile one shape bucket each
    (the runtime runs the bucket whose shapes match its inputs). A module or inputs on the meta
    device compile for prediction only (memory and latency; the model cannot run).
    progress: show compile progress on stderr (default: for models of 100M+ parameters).

    npu: product name or spec path (default: the virtual machine's product). device_dtype:
    "float16" (default) or "bfloat16", the 16-bit format FP32 tensors become on the device.
    tensor_parallel_size: shard linear layers and attention heads over that many dies (run the
    result with a Runtime on as many devices).
    """
    return RBLNCompiledModel(compile_module(module, example_inputs, npu=npu, device_dtype=device_dtype,
                                            tensor_parallel_size=tensor_parallel_size,
                                            progress=progress))


def trace_summary(path) -> str:
    """Plain-text summary of a profiler trace: top kernels, time per track, host fallbacks."""
    return summarize_file(path)


__all__ = ["ArtifactError", "AsyncRuntime", "CompileError", "DeviceError", "DeviceMemoryError",
           "InputError", "RBLNCompiledModel", "RBLNError", "RunReport", "Runtime", "SpecError",
           "compile_from_torch", "device_count", "explain", "get_npu_name", "npu_is_available",
           "pin", "trace_summary"]
