"""Compiler checks on program structure: constant folding, fusion, numerics of small CNNs and
MLPs, GEMM tiles that fit SRAM, and short CompileErrors for models it cannot take."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import rebel
from rebel.npu import load_spec

ATOL = RTOL = 2e-3


def fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def run_and_compare(model: nn.Module, *inputs: torch.Tensor, atol=ATOL, rtol=RTOL):
    model.eval()
    compiled = rebel.compile_from_torch(model, example_inputs=list(inputs))
    out = rebel.Runtime(compiled).run(*inputs)
    with torch.no_grad():
        ref = model(*inputs)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    assert not torch.equal(out, ref)  # 16-bit rounding happened
    return compiled, out


def kernel_ops(compiled) -> list[list[str]]:
    return [[op.target for op in k.ops] for k in compiled.program.kernels]


# --- constant folding ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 16), (2, 3, 16)])
def test_linear_is_one_op_reading_its_weight_as_stored(shape):
    torch.manual_seed(0)
    model = nn.Linear(16, 32)
    x = torch.randn(*shape)
    compiled = rebel.compile_from_torch(model, example_inputs=[x])
    program = compiled.program
    targets = [t for ops in kernel_ops(compiled) for t in ops]
    assert targets == ["aten.linear.default"]
    assert program.host_ops == []
    # The weight is stored as nn.Linear holds it ([out, in], device dtype): no transposed or
    # broadcast copy, whatever the input's rank.
    shapes = sorted(tuple(s.shape) for s in program.weights.values())
    assert shapes == [(32,), (32, 16)]
    (w,) = [w for w in compiled.compiled.weights.values() if w.dim() == 2]
    assert w.dtype == torch.float16 and w.is_contiguous()
    assert torch.equal(w, model.weight.detach().to(torch.float16))
    assert program.weight_bytes == (16 * 32 + 32) * 2
    out = rebel.Runtime(compiled, tensor_type="pt").run(x)
    ref = model(x).detach()
    assert (out - ref).abs().max() < 1e-2 * ref.abs().max()


def _parameter_bytes(model: nn.Module, dtype_bytes: int = 2) -> int:
    return sum(p.numel() for p in model.parameters()) * dtype_bytes


def test_encoder_stores_no_more_than_its_parameters():
    """A 2-layer d=256 encoder (batch 2): its batched linears used to fold into dense
    [batch, in, out] weights (about 8x the parameters); stored bytes now equal the parameters'."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 16, 256)
    compiled = rebel.compile_from_torch(model, example_inputs=[x])
    assert compiled.program.weight_bytes <= _parameter_bytes(model)
    assert compiled.program.weight_bytes >= 0.99 * _parameter_bytes(model)
    out = rebel.Runtime(compiled, tensor_type="pt").run(x)
    with torch.no_grad():
        ref = model(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_tied_embedding_is_stored_once():
    """A tiny Llama with tie_word_embeddings=True: embedding and LM head share one stored table
    (no second, transposed copy of the largest weight)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                         max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 1024, (1, 12))

    class Logits(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    wrapped = Logits(model)
    compiled = rebel.compile_from_torch(wrapped, example_inputs=[ids])
    unique = {id(p): p for p in model.parameters()}.values()  # the tied table counted once
    param_bytes = sum(p.numel() for p in unique) * 2
    # rotary tables (buffers) are small; a second [1024, 64] table would add 128 KiB
    assert compiled.program.weight_bytes <= param_bytes + 16 * 1024
    out = rebel.Runtime(compiled, tensor_type="pt").run(ids)
    with torch.no_grad():
        ref = wrapped(ids)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_folding_never_stores_a_broadcast_weight():
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 64))

        def forward(self, x):
            return x * (self.w * 2).expand(32, 64)

    model = Broadcast()
    x = torch.randn(32, 64)
    compiled = rebel.compile_from_torch(model, example_inputs=[x])
    assert compiled.program.weight_bytes == 64 * 2  # w * 2 folded, the expand kept as an op
    out = rebel.Runtime(compiled, tensor_type="pt").run(x)
    ref = model(x).detach()
    assert (out - ref).abs().max() < 1e-2 * ref.abs().max()


# --- fusion -------------------------------------------------------------------------------------

def test_conv_bias_relu_is_one_kernel():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=True), nn.ReLU())
    compiled, out = run_and_compare(model, torch.randn(2, 3, 16, 16))
    kernels = compiled.program.kernels
    compute = [k for k in kernels if k.kind not in ("cast_in", "cast_out")]
    assert len(compute) == 1
    (conv,) = compute
    assert conv.kind == "conv"
    assert [op.target for op in conv.ops] == ["aten.convolution.default", "aten.relu.default"]
    assert "conv2d" in conv.name and "relu" in conv.name
    # The bias is an argument of the convolution, not a separate add.
    assert conv.ops[0].args[2] is not None
    assert (out >= 0).all()


def test_mlp_with_gelu():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8))
    compiled, _ = run_and_compare(model, torch.randn(4, 32))
    compute = [k for k in compiled.program.kernels if k.kind not in ("cast_in", "cast_out")]
    assert [[op.target for op in k.ops] for k in compute] == [
        ["aten.linear.default", "aten.gelu.default"], ["aten.linear.default"]]
    assert "linear" in compute[0].name and "gelu" in compute[0].name
    assert compiled.program.host_ops == []


def test_tiny_cnn_matches_fp32():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10))
    bn = model[1]
    with torch.no_grad():  # non-trivial running statistics, so eval-mode batchnorm matters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    model.train()  # compile must use eval semantics (running stats) and restore the mode
    compiled = rebel.compile_from_torch(model, example_inputs=[torch.randn(2, 3, 16, 16)])
    assert model.training
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    out = rebel.Runtime(compiled).run(x)
    with torch.no_grad():
        ref = model(x)
    assert out.shape == (2, 10) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert not torch.equal(out, ref)
    program = compiled.program
    assert program.host_ops == [] and len(program.segments) == 1
    kinds = [k.kind for k in program.kernels]
    assert kinds.count("conv") == 2 and "gemm" in kinds and "pool" in kinds
    labels = " ".join(k.name for k in program.kernels)
    assert "batch_norm" in labels and "max_pool2d" in labels and "linear" in labels


# --- errors -------------------------------------------------------------------------------------

class DataDependentBranch(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_unexportable_module_gives_short_compile_error():
    with pytest.raises(rebel.CompileError) as info:
        rebel.compile_from_torch(DataDependentBranch(), example_inputs=[torch.randn(4)])
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert message.startswith("could not capture DataDependentBranch with torch.export")
    assert "[(4,)]" in message


class ScalarRoundTrip(nn.Module):
    def forward(self, x):
        return torch.tensor(x.tolist())


def test_data_dependent_scalars_give_compile_error():
    with pytest.raises(rebel.CompileError, match="Python number"):
        rebel.compile_from_torch(ScalarRoundTrip(), example_inputs=[torch.randn(4)])


@pytest.mark.parametrize("example_inputs, needle", [
    ([1, 2], "example_inputs[0] is a int, expected a torch.Tensor"),
    ([torch.randn(2), "x"], "example_inputs[1] is a str, expected a torch.Tensor"),
    ([], "example_inputs must be a non-empty list of tensors"),
    (None, "example_inputs must be a non-empty list of tensors"),
    ("x", "example_inputs must be a non-empty list of tensors"),
    ({"x": torch.randn(2)}, "example_inputs must be a non-empty list of tensors"),
])
def test_bad_example_inputs(example_inputs, needle):
    with pytest.raises(rebel.CompileError) as info:
        rebel.compile_from_torch(nn.ReLU(), example_inputs=example_inputs)
    assert needle in str(info.value)


def test_single_tensor_example_input_is_accepted():
    compiled = rebel.compile_from_torch(nn.ReLU(), example_inputs=torch.randn(2, 3))
    assert [tuple(s.shape) for _, s in compiled.program.inputs] == [(2, 3)]


def test_not_a_module():
    with pytest.raises(rebel.CompileError, match="expects a torch.nn.Module, got function"):
        rebel.compile_from_torch(lambda x: x, example_inputs=[torch.randn(2)])


def test_unsupported_device_dtype():
    with pytest.raises(rebel.CompileError, match="device_dtype 'float32' is not supported"):
        rebel.compile_from_torch(nn.ReLU(), example_inputs=[torch.randn(2)], device_dtype="float32")


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_bad_tensor_parallel_size(size):
    with pytest.raises(rebel.CompileError, match="tensor_parallel_size must be a positive int"):
        rebel.compile_from_torch(nn.ReLU(), example_inputs=[torch.randn(2)], tensor_parallel_size=size)


def test_unknown_npu():
    with pytest.raises(rebel.SpecError, match="unknown NPU product 'RBLN-XX'"):
        rebel.compile_from_torch(nn.ReLU(), example_inputs=[torch.randn(2)], npu="RBLN-XX")


# --- repr ---------------------------------------------------------------------------------------

class Foo(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(16, 16)
        self.linear2 = nn.Linear(16, 16)

    def forward(self, x):
        return self.linear2(torch.atan(self.linear1(x)))


def test_repr_mentions_npu_and_kernel_counts():
    fused = rebel.compile_from_torch(nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
                                     example_inputs=[torch.randn(16, 16)])
    text = repr(fused)
    assert "npu=RBLN-CA25" in text and "device_dtype=float16" in text
    assert "kernels=3 (1 fused)" in text and "host fallbacks=0" in text and "segments=1" in text
    assert "input_1: float32[16, 16]" in text and "predicted latency=" in text

    fallback = rebel.compile_from_torch(Foo(), example_inputs=[torch.randn(16, 16)], npu="RBLN-CA12")
    text = repr(fallback)
    assert "npu=RBLN-CA12" in text
    assert f"kernels={len(fallback.program.kernels)} (0 fused)" in text
    assert "host fallbacks=1" in text and "segments=3" in text


# --- GEMM tiles fit SRAM ------------------------------------------------------------------------

class Attention(nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _sram_models():
    return {
        "linear-big": (nn.Linear(2048, 2048), [torch.randn(256, 2048)]),
        "linear-gemv": (nn.Linear(4096, 1024), [torch.randn(1, 4096)]),
        "linear-odd": (nn.Linear(100, 300), [torch.randn(7, 100)]),
        "mlp": (nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)),
                [torch.randn(64, 512)]),
        "conv": (nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.ReLU()),
                 [torch.randn(1, 64, 32, 32)]),
        "bmm": (type("BMM", (nn.Module,), {"forward": lambda self, a, b: a @ b})(),
                [torch.randn(4, 128, 256), torch.randn(4, 256, 64)]),
        "attention": (Attention(), [torch.randn(1, 4, 128, 64)] * 3),
    }


@pytest.mark.parametrize("npu", ["RBLN-CA25", "tiny-sram"])
@pytest.mark.parametrize("name", list(_sram_models()))
def test_gemm_tiles_fit_local_sram(name, npu, tmp_path):
    if npu == "tiny-sram":  # a hypothetical die with 0.5 MiB of local SRAM per engine
        path = tmp_path / "tiny.toml"
        path.write_text('base = "RBLN-CA12"\n\n[die.memory]\nlocal_sram_mib = 0.5\n')
        npu = str(path)
    torch.manual_seed(4)
    model, inputs = _sram_models()[name]
    compiled = rebel.compile_from_torch(model, example_inputs=inputs, npu=npu)
    spec = load_spec(npu)
    local = spec.die.memory.local_sram_bytes
    rows, cols = spec.die.compute.mac_array
    gemms = [k for k in compiled.program.kernels if k.plan.gemm is not None]
    assert gemms, "no GEMM kernel planned"
    for k in gemms:
        g = k.plan.gemm
        need = (g.tm * g.tk + g.tk * g.tn) * 2 + g.tm * g.tn * 4
        assert need <= local, f"{k.name}: tile {g} needs {need} bytes > {local} local SRAM"
        assert g.tm % rows == 0 and g.tn % cols == 0 and g.tk % rows == 0, g
        assert g.tm > 0 and g.tn > 0 and g.tk > 0 and g.out_tiles >= 1 and g.k_steps >= 1


def test_gemm_tiles_cover_the_matrix():
    compiled = rebel.compile_from_torch(nn.Linear(1000, 300), example_inputs=[torch.randn(200, 1000)])
    (k,) = [k for k in compiled.program.kernels if k.plan.gemm is not None]
    g = k.plan.gemm
    m, n, kk = 200, 300, 1000
    assert g.out_tiles == -(-m // g.tm) * -(-n // g.tn)
    assert g.k_steps * g.tk >= kk and (g.k_steps - 1) * g.tk < kk
    assert k.plan.flops == 2.0 * m * n * kk


def test_host_ops_read_values_made_in_their_own_segment():
    """A multi-output host op (sort) read by its getitems, and a host op reading another host
    op's result (atan -> sign), in one host segment between device kernels: values made inside
    the segment are not fetched from the device."""
    class HostChain(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(8, 8)

        def forward(self, x):
            values, indices = torch.sort(self.l(x), dim=-1)
            return self.l(torch.atan(values).sign() * values) + indices.float()

    torch.manual_seed(0)
    model = HostChain().eval()
    x = torch.randn(2, 8)
    compiled = rebel.compile_from_torch(model, example_inputs=[x])
    assert "aten.sort.default" in [o.target for o in compiled.program.host_ops]
    with torch.no_grad():
        ref = model(x)
    out = rebel.Runtime(compiled).run(x)
    assert torch.allclose(out, ref, atol=2e-2, rtol=2e-2), (out - ref).abs().max()


class _AddMul(torch.nn.Module):
    def forward(self, a, b):
        return a * 2 + b


@pytest.mark.parametrize("alias", ["same object", "same storage"])
def test_aliased_example_inputs_stay_separate_inputs(alias):
    """`[x, x]` as example inputs: torch.export would trace one value read twice, so a run with
    two different tensors would ignore the second. Each position stays its own input."""
    x = torch.randn(4, 8)
    second = x if alias == "same object" else x.view(4, 8)
    compiled = rebel.compile_from_torch(_AddMul(), example_inputs=[x, second])
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    got = rebel.Runtime(compiled).run(a, b)
    torch.testing.assert_close(got, a * 2 + b, atol=1e-2, rtol=1e-2)
    meta = torch.empty(4, 8, device="meta")
    assert len(rebel.compile_from_torch(_AddMul(), example_inputs=[meta, meta]).program.inputs) == 2
