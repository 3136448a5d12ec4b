"""Weight-only quantized linears (rebel.device.quant): numerics against an FP32 reference
written here, on the virtual NPU, and what the timing model charges for them."""
from __future__ import annotations

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import rebel
from rebel.compiler.compile import compile_module
from rebel.device.quant import (TARGET, WeightOnlyLinear, linear_weight_only_reference, pack_int4,
                                quantize_linears, quantize_weight, unpack_int4)
from rebel.device.timing import kernel_time
from rebel.npu import load_spec

CONFIGS = [(8, None), (8, 64), (8, 128), (4, None), (4, 64), (4, 128)]


def _dequantized(qweight, scales, bits):
    """An independent FP32 dequantization: nibbles by integer arithmetic, scales by repeat."""
    if bits == 4:
        b = qweight.to(torch.int16)
        low, high = b % 16, b // 16
        q = torch.empty(qweight.shape[0], qweight.shape[1] * 2, dtype=torch.int16)
        q[:, 0::2], q[:, 1::2] = low, high
        q = torch.where(q > 7, q - 16, q)
    else:
        q = qweight
    group = q.shape[1] // scales.shape[1]
    return q.float() * scales.float().repeat_interleave(group, dim=1)


def test_int4_packing_is_low_nibble_first():
    q = torch.tensor([[1, -1, -8, 7]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.tolist() == [[0xF1, 0x78]]
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    assert torch.equal(unpack_int4(pack_int4(every)), every)


@pytest.mark.parametrize("bits,group", CONFIGS)
def test_quantized_linear_matches_fp32_reference(bits, group):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    layer = WeightOnlyLinear.from_linear(linear, bits, group)
    g = group or 256
    want_q = (torch.int8, (96, 256)) if bits == 8 else (torch.uint8, (96, 128))
    assert (layer.qweight.dtype, tuple(layer.qweight.shape)) == want_q
    assert layer.scales.dtype == torch.float16 and tuple(layer.scales.shape) == (96, 256 // g)
    w = _dequantized(layer.qweight, layer.scales, bits)
    # symmetric rounding: each weight within half a step of its group's scale
    step = layer.scales.float().repeat_interleave(g, dim=1)
    assert ((w - linear.weight.detach()).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(5, 3, 256)
    want = x @ w.t() + linear.bias.detach()
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (5, 3, 96)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the same as a float linear on the dequantized weight
    torch.testing.assert_close(got, F.linear(x, layer.dequantized_weight(), linear.bias), rtol=1e-5,
                               atol=1e-5)
    # half inputs give half outputs, computed in FP32 then rounded once
    half = linear_weight_only_reference(x.half(), layer.qweight, layer.scales, bits, g,
                                        linear.bias.detach())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, (x.half().float() @ w.t() + linear.bias.detach()).half())


def test_finer_groups_and_more_bits_quantize_closer():
    torch.manual_seed(1)
    linear = nn.Linear(512, 256, bias=False)
    x = torch.randn(64, 512)
    exact = linear(x).detach()

    def error(bits, group):
        return (WeightOnlyLinear.from_linear(linear, bits, group)(x) - exact).abs().mean().item()

    assert error(8, None) < error(4, 64) < error(4, 128) < error(4, None)
    assert error(8, 64) < error(8, None)


def test_all_zero_group_and_bad_inputs():
    linear = nn.Linear(128, 4, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
    layer = WeightOnlyLinear.from_linear(linear, 4, 64)
    assert (layer.scales == 0).all() and (layer(torch.randn(2, 128)) == 0).all()
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        WeightOnlyLinear.from_linear(nn.Linear(128, 4), 3)
    with pytest.raises(ValueError, match="group_size 48 must divide in_features 128"):
        WeightOnlyLinear.from_linear(nn.Linear(128, 4), 8, 48)
    with pytest.raises(ValueError, match="in_features must be even"):
        WeightOnlyLinear.from_linear(nn.Linear(127, 4), 4, 127)
    with pytest.raises(ValueError, match="cannot quantize 1: .*group_size 64"):
        quantize_linears(nn.Sequential(nn.Linear(128, 96), nn.Linear(96, 8)), 8, 64)
    q, s = quantize_weight(torch.randn(4, 128), 8)
    with pytest.raises(ValueError, match="input has 64 features"):
        torch.ops.rbln.linear_weight_only(torch.randn(2, 64), q, s, 8, 128)
    with pytest.raises(ValueError, match="stored as a 2-d torch.uint8"):
        torch.ops.rbln.linear_weight_only(torch.randn(2, 128), q, s, 4, 128)
    with pytest.raises(ValueError, match="scales must be"):
        torch.ops.rbln.linear_weight_only(torch.randn(2, 128), q, s, 8, 64)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 64, bias=False)
        self.lm_head = nn.Linear(64, 32)

    def forward(self, x):
        return self.lm_head(self.down(F.silu(self.up(x))))


def test_quantize_linears_replaces_in_place_and_skips_lm_head():
    model = _Block()
    assert quantize_linears(model, 4, 64) is model
    assert isinstance(model.up, WeightOnlyLinear) and isinstance(model.down, WeightOnlyLinear)
    assert type(model.lm_head) is nn.Linear
    assert (model.up.bits, model.up.group_size, model.down.group_size) == (4, 64, 64)


@pytest.mark.parametrize("bits,group", [(8, None), (4, 64)])
def test_compiled_quantized_model_runs_on_the_virtual_npu(bits, group, tmp_path):
    torch.manual_seed(2)
    model = quantize_linears(_Block().eval(), bits, group)
    x = torch.randn(4, 128)
    compiled = rebel.compile_from_torch(model, example_inputs=[x])
    program = compiled.program
    kernels = [k for k in program.kernels if any(o.target == TARGET for o in k.ops)]
    assert len(kernels) == 2 and all(k.kind == "gemm" for k in kernels)
    assert all(sum(o.target == TARGET for o in k.ops) == 1 for k in kernels)
    stored = {"int8" if bits == 8 else "uint8", "float16"}
    assert {program.weights["up.qweight"].dtype, program.weights["up.scales"].dtype} == stored
    want = model(x).detach()  # FP32 reference (the op's reference kernel)
    got = rebel.Runtime(compiled).run(x)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    # the artifact keeps the packed weights as stored
    path = compiled.save(tmp_path / "q.rbln")
    torch.testing.assert_close(rebel.Runtime(str(path)).run(x), got, rtol=0, atol=0)


def _stack(bits, group=None, layers=4, width=4096):
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).half()
    return quantize_linears(model, bits, group) if bits else model


def test_decode_prediction_follows_the_bytes_stored():
    """Batch-1 decode through 4 linears of 4096 x 4096 (meta weights): the weight DMA and the
    DRAM the weights take follow the stored bytes; the GEMM runs at the FP16 rate."""
    spec = load_spec("RBLN-CA25")
    x = torch.empty(1, 4096, dtype=torch.float16, device="meta")
    compiled = {bits: rebel.compile_from_torch(_stack(bits, 128), example_inputs=[x], npu="RBLN-CA25")
                for bits in (None, 8, 4)}
    n = k = 4096
    scales = n * (k // 128) * 2
    weight_bytes = {bits: c.program.weight_bytes for bits, c in compiled.items()}
    assert weight_bytes == {None: 4 * n * k * 2, 8: 4 * (n * k + scales), 4: 4 * (n * k // 2 + scales)}
    first = {bits: c.program.kernels[1] for bits, c in compiled.items()}  # after the input cast
    moved = {bits: sum(t.nbytes for t in kern.plan.dma_in if t.weight) for bits, kern in first.items()}
    assert moved == {None: n * k * 2, 8: n * k + scales, 4: n * k // 2 + scales}
    times = {bits: kernel_time(kern.plan, spec, "float16", kern.kind) for bits, kern in first.items()}
    assert times[8].first_in_s < times[None].first_in_s and times[4].first_in_s < times[8].first_in_s
    # the matrix work is the FP16 GEMM's; the dequantization overlaps it on the vector units
    assert times[8].compute_s == times[4].compute_s == times[None].compute_s
    assert first[8].plan.vector_ops == first[4].plan.vector_ops == n * k
    latency = {bits: c.predicted_latency_s() for bits, c in compiled.items()}
    assert latency[8] < 0.75 * latency[None] and latency[4] < 0.75 * latency[None]
    # FP16 decode is bound by its weight DMA; quantized, by the GEMV's matrix time
    dma_fp16 = 4 * n * k * 2 / spec.die.dma.task_dma_bandwidth
    assert latency[None] > dma_fp16
    assert min(latency[8], latency[4]) > 4 * times[8].compute_s


def test_meta_llama_with_quantized_linears_compiles():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                         attn_implementation="sdpa")

    class Logits(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            return self.lm(input_ids=ids, use_cache=False).logits

    ids = torch.empty(1, 8, dtype=torch.long, device="meta")
    programs = {}
    for bits in (None, 8, 4):
        with torch.device("meta"):
            lm = LlamaForCausalLM(config).half().eval()
        if bits:
            quantize_linears(lm, bits, 64)
            assert type(lm.lm_head) is nn.Linear
            assert lm.model.layers[0].self_attn.q_proj.qweight.is_meta
        programs[bits] = compile_module(Logits(lm), [ids], progress=False)
    assert all(p.meta for p in programs.values())
    quantized = sum(1 for k in programs[4].program.kernels for o in k.ops if o.target == TARGET)
    assert quantized == 2 * 7  # q, k, v, o, gate, up, down per layer
    w = {bits: p.program.weight_bytes for bits, p in programs.items()}
    assert w[4] < w[8] < w[None]


@pytest.mark.parametrize("bits,group,dies", [(8, None, 2), (4, 64, 2), (4, 32, 2), (4, 128, 4)])
def test_tensor_parallel_splits_quantized_weights(bits, group, dies):
    """up is column parallel (rows of the packed weight and its scales), down row parallel
    (packed columns and scale groups; a per-channel scale stays whole) unless the dies would
    cut its scale groups (256 inputs in groups of 128 over 4 dies): then column parallel."""
    torch.manual_seed(3)
    model = quantize_linears(_Block().eval(), bits, group)
    x = torch.randn(4, 128)
    single = rebel.compile_from_torch(model, example_inputs=[x])
    compiled = rebel.compile_from_torch(model, example_inputs=[x], tensor_parallel_size=dies)
    program = compiled.program
    split = program.sharding.weights
    assert split["up.qweight"] == 0 and split["up.scales"] == 0
    groups = 256 // (group or 256)
    row_parallel = groups == 1 or groups % dies == 0
    assert split["down.qweight"] == (1 if row_parallel else 0)
    assert split.get("down.scales") == (None if groups == 1 else 1 if row_parallel else 0)
    assert program.weight_bytes < single.program.weight_bytes
    got = rebel.Runtime(compiled, device=0).run(x)
    torch.testing.assert_close(got, model(x).detach(), rtol=2e-2, atol=2e-2)
