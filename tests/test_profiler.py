"""The trace must round-trip exactly, since the summary and every later timing test read it back."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from rebel.device.events import HDMA, HOST, LINK, NEURAL_ENGINE, TASK_DMA, Event
from rebel.profiler import TraceSlice, read_trace, summarize, summarize_file, write_trace

NAMES = {0: "NPU 0 · RBLN-CA25 (die 0)", 1: "NPU 1 · RBLN-CA25 (die 0)"}
DEV0 = NAMES[0]
DEV1 = NAMES[1]


def _run_events() -> list[Event]:
    us = 1e-6
    return [
        Event(HOST, None, "launch", 0.0, 2 * us, "launch", {"graph": "mlp"}, flow_out=(1,)),
        Event(HDMA, 0, "hdma_in", 2 * us, 10 * us, "dma_in", {"bytes": 4096, "buffers": ["x", "w"]},
              flow_in=(1,)),
        Event(TASK_DMA, 0, "task_dma_in", 12 * us, 3 * us, "dma_in", {"bytes": 4096}),
        Event(NEURAL_ENGINE, 0, "0_input_1", 15 * us, 1 * us, "kernel", {"flops": 0}),
        Event(NEURAL_ENGINE, 0, "1_linear+relu", 16 * us, 20.5 * us, "kernel",
              {"flops": 1_048_576, "util": 0.75, "fused": True}),
        Event(TASK_DMA, 0, "task_dma_out", 36.5 * us, 2.5 * us, "dma_out", {"bytes": 1024}),
        Event(HDMA, 0, "hdma_out", 39 * us, 5 * us, "dma_out", {"bytes": 1024}, flow_out=(2,)),
        Event(HOST, None, "sync", 44 * us, 1 * us, "sync", flow_in=(2,)),
        Event(HOST, None, "aten::softmax", 45 * us, 7 * us, "fallback"),
        Event(LINK, 1, "c2c_send", 20 * us, 4 * us, "link", {"bytes": 512}),
    ]


EXPECTED = [  # (group, track, name, start_ns, end_ns), in start order
    (HOST, HOST, "launch", 0, 2_000),
    (DEV0, HDMA, "hdma_in", 2_000, 12_000),
    (DEV0, TASK_DMA, "task_dma_in", 12_000, 15_000),
    (DEV0, NEURAL_ENGINE, "0_input_1", 15_000, 16_000),
    (DEV0, NEURAL_ENGINE, "1_linear+relu", 16_000, 36_500),
    (DEV1, LINK, "c2c_send", 20_000, 24_000),
    (DEV0, TASK_DMA, "task_dma_out", 36_500, 39_000),
    (DEV0, HDMA, "hdma_out", 39_000, 44_000),
    (HOST, HOST, "sync", 44_000, 45_000),
    (HOST, HOST, "aten::softmax", 45_000, 52_000),
]


@pytest.fixture(scope="module")
def slices(tmp_path_factory) -> list[TraceSlice]:
    path = write_trace(tmp_path_factory.mktemp("prof") / "nested" / "run.pb", _run_events(), NAMES)
    assert path.is_file()
    return read_trace(path)


def _by_name(slices: list[TraceSlice]) -> dict[str, TraceSlice]:
    return {s.name: s for s in slices}


def test_slices_round_trip_exactly(slices):
    got = [(s.group, s.track, s.name, s.start_ns, s.end_ns) for s in slices]
    assert got == EXPECTED


def test_categories_and_args_round_trip(slices):
    s = _by_name(slices)
    assert s["launch"].category == "launch"
    assert s["launch"].args == {"graph": "mlp"}
    assert s["hdma_in"].args == {"bytes": 4096, "buffers": "x, w"}
    assert s["1_linear+relu"].args == {"flops": 1_048_576, "util": 0.75, "fused": True}
    assert s["aten::softmax"].category == "fallback"
    assert s["sync"].args == {}


def test_flows_connect_host_and_device(slices):
    s = _by_name(slices)
    assert 1 in s["launch"].flow_ids
    assert 1 in s["hdma_in"].terminating_flow_ids
    assert 2 in s["hdma_out"].flow_ids
    assert 2 in s["sync"].terminating_flow_ids
    assert s["task_dma_in"].flow_ids == () and s["task_dma_in"].terminating_flow_ids == ()


def test_zero_duration_slice_is_visible(tmp_path):
    path = write_trace(tmp_path / "z.pb", [Event(NEURAL_ENGINE, 0, "0_nop", 1e-6, 0.0)], NAMES)
    (only,) = read_trace(path)
    assert (only.start_ns, only.end_ns) == (1_000, 1_001)


def test_overlapping_slices_on_one_track_stay_paired(tmp_path):
    us = 1e-6
    events = [
        Event(HDMA, 0, "a", 0.0, 10 * us),
        Event(HDMA, 0, "b", 5 * us, 10 * us),  # partial overlap: needs its own lane
        Event(HDMA, 0, "c", 1 * us, 2 * us),  # nested inside a
    ]
    path = write_trace(tmp_path / "o.pb", events, NAMES)
    got = {s.name: (s.track, s.start_ns, s.end_ns) for s in read_trace(path)}
    assert got == {"a": (HDMA, 0, 10_000), "b": (HDMA, 5_000, 15_000), "c": (HDMA, 1_000, 3_000)}


@pytest.mark.parametrize("content", [random.Random(0).randbytes(256), b"this is a text file\nnot a trace\n", b""])
def test_non_trace_file_raises_value_error(tmp_path, content):
    path = tmp_path / "bogus.pb"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a Perfetto"):
        read_trace(path)


def test_summary_from_slices_and_events_agree(slices, tmp_path):
    text = summarize(slices)
    assert text == summarize(_run_events(), NAMES)
    assert "\x1b" not in text
    assert "span: 52.000 us" in text
    assert "linear+relu" in text and "input_1" in text
    assert "1_linear+relu" not in text  # index stripped for aggregation
    assert "aten::softmax" in text
    for track in (HOST, HDMA, TASK_DMA, NEURAL_ENGINE, LINK):
        assert track in text
    ne_line = next(line for line in text.splitlines() if DEV0 in line and NEURAL_ENGINE in line)
    assert "21.500" in ne_line  # 1 us + 20.5 us of kernels
    hdma_bytes = next(
        line for line in text.splitlines() if DEV0 in line and HDMA in line and "5120" in line
    )
    assert "5.00 KiB" in hdma_bytes


def test_summarize_file(tmp_path):
    path = write_trace(tmp_path / "run.pb", _run_events(), NAMES)
    assert summarize_file(path) == summarize(_run_events(), NAMES)


def test_trace_file_appends_every_run_on_one_clock(tmp_path):
    from rebel.profiler.trace_file import TraceFile

    run = [Event(HOST, None, "launch", 0.0, 1e-6, "launch", flow_out=(1,)),
           Event(NEURAL_ENGINE, 0, "0_linear", 1e-6, 2e-6, "kernel", flow_in=(1,))]
    trace = TraceFile(tmp_path / "t.pb", {0: "NPU 0"})
    for runs in range(1, 4):
        trace.add(run, span_s=5e-6)
        assert len(read_trace(tmp_path / "t.pb")) == 2 * runs  # on disk as soon as add returns
    slices = read_trace(tmp_path / "t.pb")
    launches = [s for s in slices if s.name == "launch"]
    assert [s.start_ns for s in launches] == [0, 5000, 10000]  # one clock, run after run
    assert sorted(f for s in launches for f in s.flow_ids) == [1, 2, 3]  # flows stay distinct
    kernels = [s for s in slices if s.name == "0_linear"]
    assert sorted(f for s in kernels for f in s.terminating_flow_ids) == [1, 2, 3]


def test_trace_file_replaces_an_old_file(tmp_path):
    from rebel.profiler.trace_file import TraceFile

    path = write_trace(tmp_path / "t.pb", _run_events(), NAMES)
    TraceFile(path, NAMES).add([Event(HOST, None, "launch", 0.0, 1e-6)], span_s=1e-6)
    assert [s.name for s in read_trace(path)] == ["launch"]


def test_appended_chunks_equal_one_trace(tmp_path):
    """Run by run or all at once, the same slices come back, lanes (overlaps) included."""
    from rebel.profiler.trace_file import TraceFile

    us = 1e-6
    run = [*_run_events(), Event(HDMA, 0, "overlap", 5 * us, 10 * us, "dma_in")]
    trace = TraceFile(tmp_path / "appended.pb", NAMES)
    for _ in range(3):
        trace.add(run, span_s=60 * us)
    shifted = [replace(e, start_s=e.start_s + k * 60 * us) for k in range(3) for e in run]
    whole = write_trace(tmp_path / "whole.pb", shifted, NAMES)

    def key(s):
        return (s.group, s.track, s.name, s.start_ns, s.end_ns, s.args)

    assert sorted(map(key, read_trace(trace.path)), key=repr) == sorted(map(key, read_trace(whole)), key=repr)
