"""The timing model: tiles fit SRAM, predictive DMA helps, bandwidth-bound work scales with
bandwidth, collectives follow the alpha-beta model, and the H100 check stays within bounds."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rebel
from rebel.compiler.compile import compile_module
from rebel.device.engine import EventEngine
from rebel.device.events import HDMA, LINK, TASK_DMA
from rebel.device.timing import collective_seconds
from rebel.npu import load_spec
from rebel.runtime.timeline import build_steps, predict

ROOT = Path(__file__).resolve().parents[1]


def meta(*shape):
    return torch.empty(*shape, dtype=torch.float16, device="meta")


class Gemm(torch.nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.w = torch.nn.Parameter(meta(n, k), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.w)


def kernel_span_s(program, spec, **engine) -> float:
    events = EventEngine(spec, 0, resident_inputs=True, **engine).run(build_steps(program, spec)).events
    device = [e for e in events if e.device is not None and e.track != HDMA]
    return max(e.end_s for e in device) - min(e.start_s for e in device)


@pytest.mark.parametrize("m, n, k", [(1, 4096, 4096), (64, 4096, 4096), (512, 4096, 4096),
                                     (2048, 8192, 8192), (3136, 64, 576), (7, 13, 29)])
@pytest.mark.parametrize("npu", ["RBLN-CA12", "NVIDIA-H100-SXM"])
def test_gemm_tiles_fit_local_sram_and_cover_the_matrix(m, n, k, npu):
    spec = load_spec(npu)
    program = compile_module(Gemm(k, n), [meta(m, k)], npu=npu).program
    (kernel,) = [k_ for k_ in program.kernels if k_.plan.gemm]
    t = kernel.plan.gemm
    rows, cols = spec.die.compute.mac_array
    assert t.tm % rows == 0 and t.tn % cols == 0 and t.tk % rows == 0
    assert 2 * (t.tm + t.tn) * t.tk * 2 + t.tm * t.tn * 4 <= spec.die.memory.local_sram_bytes
    assert t.out_tiles * t.tm * t.tn >= m * n and t.k_steps * t.tk >= k
    assert t.k_steps * t.tk - k < rows * t.k_steps  # K is split evenly, not padded by a tile
    assert 1 <= t.split_k <= max(1, spec.die.compute.neural_engines // t.out_tiles)


def test_gemv_time_scales_with_dram_bandwidth(tmp_path):
    """A decode-shaped GEMV is bandwidth bound: doubling DRAM (Task DMA) bandwidth halves it."""
    slow = tmp_path / "slow.toml"
    slow.write_text('base = "RBLN-CA12"\nname = "SLOW"\n[die.dma]\ntask_dma_bandwidth_gbps = 128.0\n'
                    '[die.memory]\ndram_bandwidth_gbps = 128.0\n')
    times = {}
    for npu in ("RBLN-CA12", str(slow)):
        spec = load_spec(npu)
        program = compile_module(Gemm(8192, 8192), [meta(1, 8192)], npu=npu).program
        times[npu] = kernel_span_s(program, spec)
    ratio = times[str(slow)] / times["RBLN-CA12"]
    assert 1.95 < ratio <= 2.0
    weights = 8192 * 8192 * 2
    assert times["RBLN-CA12"] == pytest.approx(weights / 256e9, rel=0.05)


class Stack(torch.nn.Module):
    def __init__(self, width=1024, depth=6):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class ComputeThenWeights(torch.nn.Module):
    """A compute-bound GEMM, then a weight-bound projection: the second one's weights can load
    while the first computes, if predictive DMA is on."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(1024, 1024)
        self.b = torch.nn.Linear(1024, 4096)

    def forward(self, x):
        return self.b(self.a(x).mean(0, keepdim=True))


@pytest.mark.parametrize("model, x", [(Stack(), torch.randn(1, 1024)), (Stack(), torch.randn(256, 1024)),
                                      (Stack(2048, 3), torch.randn(16, 2048)),
                                      (ComputeThenWeights(), torch.randn(2048, 1024))])
def test_predictive_dma_never_slower_and_overlaps(model, x):
    compiled = rebel.compile_from_torch(model, example_inputs=[x])
    on = compiled.predicted_latency_s(predictive_dma=True)
    off = compiled.predicted_latency_s(predictive_dma=False)
    assert on <= off
    if isinstance(model, ComputeThenWeights):
        assert off - on > 10e-6  # most of the 33 us load of 8 MiB hides behind the first GEMM
    events = predict(compiled.program, compiled.compiled.spec).events
    prefetched = [e for e in events if e.track == TASK_DMA and e.args.get("prefetch")]
    kernels = [e for e in events if e.category == "kernel"]
    # some weight load runs while an earlier kernel computes
    assert any(k.start_s < w.start_s < k.end_s for w in prefetched for k in kernels)


def test_runtime_switch_for_predictive_dma(monkeypatch):
    compiled = rebel.compile_from_torch(ComputeThenWeights(), example_inputs=[torch.randn(2048, 1024)])
    x = torch.randn(2048, 1024)
    on, off = rebel.Runtime(compiled), rebel.Runtime(compiled, predictive_dma=False)
    torch.testing.assert_close(on.run(x), off.run(x), rtol=0, atol=0)
    assert on.last_report.latency_s < off.last_report.latency_s
    monkeypatch.setenv("RBLN_PREDICTIVE_DMA", "0")
    env_off = rebel.Runtime(compiled)
    env_off.run(x)
    assert env_off.last_report.latency_s == pytest.approx(off.last_report.latency_s)


@pytest.mark.parametrize("parties", [2, 4, 8])
@pytest.mark.parametrize("nbytes", [4096, 1 << 20, 64 << 20])
def test_collectives_follow_alpha_beta(parties, nbytes):
    link = load_spec("RBLN-CA25").links.die_to_die
    alpha, beta = link.alpha_s, 1 / link.bandwidth
    ar = collective_seconds("all_reduce", nbytes, parties, link)
    ag = collective_seconds("all_gather", nbytes, parties, link)
    assert ar == pytest.approx(2 * (parties - 1) * (alpha + nbytes * beta / parties))
    assert ag == pytest.approx((parties - 1) * (alpha + nbytes * beta / parties))
    assert collective_seconds("all_reduce", nbytes, 1, link) == 0.0


def test_attention_is_one_fused_kernel_with_flash_traffic():
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    q, k, v = meta(1, 32, 2048, 128), meta(1, 8, 2048, 128), meta(1, 8, 2048, 128)
    program = compile_module(Attn(), [q, k, v], npu="RBLN-CA12").program
    (kernel,) = program.kernels
    assert kernel.kind == "attention"
    # Q, K, V in and O out, once each: no S x S score matrix goes to DRAM
    moved = kernel.plan.bytes_in + kernel.plan.bytes_out
    assert moved == 2 * (2 * 32 * 2048 * 128 + 2 * 8 * 2048 * 128)
    causal_flops = 4 * 32 * 2048 * 2048 * 128 * (1 - 2047 / 4096)
    assert kernel.plan.flops == pytest.approx(causal_flops)


class CachedAttention(torch.nn.Module):
    """Two layers, each a norm and then attention over its layer of a stacked KV cache
    (cache[i] is a view): the shape of a decode step that reads a resident cache."""

    def __init__(self, d=256, heads=8, kv_heads=4):
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv_heads, d // heads
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(d, device="meta", dtype=torch.float16)
                                         for _ in range(2))
        self.q = torch.nn.ModuleList(torch.nn.Linear(d, d, bias=False, device="meta", dtype=torch.float16)
                                     for _ in range(2))
        self.o = torch.nn.ModuleList(torch.nn.Linear(d, d, bias=False, device="meta", dtype=torch.float16)
                                     for _ in range(2))

    def forward(self, x, k_cache, v_cache):
        b = x.shape[0]
        for i in range(2):
            q = self.q[i](self.norms[i](x)).view(b, 1, self.heads, self.hd).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k_cache[i], v_cache[i], enable_gqa=True)
            x = x + self.o[i](a.transpose(1, 2).reshape(b, 1, -1))
        return x


@pytest.mark.parametrize("tp", [1, 2])
def test_a_cache_is_loaded_once_per_layer_by_its_die_share(tp):
    """Fusion may put the view cache[i] into the norm kernel before the attention: the norm
    must not be charged for loading the cache (nor for writing the view out), and a die that
    takes its heads' slice of the cache under tensor parallelism loads only that slice."""
    b, ctx = 4, 512
    cache = meta(2, b, 4, ctx, 32)
    program = compile_module(CachedAttention(), [meta(b, 1, 256), cache, cache.clone()],
                             npu="RBLN-CA25", tensor_parallel_size=tp).program
    inputs = {"input_2", "input_3"}
    views = {o.name for k in program.kernels for o in k.ops if o.refs and o.refs[0] in inputs}
    loaded = sum(t.nbytes for k in program.kernels for t in k.plan.dma_in
                 if t.value in inputs | views)
    layer_bytes = b * 4 * ctx * 32 * 2  # one layer's keys (or values), fp16
    assert loaded == 2 * 2 * layer_bytes // tp  # keys and values of 2 layers, this die's heads
    written = sum(t.nbytes for k in program.kernels for t in k.plan.dma_out if t.value in views)
    assert written == 0


def test_tensor_parallel_timing_puts_collectives_on_the_link():
    compiled = rebel.compile_from_torch(Stack(512, 2), example_inputs=[torch.randn(4, 512)],
                                        tensor_parallel_size=4)
    runtime = rebel.Runtime(compiled)
    runtime.run(torch.randn(4, 512))
    events = runtime.last_report.events
    links = [e for e in events if e.track == LINK]
    assert {e.device for e in links} == {0, 1, 2, 3}
    assert all(e.args["op"] in ("all_reduce", "all_gather") for e in links)
    spec = load_spec("RBLN-CA25")
    for e in links:
        assert e.dur_s == pytest.approx(collective_seconds(e.args["op"], e.args["bytes"], 4,
                                                           spec.links.die_to_die))


def test_predicted_latency_of_a_tensor_parallel_model_includes_its_collectives():
    """compiled.predicted_latency_s() times the same dies and link a Runtime uses, so a TP=2
    model's prediction pays its all-reduces and equals what a run reports."""
    compiled = rebel.compile_from_torch(Stack(512, 2), example_inputs=[torch.randn(4, 512)],
                                        tensor_parallel_size=2)
    spec = compiled.compiled.spec
    steps = build_steps(compiled.program, spec)
    alone = EventEngine(spec, 0).run(steps).latency_s  # one die, collectives cost nothing
    collectives = [k for s in steps if hasattr(s, "kernels") for k in s.kernels if k.plan.comm]
    assert any(k.plan.comm == "all_reduce" for k in collectives)
    comm_s = sum(collective_seconds(k.plan.comm, k.plan.comm_bytes, 2, spec.links.die_to_die)
                 for k in collectives)
    assert comm_s > 0
    predicted = compiled.predicted_latency_s()
    assert predicted == pytest.approx(alone + comm_s, rel=1e-9)
    runtime = rebel.Runtime(compiled)
    runtime.run(torch.randn(4, 512))
    assert runtime.last_report.latency_s == pytest.approx(predicted, rel=1e-9)


@pytest.mark.slow
def test_validate_timing_against_h100_measurements():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "validate_timing.py"), "--data",
                          str(ROOT / "benchmarks" / "data" / "h100-ops.jsonl")],
                         capture_output=True, text=True, timeout=1200, check=True).stdout
    last = out.strip().splitlines()[-1]
    assert last.startswith("MAPE ")
    mape = float(last.split()[1])
    # issue 12's targets: op MAPE <= 12% and no kind above 20% (measured 11.0 when the norm rows
    # became block-per-row kernels; 15.8 before)
    assert math.isfinite(mape) and mape <= 12.0
    kinds = {line.split()[0]: float(line.split()[2].rstrip("%")) for line in out.splitlines()
             if line.split() and line.split()[0] in ("gemm", "eltwise", "attention", "norm",
                                                     "h2d-pageable", "d2h-pageable")
             and line.split()[1].isdigit()}
    assert kinds["gemm"] < 15 and max(kinds[k] for k in ("eltwise", "norm", "attention")) < 20
    # the calibration copies are all pageable (pinned=false); each is reported under its path
    assert kinds["h2d-pageable"] < 10 and kinds["d2h-pageable"] < 5


# --- whole-model rows of benchmarks/validate_timing.py, and the GPU mechanisms ---------------

def _validate_timing():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import validate_timing
    finally:
        sys.path.pop(0)
    return validate_timing


TINY_BERT = {"kind": "model", "model": "bert-large", "phase": "forward", "B": 2, "S": 16,
             "dtype": "float16", "ms_median": 0.05,
             "config": {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 2,
                        "intermediate_size": 128, "vocab_size": 100}}


def test_model_rows_predict_the_eager_module_with_fusion_off(tmp_path, capsys):
    """A model row is the same module compiled with fusion=False (one kernel per op) and timed
    as one device run; its error and the `e2e MAPE` line follow from that prediction."""
    import json
    from transformers import BertConfig, BertModel

    vt = _validate_timing()
    data = tmp_path / "models.jsonl"
    data.write_text(json.dumps(TINY_BERT) + "\n")
    vt.main(["--data", str(data)])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("e2e MAPE ")
    row = next(line for line in out if line.startswith("bert-large"))
    predicted = float(row.split()[-3])

    config = BertConfig(**{**vt_bert(), **TINY_BERT["config"]}, attn_implementation="sdpa")
    with torch.device("meta"):
        model = BertModel(config).to(torch.float16).eval()
    ids = torch.empty(2, 16, dtype=torch.long, device="meta")
    spec = load_spec("NVIDIA-H100-SXM")
    eager = compile_module(model, [ids], npu="NVIDIA-H100-SXM", fusion=False, progress=False)
    fused = compile_module(model, [ids], npu="NVIDIA-H100-SXM", fusion=True, progress=False)
    assert len(eager.program.kernels) > len(fused.program.kernels)
    expected = kernel_span_s(eager.program, spec) * 1e3
    assert predicted == pytest.approx(expected, rel=1e-3)
    assert expected > kernel_span_s(fused.program, spec) * 1e3  # one kernel per op costs more
    err = abs(expected - TINY_BERT["ms_median"]) / TINY_BERT["ms_median"] * 100
    assert float(out[-1].split()[-1]) == pytest.approx(err, abs=0.06)


def vt_bert():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from timing_models import BERT_LARGE
    finally:
        sys.path.pop(0)
    return BERT_LARGE


def test_validate_timing_data_files_are_checked(tmp_path, capsys):
    import json

    vt = _validate_timing()
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"kind": "h2d", "nbytes": 1 << 20, "ms_median": 0.1}) + "\n\n")
    other = tmp_path / "b.jsonl"
    other.write_text(json.dumps({"kind": "d2h", "nbytes": 1 << 20, "ms_median": 0.1}) + "\n")
    records = vt.read_records([good, other])
    assert [r["kind"] for r in records] == ["h2d", "d2h"]  # both files, blank lines skipped
    vt.main(["--data", str(good), str(other)])
    out = capsys.readouterr().out
    assert "h2d-pageable" in out and "d2h-pageable" in out and "e2e MAPE" not in out

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"kind": "h2d", "nbytes": 1, "ms_median": 1}) + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not JSON"):
        vt.read_records([bad])
    bad.write_text(json.dumps([1, 2]) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: a record must be a JSON object"):
        vt.read_records([bad])
    bad.write_text(json.dumps({"kind": "gemm", "M": 1, "N": 1, "K": 1}) + "\n")
    with pytest.raises(SystemExit, match="has no ms_median"):
        vt.read_records([bad])
    with pytest.raises(SystemExit, match="no such file"):
        vt.read_records([tmp_path / "missing.jsonl"])
    with pytest.raises(ValueError, match="'bert-large' lacks S"):
        vt.predict_ms({"kind": "model", "model": "bert-large", "B": 1, "dtype": "float16"},
                      load_spec("NVIDIA-H100-SXM"))
    with pytest.raises(ValueError, match="unknown model 'gpt-9'"):
        vt.predict_ms({"kind": "model", "model": "gpt-9", "B": 1, "dtype": "float16"},
                      load_spec("NVIDIA-H100-SXM"))


def test_gpu_kernels_run_in_stream_order_without_cross_kernel_prefetch():
    """On the H100 spec a kernel's loads start only after the previous kernel completes (a GPU
    has no DMA running ahead of the stream); on the ATOM the next weights prefetch meanwhile."""
    x = torch.empty(2048, 1024, dtype=torch.float16, device="meta")
    with torch.device("meta"):
        model = ComputeThenWeights().half()
    for npu, overlaps in (("RBLN-CA12", True), ("NVIDIA-H100-SXM", False)):
        spec = load_spec(npu)
        assert spec.die.dma.loads_in_stream_order is not overlaps
        compiled = compile_module(model, [x], npu=npu, progress=False)
        events = EventEngine(spec, 0, resident_inputs=True).run(
            build_steps(compiled.program, spec)).events
        kernels = [e for e in events if e.category == "kernel"]
        loads = [e for e in events if e.track == TASK_DMA and e.category == "dma_in"]
        early = any(k.start_s < w.start_s < k.end_s - 1e-12 for w in loads for k in kernels
                    if not w.name.endswith(k.name))
        assert early is overlaps, npu


def test_nchw_convolutions_pay_layout_transposes_on_the_gpu():
    """cuDNN on NCHW half tensors: the input and the filter are transposed to channels last
    before the convolution and the result back after it, each its own kernel (plan parts)
    making one read and one write of its tensor."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).half().to("meta")
    x = torch.empty(8, 64, 56, 56, dtype=torch.float16, device="meta")
    compiled = compile_module(conv, [x], npu="NVIDIA-H100-SXM", progress=False)
    kernel = next(k for k in compiled.program.kernels if k.kind == "conv")
    parts = {p.label: p.plan for p in kernel.plan.parts}
    assert list(parts) == ["nchw_to_nhwc", "filter_to_krsc", "conv", "nhwc_to_nchw"]

    def moved(plan):  # bytes through DRAM and through the L2
        return plan.bytes_in + plan.bytes_out + plan.sram_bytes

    act = 8 * 64 * 56 * 56 * 2  # the input activation, and the output has the same size
    assert moved(parts["nchw_to_nhwc"]) == 2 * act
    assert moved(parts["nhwc_to_nchw"]) == 2 * act
    assert moved(parts["filter_to_krsc"]) == 2 * 64 * 64 * 9 * 2
    assert parts["conv"].gemm is not None and parts["conv"].flops == kernel.plan.flops


class PagedDecode(torch.nn.Module):
    """One decode step of `rbln::paged_attention` over a cache of `block`-token blocks (the
    caches updated in place, as optimum.rbln's PagedCausalLM does)."""

    def __init__(self, block: int, partition: int, seq: int, heads: int = 8, d: int = 64):
        super().__init__()
        from rebel.device import ops  # noqa: F401  (registers torch.ops.rbln)
        self.partition = partition
        shape = (seq // block, heads, block, d)
        self.register_buffer("k_cache", torch.zeros(shape))
        self.register_buffer("v_cache", torch.zeros(shape))

    def forward(self, q, k, v, tables, positions):
        out, kc, vc = torch.ops.rbln.paged_attention(q, k, v, self.k_cache, self.v_cache, tables,
                                                     positions, self.partition, 0.125)
        self.k_cache.copy_(kc)
        self.v_cache.copy_(vc)
        return out


def test_paged_attention_time_follows_the_context_not_the_block_size():
    """Decode time grows with the context read (partition by partition) and is the same for
    blocks of a whole partition and of a quarter of one: the attention reads the same keys (the
    longer block table is the only extra input, a few bytes)."""
    seq, partition = 4096, 1024
    latency = {}
    for block in (partition, partition // 4):
        model = PagedDecode(block, partition, seq)
        example = [torch.randn(1, 8, 1, 64), torch.randn(1, 8, 1, 64), torch.randn(1, 8, 1, 64),
                   torch.arange(seq // block).view(1, -1), torch.zeros(1, 1, dtype=torch.long)]
        runtime = rebel.Runtime(rebel.compile_from_torch(model, example_inputs=[example]))
        for context in (10, 1500, 4000):
            runtime.run(*example[:4], torch.tensor([[context]]))
            latency[block, context] = runtime.thread_last_report.latency_s
    for context in (10, 1500, 4000):
        assert latency[partition // 4, context] == pytest.approx(latency[partition, context], rel=1e-3)
    assert latency[partition, 10] < latency[partition, 1500] < latency[partition, 4000]
