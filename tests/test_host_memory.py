"""Host copies take one of two paths: pinned (page-locked) memory at the link's DMA rate, or
pageable memory staged through pinned chunks. The runtime picks the path from the input tensor
and the run report and trace say which one each copy took."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import rebel
from rebel.device.events import HDMA
from rebel.device.timing import hdma_seconds
from rebel.npu import load_spec, reset_machine
from rebel.runtime.host_memory import is_pinned, pin

H100 = "NVIDIA-H100-SXM"


@pytest.mark.parametrize("nbytes", [4096, 2**20, 2**28])
@pytest.mark.parametrize("to_device", [True, False])
def test_pinned_copies_are_faster_than_pageable(nbytes, to_device):
    spec = load_spec(H100)
    pinned = hdma_seconds(nbytes, spec, to_device, pinned=True)
    pageable = hdma_seconds(nbytes, spec, to_device, pinned=False)
    assert pinned < pageable
    if nbytes >= 2**28:  # large copies: the staging costs the 2-3x of the issue
        assert 2.0 < pageable / pinned < 4.0


def test_link_without_pageable_table_has_one_path():
    spec = load_spec("RBLN-CA12")
    assert spec.host_link.pageable is None
    assert hdma_seconds(2**20, spec, pinned=True) == hdma_seconds(2**20, spec, pinned=False)


def test_pin_marks_a_tensor_and_numpy_is_pageable():
    x = torch.randn(4)
    assert not is_pinned(x)
    assert is_pinned(pin(x))
    assert not is_pinned(np.zeros(4, dtype=np.float32))


class Scale(torch.nn.Module):
    def forward(self, x):
        return x * 2.0


@pytest.fixture
def h100_runtime(monkeypatch):
    monkeypatch.setenv("RBLN_VIRTUAL_NPU", H100)
    reset_machine()
    x = torch.randn(256, 1024)
    compiled = rebel.compile_from_torch(Scale(), example_inputs=[x], npu=H100)
    return rebel.Runtime(compiled)


def _copy_in(report):
    return [e for e in report.events if e.track == HDMA and e.category == "dma_in"]


def test_runtime_picks_the_path_from_the_input_tensor(h100_runtime):
    runtime = h100_runtime
    x = torch.randn(256, 1024)
    runtime.run(x)
    pageable = runtime.last_report
    runtime.run(pin(x.clone()))
    pinned = runtime.last_report
    runtime.run(x.numpy())
    numpy_report = runtime.last_report

    (slow,), (fast,), (np_copy,) = _copy_in(pageable), _copy_in(pinned), _copy_in(numpy_report)
    assert slow.args["host_memory"] == "pageable" and "(pageable)" in slow.name
    assert fast.args["host_memory"] == "pinned" and "(pinned)" in fast.name
    assert np_copy.args["host_memory"] == "pageable"
    assert fast.dur_s < slow.dur_s
    assert pinned.latency_s < pageable.latency_s
    # outputs go to new pageable tensors either way
    outs = [e for e in pinned.events if e.track == HDMA and e.category == "dma_out"]
    assert outs and all(e.args["host_memory"] == "pageable" for e in outs)

    nbytes = x.numel() * 4
    assert pinned.host_copies["host_to_device"]["pinned"] == slow.args["bytes"] == nbytes
    assert pinned.host_copies["host_to_device"]["pageable"] == 0
    assert pageable.host_copies["host_to_device"]["pageable"] == nbytes
    assert "pinned" in repr(pinned) and "pageable" in repr(pageable)
    # a pinned run does not change the cached timing of later pageable runs
    runtime.run(x)
    assert runtime.last_report.latency_s == pytest.approx(pageable.latency_s)


def test_trace_names_the_host_memory_of_each_copy(monkeypatch, tmp_path):
    from rebel.profiler import read_trace
    monkeypatch.setenv("RBLN_VIRTUAL_NPU", H100)
    reset_machine()
    x = torch.randn(64, 256)
    compiled = rebel.compile_from_torch(Scale(), example_inputs=[x], npu=H100)
    runtime = rebel.Runtime(compiled, activate_profiler=True, trace_path=tmp_path / "t.pb")
    runtime.run(pin(x.clone()))
    runtime.run(x)
    copies = [s for s in read_trace(runtime.trace_path) if s.track == "External HDMA"
              and "->" in s.name]
    names = [s.name for s in copies]
    assert any("host->device (pinned)" in n for n in names)
    assert any("host->device (pageable)" in n for n in names)
    assert any(s.args.get("host_memory") == "pinned" for s in copies)


def test_eager_copies_take_the_path_of_the_host_tensor(monkeypatch, tmp_path):
    import torch_rbln  # noqa: F401  (the eager "rbln" device)
    from torch_rbln import kernels
    monkeypatch.setenv("RBLN_VIRTUAL_NPU", H100)
    reset_machine()
    kernels.reset_caches()
    try:
        with torch.rbln.profile(tmp_path / "e.pb") as prof:
            d = pin(torch.randn(512, 512)).to("rbln")
            out = pin(torch.empty(512, 512))
            out.copy_(d)       # into a pinned host tensor: the `out=` path
            d.to("cpu")        # into a new, pageable tensor
        from rebel.profiler import read_trace
        copies = {s.name: s.end_ns - s.start_ns for s in read_trace(prof.path) if s.track == "External HDMA"}
        assert {"host->device (pinned)", "device->host (pinned)", "device->host (pageable)"} <= set(copies)
        assert copies["device->host (pinned)"] < copies["device->host (pageable)"]
    finally:
        monkeypatch.undo()
        reset_machine()
        kernels.reset_caches()
