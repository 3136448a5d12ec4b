"""rebel.Runtime: input checking with clear messages, devices and device memory, output types and
structures, run reports, async and threaded use."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import rebel
from rebel.device.memory import device_memory

ATOL = RTOL = 2e-3


def fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


@pytest.fixture(scope="module")
def linear():
    torch.manual_seed(0)
    return torch.nn.Linear(16, 16)


@pytest.fixture(scope="module")
def compiled(linear):
    return rebel.compile_from_torch(linear, example_inputs=[torch.randn(16, 16)])


@pytest.fixture
def runtime(compiled):
    rt = rebel.Runtime(compiled, tensor_type="pt")
    yield rt
    rt.close()


class TwoInputs(torch.nn.Module):
    def forward(self, a, b):
        return a + b, {"prod": a * b, "diff": a - b}


@pytest.fixture(scope="module")
def two_inputs():
    return rebel.compile_from_torch(TwoInputs(), example_inputs=[torch.randn(4, 8), torch.randn(4, 8)])


def reference(linear, x):
    with torch.no_grad():
        return linear(x)


# --- bad inputs ---------------------------------------------------------------------------------

def input_error(runtime, *inputs) -> str:
    with pytest.raises(rebel.InputError) as info:
        runtime.run(*inputs)
    assert isinstance(info.value, ValueError)  # InputError is also a ValueError
    return str(info.value)


def test_wrong_number_of_inputs(runtime):
    message = input_error(runtime, torch.randn(16, 16), torch.randn(16, 16))
    assert message == "expected 1 input(s) (input_1: float32[16, 16]), got 2"
    assert "got 0" in input_error(runtime)


def test_wrong_shape(runtime):
    message = input_error(runtime, torch.randn(8, 16))
    assert message == ("input 0 (input_1) has shape [8, 16], but the model was compiled for "
                       "shape [16, 16]")


def test_wrong_dtype(runtime):
    message = input_error(runtime, torch.randn(16, 16, dtype=torch.float64))
    assert message == ("input 0 (input_1) has dtype float64, but the model was compiled for "
                       "dtype float32")
    assert "dtype float64" in input_error(runtime, np.zeros((16, 16)))  # numpy default float64


def test_wrong_type(runtime):
    message = input_error(runtime, [[0.0] * 16] * 16)
    assert message == "input 0 (input_1) must be a torch.Tensor or numpy.ndarray, got list"


def test_unsupported_numpy_dtype(runtime):
    message = input_error(runtime, np.array([["a"] * 16] * 16))
    assert "numpy array of dtype <U1 is not supported" in message


def test_bad_tensor_type(compiled):
    with pytest.raises(rebel.RBLNError, match=r"tensor_type must be one of \('pt', 'np'\), got 'tf'"):
        rebel.Runtime(compiled, tensor_type="tf")


@pytest.mark.parametrize("device", [4, 99, -1])
def test_device_that_does_not_exist(compiled, device):
    with pytest.raises(rebel.DeviceError) as info:
        rebel.Runtime(compiled, device=device)
    message = str(info.value)
    assert f"device {device} does not exist" in message
    assert "4 device(s)" in message and "RBLN-CA25" in message


def test_device_index_must_be_int(compiled):
    with pytest.raises(rebel.DeviceError, match="must be an int"):
        rebel.Runtime(compiled, device="rbln:0")


def test_model_too_large_for_device_dram(small_dram_machine):
    assert rebel.device_count() == 1 and rebel.get_npu_name(0) == "RBLN-CA12"
    usable = device_memory(0).capacity
    assert usable == int(0.3 * 2**30) - 288 * 2**20
    big = rebel.compile_from_torch(torch.nn.Linear(4096, 4096), example_inputs=[torch.randn(1, 4096)],
                                   npu=str(small_dram_machine))
    assert big.program.weight_bytes == 4096 * 4096 * 2 + 4096 * 2
    with pytest.raises(rebel.DeviceMemoryError) as info:
        rebel.Runtime(big)
    message = str(info.value)
    assert isinstance(info.value, MemoryError)
    assert "needs 32.0 MiB of device DRAM" in message
    assert "rbln:0 has 19.2 MiB free" in message and "of 19.2 MiB usable" in message
    assert device_memory(0).used == 0  # nothing leaked by the failed load
    # A model that fits still loads and runs on the same machine.
    torch.manual_seed(1)
    small_model = torch.nn.Linear(16, 16)
    small = rebel.compile_from_torch(small_model, example_inputs=[torch.randn(2, 16)],
                                     npu=str(small_dram_machine))
    x = torch.randn(2, 16)
    with rebel.Runtime(small) as rt:
        torch.testing.assert_close(rt.run(x), reference(small_model, x), atol=ATOL, rtol=RTOL)
        assert device_memory(0).used == rt.dram_bytes


def test_model_for_another_npu(linear):
    ca12 = rebel.compile_from_torch(linear, example_inputs=[torch.randn(16, 16)], npu="RBLN-CA12")
    assert ca12.npu == "RBLN-CA12"
    with pytest.raises(rebel.DeviceError) as info:
        rebel.Runtime(ca12)
    message = str(info.value)
    assert "compiled for RBLN-CA12" in message and "rbln:0 is a RBLN-CA25" in message
    assert "npu='RBLN-CA25'" in message
    assert device_memory(0).used == 0


def test_runtime_survives_failed_runs(runtime, linear):
    x = torch.randn(16, 16)
    good = runtime.run(x)
    report = runtime.last_report
    runs = runtime.runs
    for bad in ([torch.randn(8, 16)], [x.double()], [x, x], [x.tolist()], []):
        with pytest.raises(rebel.InputError):
            runtime.run(*bad)
    assert runtime.runs == runs and runtime.last_report is report
    assert torch.equal(runtime.run(x), good)
    torch.testing.assert_close(good, reference(linear, x), atol=ATOL, rtol=RTOL)


# --- tensor types, structures, several inputs ----------------------------------------------------

def test_numpy_tensor_type(compiled, linear):
    rt = rebel.Runtime(compiled, tensor_type="np")
    x = np.random.default_rng(0).standard_normal((16, 16), dtype=np.float32)
    y = rt.run(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (16, 16)
    torch.testing.assert_close(torch.from_numpy(y), reference(linear, torch.from_numpy(x)),
                               atol=ATOL, rtol=RTOL)
    # torch inputs work too, and agree with the "pt" runtime exactly
    pt = rebel.Runtime(compiled, tensor_type="pt").run(torch.from_numpy(x))
    np.testing.assert_array_equal(rt.run(torch.from_numpy(x)), pt.numpy())
    np.testing.assert_array_equal(y, pt.numpy())


def test_non_contiguous_input(runtime):
    x = torch.randn(16, 16)
    assert torch.equal(runtime.run(x.t()), runtime.run(x.t().contiguous()))


def test_several_inputs_and_nested_outputs(two_inputs):
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    rt = rebel.Runtime(two_inputs)
    out = rt.run(a, b)
    assert isinstance(out, tuple) and len(out) == 2
    total, parts = out
    assert isinstance(parts, dict) and list(parts) == ["prod", "diff"]
    for got, want in [(total, a + b), (parts["prod"], a * b), (parts["diff"], a - b)]:
        assert got.dtype == torch.float32 and got.shape == (4, 8)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        assert torch.equal(got, fp16(got))  # rounded to FP16 on the device
    assert torch.equal(total, fp16(fp16(a) + fp16(b)))
    assert rt.last_report.bytes_moved["hdma_host_to_device"] == 2 * 4 * 8 * 4
    assert rt.last_report.bytes_moved["hdma_device_to_host"] == 3 * 4 * 8 * 4
    assert "expected 2 input(s)" in input_error(rt, a)


def test_nested_outputs_numpy(two_inputs):
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    total, parts = rebel.Runtime(two_inputs, tensor_type="np").run(a.numpy(), b.numpy())
    assert isinstance(total, np.ndarray) and isinstance(parts["prod"], np.ndarray)
    np.testing.assert_array_equal(parts["diff"], rebel.Runtime(two_inputs).run(a, b)[1]["diff"].numpy())


# --- reports ------------------------------------------------------------------------------------

def test_last_report(runtime, compiled):
    assert runtime.last_report is None
    runtime.run(torch.randn(16, 16))
    report = runtime.last_report
    assert report.npu == "RBLN-CA25" and report.device == 0
    assert report.latency_s > 0 and report.device_time_s > 0 and report.host_time_s > 0
    assert report.device_time_s < report.latency_s
    assert report.latency_s == pytest.approx(compiled.predicted_latency_s())
    assert report.wall_time_s > 0
    assert report.bytes_moved["hdma_host_to_device"] == 16 * 16 * 4  # FP32 input, 1024 bytes
    assert report.bytes_moved["hdma_device_to_host"] == 16 * 16 * 4
    weight_bytes = 16 * 16 * 2 + 16 * 2
    assert report.bytes_moved["task_dma_in"] == 16 * 16 * 4 + weight_bytes
    assert report.bytes_moved["task_dma_out"] == 16 * 16 * 4
    assert [k.name for k in report.kernels] == ["0_input_1", "1_linear", "2_output_1"]
    assert report.kernels[1].ops == ("aten.linear.default",)
    assert all(k.dur_s > 0 for k in report.kernels)
    starts = [k.start_s for k in report.kernels]
    assert starts == sorted(starts) and starts[0] > 0
    assert report.host_fallbacks == []
    assert "3 kernels" in repr(report) and "0 host fallbacks" in repr(report)
    assert runtime.runs == 1


def test_report_is_the_same_every_run(runtime):
    runtime.run(torch.randn(16, 16))
    first = runtime.last_report
    runtime.run(torch.randn(16, 16))
    second = runtime.last_report
    assert second is not first
    assert second.latency_s == first.latency_s and second.bytes_moved == first.bytes_moved


# --- async and threads --------------------------------------------------------------------------

def test_async_run(compiled, runtime):
    xs = [torch.randn(16, 16) for _ in range(4)]
    expected = [runtime.run(x) for x in xs]
    art = rebel.AsyncRuntime(compiled, tensor_type="pt")
    try:
        assert torch.equal(asyncio.run(art.async_run(xs[0])), expected[0])

        async def many():
            return await asyncio.gather(*(art.async_run(x) for x in xs))

        for got, want in zip(asyncio.run(many()), expected):
            assert torch.equal(got, want)
        assert art.runs == 5
    finally:
        art.close()


def test_threads_share_one_runtime(runtime):
    xs = [torch.randn(16, 16) for _ in range(8)]
    expected = [runtime.run(x) for x in xs]
    runs_before = runtime.runs

    def work(i):
        return [runtime.run(xs[i]) for _ in range(5)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(8)))
    for i, outs in enumerate(results):
        for out in outs:
            assert torch.equal(out, expected[i])
    assert runtime.runs == runs_before + 40


# --- devices and memory -------------------------------------------------------------------------

def test_device_queries():
    assert rebel.device_count() == 4
    assert all(rebel.npu_is_available(i) for i in range(4))
    assert not rebel.npu_is_available(4) and not rebel.npu_is_available(-1)
    assert rebel.get_npu_name(0) == "RBLN-CA25" and rebel.get_npu_name(3) == "RBLN-CA25"
    # The vendor's rebel.get_npu_name answers None for a missing device (optimum-rbln probes
    # devices this way); rebel.npu.get_npu_name still raises (tests/test_npu.py).
    assert rebel.get_npu_name(4) is None and rebel.get_npu_name(-1) is None


def test_close_frees_device_memory(compiled):
    memory = device_memory(0)
    before = memory.used
    rt = rebel.Runtime(compiled)
    assert rt.dram_bytes > 0
    assert memory.used == before + rt.dram_bytes
    rt.close()
    assert memory.used == before
    rt.close()  # idempotent
    assert memory.used == before
    with rebel.Runtime(compiled) as rt2:
        assert memory.used == before + rt2.dram_bytes
    assert memory.used == before


def test_runtime_on_device_1(compiled, linear):
    used0 = device_memory(0).used
    rt = rebel.Runtime(compiled, device=1)
    assert rt.device == 1 and "rbln:1" in repr(rt)
    assert device_memory(1).used == rt.dram_bytes and device_memory(0).used == used0
    x = torch.randn(16, 16)
    y = rt.run(x)
    torch.testing.assert_close(y, reference(linear, x), atol=ATOL, rtol=RTOL)
    assert torch.equal(y, rebel.Runtime(compiled, device=0).run(x))
    assert rt.last_report.device == 1
    rt.close()
    assert device_memory(1).used == 0


def test_bfloat16_device_dtype(linear):
    compiled = rebel.compile_from_torch(linear, example_inputs=[torch.randn(16, 16)],
                                        device_dtype="bfloat16")
    assert compiled.program.device_dtype == "bfloat16"
    assert {w.dtype for w in compiled.compiled.weights.values()} == {torch.bfloat16}
    x = torch.randn(16, 16)
    y = rebel.Runtime(compiled).run(x)
    ref = reference(linear, x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=2e-2)  # BF16: 8-bit significand
    assert torch.equal(y, bf16(y))  # every output is a BF16 value
    with torch.no_grad():
        emulated = bf16(torch.addmm(bf16(linear.bias), bf16(x), bf16(linear.weight).t()))
    torch.testing.assert_close(y, emulated, atol=1e-5, rtol=8e-3)  # at most 1 BF16 ulp
    # FP16 keeps 3 more bits than BF16: the same model is closer to FP32 in FP16.
    y16 = rebel.Runtime(rebel.compile_from_torch(linear, example_inputs=[x])).run(x)
    assert not torch.equal(y16, y)
    assert (y16 - ref).abs().max() < (y - ref).abs().max()


def test_torch_dtype_as_device_dtype(linear):
    compiled = rebel.compile_from_torch(linear, example_inputs=[torch.randn(16, 16)],
                                        device_dtype=torch.bfloat16)
    assert compiled.program.device_dtype == "bfloat16"
