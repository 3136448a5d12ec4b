"""The seed's first three examples on the default virtual device (one RBLN-CA25 ATOM-Max card).

Run: python examples/seed_examples.py

Compile a Linear, run it from a saved .rbln, profile it; then Linear+ReLU (fused) and
Linear -> atan -> Linear (atan falls back to the host). Prints results against PyTorch FP32,
the predicted timing, and a summary of each Perfetto trace.
"""
from __future__ import annotations

import os
import tempfile

import torch

import rebel


class Foo(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = torch.nn.Linear(16, 16)
        self.linear2 = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.linear2(torch.atan(self.linear1(x)))


def show(title: str, model: torch.nn.Module, runtime: rebel.Runtime, x: torch.Tensor, y) -> None:
    with torch.no_grad():
        ref = model(x)
    err = (y - ref).abs().max().item()
    print(f"\n=== {title}")
    print(f"output {tuple(y.shape)} {y.dtype}, max |NPU - FP32 CPU| = {err:.2e} (FP16 on the device)")
    print(runtime.last_report)
    print(rebel.trace_summary(runtime.trace_path))


def main() -> None:
    torch.manual_seed(0)
    print(f"virtual machine: {rebel.device_count()} x {rebel.get_npu_name(0)} devices "
          f"(rbln-smi lists them)")
    workdir = tempfile.mkdtemp(prefix="rbln-demo-")
    os.environ.setdefault("RBLN_PROFILER_DIR", os.path.join(workdir, "traces"))

    linear = torch.nn.Linear(16, 16)
    compiled = rebel.compile_from_torch(linear, example_inputs=[torch.randn(16, 16)])
    path = compiled.save(os.path.join(workdir, "compiled.rbln"))
    print(compiled)
    runtime = rebel.Runtime(str(path), tensor_type="pt", activate_profiler=True)
    x = torch.randn(16, 16)
    show("Linear(16, 16), loaded from compiled.rbln", linear, runtime, x, runtime.run(x))

    fused = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
    runtime = rebel.Runtime(rebel.compile_from_torch(fused, example_inputs=[torch.randn(16, 16)]),
                            tensor_type="pt", activate_profiler=True)
    show("Linear + ReLU (fused into one kernel)", fused, runtime, x, runtime.run(x))

    foo = Foo()
    runtime = rebel.Runtime(rebel.compile_from_torch(foo, example_inputs=[torch.randn(16, 16)]),
                            tensor_type="pt", activate_profiler=True)
    show("Linear -> torch.atan (host fallback) -> Linear", foo, runtime, x, runtime.run(x))
    print(f"\ntraces are in {os.environ['RBLN_PROFILER_DIR']}; open them at https://ui.perfetto.dev")


if __name__ == "__main__":
    main()
