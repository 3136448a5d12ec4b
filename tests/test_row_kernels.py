"""Row reductions on the H100 spec are timed as PyTorch's block-per-row CUDA kernels: the variant
follows the row length, its passes and loads in flight set its time, and a replayed input that
fits the L2's replay-resident share is read from there. NPU specs keep the streaming rule."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rebel.compiler.compile import compile_module
from rebel.device.engine import EventEngine
from rebel.device.events import NEURAL_ENGINE, TASK_DMA
from rebel.device.timing import KernelPlan, RowKernel, row_kernel_seconds
from rebel.errors import SpecError
from rebel.npu import load_spec
from rebel.runtime.timeline import build_steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:
    import validate_timing  # the op rows' modules, as the check builds them
finally:
    sys.path.pop(0)

H100 = "NVIDIA-H100-SXM"


def meta(*shape):
    return torch.empty(*shape, dtype=torch.bfloat16, device="meta")


def row_module(op: str, cols: int):
    """The module validate_timing.py builds for a norm row (its row count does not change it)."""
    return validate_timing.build({"kind": "norm", "op": op, "rows": 1, "cols": cols})[0]


def row_kernel(op: str, rows: int, cols: int, npu: str = H100):
    compiled = compile_module(row_module(op, cols), [meta(rows, cols)], npu=npu,
                              device_dtype="bfloat16", progress=False)
    (kernel,) = [k for k in compiled.program.kernels if k.plan.rows is not None] or [None]
    return compiled, kernel


def span_s(program, spec, replayed: bool) -> float:
    events = EventEngine(spec, 0, resident_inputs=True, replayed=replayed).run(
        build_steps(program, spec)).events
    device = [e for e in events if e.device is not None]
    return max(e.end_s for e in device) - min(e.start_s for e in device)


@pytest.mark.parametrize("npu", ["RBLN-CA12", "RBLN-CA25"])
def test_npu_specs_keep_the_streaming_rule(npu):
    assert not load_spec(npu).die.compute.row_kernels
    _, kernel = row_kernel("softmax", 64, 4096, npu)
    assert kernel is None


@pytest.mark.parametrize("op, cols, family, passes", [
    ("softmax", 1024, "softmax_warp", 1),         # persistent warp softmax: <= 2048 and 8 KiB
    ("softmax", 4096, "softmax_registers", 1),    # 4 elements per thread of a 1024-thread block
    ("softmax", 16000, "softmax_shared", 1),      # 16 per thread; the row fits 48 KiB
    ("softmax", 32000, "softmax_global", 3),      # 64 KB row: max, sum, write each read it
    ("layernorm", 4096, "layer_norm", 2),
    ("rmsnorm", 4096, "rms_norm", 2),             # F.rms_norm's decomposition, one kernel
])
def test_the_kernel_variant_follows_the_row_length(op, cols, family, passes):
    _, kernel = row_kernel(op, 8, cols)
    row = kernel.plan.rows
    assert (row.family, row.passes, row.rows, row.cols) == (family, passes, 8, cols)
    assert row.weight_rows == {"softmax": 0, "rmsnorm": 1, "layernorm": 2}[op]
    assert KernelPlan.from_json(kernel.plan.to_json()) == kernel.plan


def test_softmax_costs_more_passes_than_rms_norm_of_the_same_shape():
    """A 32000-element row does not fit a block's shared memory, so PyTorch's softmax reads it
    three times; the norm kernel reads it twice. Same bytes in and out, more time."""
    spec = load_spec(H100)
    _, soft = row_kernel("softmax", 4096, 32000)
    _, rms = row_kernel("rmsnorm", 4096, 32000)
    assert soft.plan.rows.passes > rms.plan.rows.passes
    assert soft.plan.bytes_in == pytest.approx(rms.plan.bytes_in, rel=1e-3)
    assert row_kernel_seconds(soft.plan.rows, spec) > row_kernel_seconds(rms.plan.rows, spec)


def test_a_replayed_input_that_fits_l2_is_read_from_it():
    spec = load_spec(H100)
    fits = 2048 * 4096 * 2
    assert fits <= spec.die.memory.replay_resident_bytes < 8192 * 4096 * 2
    small, _ = row_kernel("rmsnorm", 2048, 4096)
    big, _ = row_kernel("rmsnorm", 8192, 4096)
    assert span_s(small.program, spec, replayed=True) < span_s(small.program, spec, replayed=False)
    assert span_s(big.program, spec, replayed=True) == pytest.approx(
        span_s(big.program, spec, replayed=False), rel=1e-12)


def test_loads_in_flight_set_the_time_of_a_small_grid():
    """One row on one SM is latency-bound (Little's law): a loop with one load in flight per
    thread takes longer than the same row with all its loads issued at once."""
    spec = load_spec(H100)
    loop = RowKernel("rms_norm", 1, 4096, 2, 128, 8, 1, 2, 1)
    unrolled = replace(loop, loads_in_flight=8)
    latency = spec.die.memory.shared_sram_latency_us * 1e-6
    # the first pass over the 8 KB row (from L2) waits for 8 loads of 128 threads x 8 B one
    # latency at a time instead of once
    assert row_kernel_seconds(loop, spec, replayed=True) - row_kernel_seconds(
        unrolled, spec, replayed=True) > 6 * latency
    # one row per SM on all 132 SMs: about the time of one row, not 132 times it
    many = replace(loop, rows=132)
    assert row_kernel_seconds(many, spec) < 1.5 * row_kernel_seconds(loop, spec)


def test_the_engine_slice_is_launch_plus_row_time_with_its_traffic_inside():
    spec = load_spec(H100)
    compiled, kernel = row_kernel("layernorm", 8192, 4096)
    events = EventEngine(spec, 0, resident_inputs=True).run(build_steps(compiled.program, spec)).events
    (ne,) = [e for e in events if e.track == NEURAL_ENGINE and e.name == kernel.name]
    (dma,) = [e for e in events if e.track == TASK_DMA and e.name.endswith(kernel.name)]
    assert ne.dur_s == pytest.approx(spec.die.compute.kernel_launch_s
                                     + row_kernel_seconds(kernel.plan.rows, spec), rel=1e-9)
    assert ne.start_s <= dma.start_s and dma.end_s == pytest.approx(ne.end_s, rel=1e-12)
    assert ne.args["passes"] == 2


def test_replay_resident_fraction_is_checked(tmp_path):
    path = tmp_path / "h100-more-l2.toml"
    path.write_text('base = "NVIDIA-H100-SXM"\n[die.memory]\nreplay_resident_fraction = 1.5\n')
    with pytest.raises(SpecError, match="replay_resident_fraction .* at most 1"):
        load_spec(path)
