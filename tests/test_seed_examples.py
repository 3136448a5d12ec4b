"""The seed's first three examples, as a user writes them: Linear; Linear + ReLU (fused);
Linear -> torch.atan -> Linear (host fallback). Each checks the numbers (16-bit device
arithmetic, FP32 in and out) and the profiler trace the seed describes."""
from __future__ import annotations

import pytest
import torch

import rebel
from rebel.profiler import read_trace

from seed_models import Foo  # tests/seed_models.py

HOST, HDMA, TASK_DMA, NE = "Host", "External HDMA", "Task DMA", "Neural Engine Clusters"
ATOL = RTOL = 2e-3  # FP16: inputs, weights and outputs each carry ~2**-11 relative rounding


def fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def check_fp16_result(result: torch.Tensor, reference: torch.Tensor) -> None:
    assert result.dtype == torch.float32
    assert result.shape == reference.shape
    torch.testing.assert_close(result, reference, atol=ATOL, rtol=RTOL)
    assert not torch.equal(result, reference), "no 16-bit rounding happened"
    # The last device kernel rounds to FP16, then the output is cast back to FP32.
    assert torch.equal(result, fp16(result))


def device_slices(slices):
    return [s for s in slices if s.group != HOST]


def find_subsequence(slices, predicates):
    """Match `predicates` in order against slices (already in start order); return the matches."""
    found, it = [], iter(slices)
    for pred in predicates:
        for s in it:
            if pred(s):
                found.append(s)
                break
        else:
            names = [(s.track, s.name) for s in slices]
            pytest.fail(f"no slice for step {len(found)} of the expected flow after "
                        f"{[(f.track, f.name) for f in found]}; slices: {names}")
    return found


def assert_flows_connect(slices):
    """Every launch's flow ends on a device slice; every wait is the end of a device flow."""
    launches = [s for s in slices if s.track == HOST and s.category == "launch"]
    assert launches
    for launch in launches:
        assert len(launch.flow_ids) == 1
        targets = [s for s in slices if launch.flow_ids[0] in s.terminating_flow_ids]
        assert len(targets) == 1 and targets[0].group != HOST
        assert targets[0].start_ns >= launch.end_ns
    waits = [s for s in slices if s.track == HOST and s.category == "sync"]
    assert len(waits) == len(launches)
    for wait in waits:
        (flow,) = wait.terminating_flow_ids
        (source,) = [s for s in slices if flow in s.flow_ids]
        assert source.group != HOST and source.end_ns <= wait.end_ns


# --- example 1: Linear ----------------------------------------------------------------------------

@pytest.fixture
def linear_artifact(in_tmp):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    # Compile the model
    compiled_model = rebel.compile_from_torch(model, example_inputs=[torch.randn(16, 16)])
    # Save the compiled binary
    compiled_model.save("compiled.rbln")
    assert (in_tmp / "compiled.rbln").is_file()
    return model


def test_linear_runs_in_fp16(linear_artifact):
    model = linear_artifact
    runtime = rebel.Runtime("compiled.rbln", tensor_type="pt")
    x = torch.randn(16, 16)
    result = runtime.run(x)
    with torch.no_grad():
        check_fp16_result(result, model(x))
        # Exactly the device's arithmetic: FP16 operands, FP32 accumulate, one FP16 rounding.
        emulated = fp16(torch.addmm(fp16(model.bias), fp16(x), fp16(model.weight).t()))
    torch.testing.assert_close(result, emulated, atol=1e-5, rtol=1e-3)  # at most 1 FP16 ulp


def test_linear_trace_follows_the_seed(linear_artifact):
    runtime = rebel.Runtime("compiled.rbln", tensor_type="pt", activate_profiler=True)
    before = read_trace(runtime.trace_path)  # at creation: the weights going to device DRAM
    assert [(s.track, s.name) for s in before] == [(HDMA, "upload weights")]
    x = torch.randn(16, 16)
    result = runtime.run(x)
    assert result.dtype == torch.float32
    path = runtime.trace_path
    assert path is not None and path.is_file()
    slices = read_trace(path)
    assert {s.track for s in slices} == {HOST, HDMA, TASK_DMA, NE}

    launch, h2d, load, cast_in, linear, store, d2h = find_subsequence(slices, [
        lambda s: s.track == HOST and s.name.startswith("launch"),
        lambda s: s.track == HDMA and s.category == "dma_in" and "host->device" in s.name,
        lambda s: s.track == TASK_DMA and s.category == "dma_in",
        lambda s: s.track == NE and s.name == "0_input_1",
        lambda s: s.track == NE and "linear" in s.name,
        lambda s: s.track == TASK_DMA and s.category == "dma_out",
        lambda s: s.track == HDMA and s.category == "dma_out" and "device->host" in s.name,
    ])
    assert h2d.args["bytes"] == 16 * 16 * 4 and d2h.args["bytes"] == 16 * 16 * 4  # FP32 on PCIe
    assert h2d.start_ns >= launch.end_ns
    assert load.start_ns >= h2d.end_ns and cast_in.start_ns >= load.end_ns
    assert linear.start_ns >= cast_in.end_ns
    assert store.start_ns >= linear.end_ns and d2h.start_ns >= store.end_ns
    assert linear.args["ops"] == "aten.linear.default" and linear.args["kind"] == "gemm"
    # The launch's flow arrow lands on the first device slice it caused.
    assert launch.flow_ids and launch.flow_ids[0] in h2d.terminating_flow_ids
    assert_flows_connect(slices)

    # Weights went to device DRAM once, at runtime creation, before the launch (no HDMA per run).
    weight_bytes = 16 * 16 * 2 + 16 * 2  # FP16 weight and bias
    (upload,) = [s for s in slices if s.track == HDMA and s.args.get("when") == "runtime creation"]
    assert upload.args["bytes"] == weight_bytes
    assert upload.end_ns <= launch.start_ns
    hdma_in = [s for s in slices if s.track == HDMA and s.category == "dma_in"]
    assert [s.args["bytes"] for s in hdma_in] == [weight_bytes, 16 * 16 * 4]
    # Per run, the weights move DRAM -> SRAM on Task DMA only.
    (weights_load,) = [s for s in slices if s.track == TASK_DMA and s.name.startswith("weights")]
    assert weights_load.args["bytes"] == weight_bytes


def test_linear_trace_grows_with_each_run(linear_artifact):
    runtime = rebel.Runtime("compiled.rbln", tensor_type="pt", activate_profiler=True)
    runtime.run(torch.randn(16, 16))
    path = runtime.trace_path
    first = read_trace(path)
    runtime.run(torch.randn(16, 16))
    assert runtime.trace_path == path
    slices = read_trace(path)
    launches = [s for s in slices if s.category == "launch"]
    assert len(launches) == 2 and len(slices) == 2 * len(first) - 1  # one weight upload
    assert launches[1].start_ns >= max(s.end_ns for s in first)
    assert_flows_connect(slices)
    uploads = [s for s in slices if s.args.get("when") == "runtime creation"]
    assert len(uploads) == 1


def _track_names(path) -> set[str]:
    """Track descriptor names, parsed with the bundled protobuf classes."""
    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace

    trace = Trace.FromString(path.read_bytes())
    return {p.track_descriptor.name for p in trace.packet if p.HasField("track_descriptor")}


def test_linear_trace_is_complete_after_every_run(linear_artifact):
    """No flush: the file parses, with every track and all runs' kernels, as soon as run() returns."""
    runtime = rebel.Runtime("compiled.rbln", tensor_type="pt", activate_profiler=True)
    path = runtime.trace_path
    per_run = None
    for runs in range(1, 6):
        runtime.run(torch.randn(16, 16))
        assert {HOST, HDMA, TASK_DMA, NE} <= _track_names(path)
        slices = read_trace(path)
        kernels = [s for s in slices if s.track == NE]
        per_run = per_run or len(kernels)
        assert len(kernels) == runs * per_run
        assert len([s for s in slices if s.category == "launch"]) == runs
        assert_flows_connect(slices)
    assert rebel.trace_summary(path)


def test_profiler_cost_per_run_stays_flat(linear_artifact):
    """Bytes appended per run do not grow with the runs before it, and no event list is kept."""
    runtime = rebel.Runtime("compiled.rbln", tensor_type="pt", activate_profiler=True)
    trace = runtime._trace
    appended, state = [], []
    for _ in range(200):
        before = trace.path.stat().st_size
        runtime.run(torch.randn(16, 16))
        appended.append(trace.path.stat().st_size - before)
        assert appended[-1] == trace.last_append_bytes
        state.append((trace.tracks, trace.open_ends))
    early, late = appended[1:10], appended[190:200]  # run 1 also carries the track descriptors
    # Only the varint widths of the growing timestamps and flow ids may differ.
    assert max(late) - min(early) <= 0.05 * min(early)
    assert max(late) - min(late) <= 8
    assert state[9] == state[199]  # the profiler's state is bounded by the model, not the runs
    assert not hasattr(trace, "events")
    assert trace.path.stat().st_size == trace.bytes_written
    slices = read_trace(trace.path)
    assert len([s for s in slices if s.category == "launch"]) == 200


# --- example 2: Linear + ReLU, fused ------------------------------------------------------------

def test_linear_relu_fused(in_tmp):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
    # Compile the model
    compiled_model = rebel.compile_from_torch(model, example_inputs=[torch.randn(16, 16)])
    # Create a runtime with profiler enabled
    module = rebel.Runtime(compiled_model, tensor_type="pt", activate_profiler=True)
    # Run inference on the NPU
    x = torch.randn(16, 16)
    output = module.run(x)

    with torch.no_grad():
        reference = model(x)
    check_fp16_result(output, reference)
    assert torch.all(output[reference < -ATOL] == 0)

    slices = read_trace(module.trace_path)
    kernels = [s for s in slices if s.track == NE]
    fused = [s for s in kernels if "linear" in s.name and "relu" in s.name]
    assert len(fused) == 1
    assert fused[0].args["ops"] == "aten.linear.default, aten.relu.default"
    assert not [s for s in kernels if "relu" in s.name and "linear" not in s.name]
    assert [s.name for s in kernels] == ["0_input_1", fused[0].name, "2_output_1"]
    find_subsequence(slices, [
        lambda s: s.track == HOST and s.category == "launch",
        lambda s: s.track == HDMA and "host->device" in s.name,
        lambda s: s.track == TASK_DMA and s.category == "dma_in",
        lambda s: s.track == NE and s.name == "0_input_1",
        lambda s: s is fused[0],
        lambda s: s.track == TASK_DMA and s.category == "dma_out",
        lambda s: s.track == HDMA and "device->host" in s.name,
    ])
    assert_flows_connect(slices)


# --- example 3: Linear -> atan (host) -> Linear ---------------------------------------------------

@pytest.fixture
def atan_run(in_tmp):
    torch.manual_seed(2)
    model = Foo()
    # Compile the model
    compiled_model = rebel.compile_from_torch(model, example_inputs=[torch.randn(16, 16)])
    # Create a runtime with profiler enabled
    module = rebel.Runtime(compiled_model, tensor_type="pt", activate_profiler=True)
    # Run inference on the NPU
    x = torch.randn(16, 16)
    output = module.run(x)
    return model, compiled_model, module, x, output


def test_atan_fallback_numerics(atan_run):
    model, compiled, _, x, output = atan_run
    with torch.no_grad():
        check_fp16_result(output, model(x))
        # linear1 on the device (FP16 out), atan on the host in FP32, linear2 on the device.
        l1, l2 = model.linear1, model.linear2
        h = fp16(torch.addmm(fp16(l1.bias), fp16(x), fp16(l1.weight).t()))
        a = torch.atan(h)
        emulated = fp16(torch.addmm(fp16(l2.bias), fp16(a), fp16(l2.weight).t()))
    torch.testing.assert_close(output, emulated, atol=1e-5, rtol=1e-3)
    program = compiled.program
    assert [s.kind for s in program.segments] == ["device", "host", "device"]
    assert [op.target for op in program.host_ops] == ["aten.atan.default"]


def test_atan_fallback_trace(atan_run):
    _, _, module, _, _ = atan_run
    slices = read_trace(module.trace_path)
    (atan,) = [s for s in slices if s.track == HOST and s.category == "fallback"]
    assert atan.name == "atan" and atan.group == HOST
    assert atan.args["op"] == "aten.atan.default"

    device = device_slices(slices)
    before = [s for s in device if s.start_ns < atan.start_ns]
    after = [s for s in device if s.start_ns >= atan.start_ns]
    assert before and after
    assert max(s.end_ns for s in before) <= atan.start_ns  # the first segment is done
    assert min(s.start_ns for s in after) >= atan.end_ns  # the second starts after atan
    assert any(s.track == HDMA and "device->host" in s.name for s in before)
    assert any(s.track == HDMA and "host->device" in s.name for s in after)
    last_d2h = max((s for s in before if s.track == HDMA), key=lambda s: s.end_ns)
    assert "device->host" in last_d2h.name
    first_h2d = min((s for s in after if s.track == HDMA), key=lambda s: s.start_ns)
    assert "host->device" in first_h2d.name
    assert any(s.track == NE and "linear" in s.name for s in before)
    assert any(s.track == NE and "linear" in s.name for s in after)
    # The host waits for segment 1, runs atan, then launches segment 2.
    waits = [s for s in slices if s.category == "sync"]
    launches = [s for s in slices if s.category == "launch"]
    assert len(launches) == 2 and len(waits) == 2
    assert waits[0].end_ns <= atan.start_ns and launches[1].start_ns >= atan.end_ns
    assert_flows_connect(slices)

    report = module.last_report
    assert [name for name, _ in report.host_fallbacks] == ["atan"]
    assert report.host_fallbacks[0][1] > 0


def test_atan_trace_summary_lists_the_fallback(atan_run):
    _, _, module, _, _ = atan_run
    text = rebel.trace_summary(module.trace_path)
    fallbacks = text.split("Host fallbacks", 1)[1].split("Bytes moved", 1)[0]
    assert "atan" in fallbacks and "none" not in fallbacks
    assert "linear" in text.split("Top kernels", 1)[1].split("Host fallbacks", 1)[0]


# --- RBLN_PROFILER environment ------------------------------------------------------------------

@pytest.fixture
def compiled_linear():
    torch.manual_seed(3)
    return rebel.compile_from_torch(torch.nn.Linear(16, 16), example_inputs=[torch.randn(16, 16)])


def test_profiler_env_writes_trace(in_tmp, monkeypatch, compiled_linear):
    folder = in_tmp / "my_traces"
    monkeypatch.setenv("RBLN_PROFILER", "1")
    monkeypatch.setenv("RBLN_PROFILER_DIR", str(folder))
    runtime = rebel.Runtime(compiled_linear, tensor_type="pt")
    runtime.run(torch.randn(16, 16))
    path = runtime.trace_path
    assert path is not None and path.parent == folder and path.suffix == ".pb"
    assert list(folder.iterdir()) == [path]
    names = {s.name for s in read_trace(path)}
    assert "0_input_1" in names and "1_linear" in names


def test_profiler_env_default_folder(in_tmp, monkeypatch, compiled_linear):
    monkeypatch.setenv("RBLN_PROFILER", "1")
    runtime = rebel.Runtime(compiled_linear)
    runtime.run(torch.randn(16, 16))
    assert runtime.trace_path.resolve().parent == (in_tmp / "rbln_traces").resolve()
    assert runtime.trace_path.is_file()


def test_profiler_off_by_default(in_tmp, compiled_linear):
    runtime = rebel.Runtime(compiled_linear)
    runtime.run(torch.randn(16, 16))
    assert runtime.trace_path is None
    assert not (in_tmp / "rbln_traces").exists()


def test_activate_profiler_false_overrides_env(in_tmp, monkeypatch, compiled_linear):
    monkeypatch.setenv("RBLN_PROFILER", "1")
    runtime = rebel.Runtime(compiled_linear, activate_profiler=False)
    runtime.run(torch.randn(16, 16))
    assert runtime.trace_path is None
    assert not (in_tmp / "rbln_traces").exists()
