"""The generated-code executor against the reference interpreter: bit-identical outputs
(torch.equal) on an MLP, a transformer encoder block, tensor parallelism and a tiny LLM's
prefill and decode; the native in-place rounder against torch's casts; views of rounded values
are not rounded again."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import rebel
from rebel.device import epilogues, rounding, tail_fusion
from rebel.device.codegen import CompiledBlock
from rebel.runtime.executor import EXECUTOR_ENV, bind_segments


def _both(compiled, monkeypatch):
    """Runtimes of one compiled model under the interpreter and the generated code."""
    monkeypatch.setenv(EXECUTOR_ENV, "interpret")
    old = rebel.Runtime(compiled, tensor_type="pt")
    monkeypatch.setenv(EXECUTOR_ENV, "generated")
    new = rebel.Runtime(compiled, tensor_type="pt")
    assert isinstance(new._segments[0][1][0], CompiledBlock)
    assert not isinstance(old._segments[0][1][0], CompiledBlock)
    return old, new


def _encoder():
    return torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, activation="gelu",
                                            dropout=0.0).eval()


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                               torch.nn.SiLU(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))


def _cnn():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8, affine=False), torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 10)).eval()
    for bn in (model[1], model[5]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("make, shape", [(_mlp, (4, 32)), (_encoder, (2, 12, 64)), (_cnn, (2, 3, 16, 16))])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_generated_equals_interpreter(make, shape, dtype, monkeypatch):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(*shape)
    compiled = rebel.compile_from_torch(model, example_inputs=[x], device_dtype=dtype)
    old, new = _both(compiled, monkeypatch)
    x_copy = x.clone()
    for seed in range(3):
        xi = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3
        a, b = old.run(xi), new.run(xi)
        assert torch.equal(a, b)
    with torch.no_grad():
        ref = model(x)
    out = new.run(x)
    assert torch.equal(x, x_copy)  # the caller's tensor is never rounded in place
    assert (out - ref).abs().max() < 0.02 * ref.abs().max() + 1e-2


def test_tensor_parallel_generated_equals_interpreter(monkeypatch):
    torch.manual_seed(1)
    model = _encoder()
    x = torch.randn(2, 8, 64)
    compiled = rebel.compile_from_torch(model, example_inputs=[x], tensor_parallel_size=2)
    old, new = _both(compiled, monkeypatch)
    assert torch.equal(old.run(x), new.run(x))


def test_tiny_llm_prefill_and_decode_bit_identical(tmp_path, monkeypatch):
    from optimum.rbln import RBLNLlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                         max_position_embeddings=256, tie_word_embeddings=True)
    hf = AutoModelForCausalLM.from_config(config).eval()
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(tmp_path / "hf")
    options = dict(rbln_batch_size=2, rbln_max_seq_len=64, rbln_kvcache_partition_len=32,
                   rbln_prefill_chunk_size=16, rbln_decoder_batch_sizes=[2])
    monkeypatch.setenv(EXECUTOR_ENV, "interpret")
    compiled = RBLNLlamaForCausalLM.from_pretrained(tmp_path / "hf", export=True, **options)
    folder = compiled.save_pretrained(tmp_path / "rbln")
    monkeypatch.setenv(EXECUTOR_ENV, "generated")
    generated = RBLNLlamaForCausalLM.from_pretrained(folder, export=False)
    tokens = torch.randint(1, 256, (30,), generator=torch.Generator().manual_seed(3))
    logits = []
    for model in (compiled, generated):
        session = model.start_session([tokens[:20]])
        steps = [session.prefill()[0]]
        for t in tokens[20:26]:
            steps.append(session.step(torch.tensor([t]), [0])[0])
        session.close()  # an open session holds its KV-cache slot; generate() below needs both
        logits.append(torch.stack(steps))
    assert torch.equal(logits[0], logits[1])
    ids = tokens[:18].view(1, -1).repeat(2, 1)
    assert torch.equal(compiled.generate(ids, max_new_tokens=8), generated.generate(ids, max_new_tokens=8))
    with torch.no_grad():
        ref = hf(tokens[:26].unsqueeze(0)).logits[0, 19:26]
    assert (logits[1] - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("make", [lambda dtype: rounding.round_, rounding.rounder], ids=["round_", "rounder"])
def test_native_rounding_matches_torch_casts(dtype, make):
    """`round_` and the per-dtype rounder the generated executor binds (`rounder`) agree with
    torch's casts bit for bit, and refuse what cannot be rounded in place."""
    round_ = make(dtype)
    x = torch.randn(10_007) * torch.logspace(-12, 12, 10_007)
    x[::101] = float("inf")
    x[::103] = -float("inf")
    x[:6] = torch.tensor([0.0, -0.0, 65519.99, 65520.0, 5.96e-8, 2.98e-8])
    expected = x.to(dtype).to(torch.float32)
    y = x.clone()
    assert round_(y, dtype)
    assert torch.equal(y.view(torch.int32), expected.view(torch.int32))  # bit for bit, signed zeros too
    z = x[:10_000].clone().view(100, 100).t()  # non-contiguous, no shared elements
    assert round_(z, dtype) and torch.equal(z, expected[:10_000].view(100, 100).t())
    assert not round_(torch.ones(3, 1).expand(3, 4), dtype)  # shared elements: a copy
    assert not round_(torch.ones(3, dtype=torch.float16), dtype)
    ints = torch.arange(5)
    assert round_(ints, dtype) and torch.equal(ints, torch.arange(5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_rounding_on_openmp_threads_matches_torch_casts(dtype, threads):
    """Buffers above the parallel grain round on torch's OpenMP threads, each its own run of the
    buffer (whose length here is no multiple of the split): the same bits at any thread count,
    in place and as a copy."""
    lib = rounding.native()
    if lib is None or (dtype is torch.float16 and not lib.rbln_has_f16c()):
        pytest.skip("no native rounder here")
    x = torch.randn(100_003) * torch.logspace(-10, 10, 100_003)
    x[::997] = float("nan")
    expected = x.to(dtype).to(torch.float32)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = x.clone()
        assert rounding.rounder(dtype)(y, dtype)
        copy = rounding.round_copier(dtype)(x, dtype)
    finally:
        torch.set_num_threads(saved)
    nan = expected.isnan()  # NaN payloads differ between torch's own scalar and vector casts
    for got in (y, copy):
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int32), expected[~nan].view(torch.int32))
    assert not torch.equal(x[~nan], expected[~nan])  # the copy left its input alone


def test_native_rounder_shares_torchs_openmp_runtime():
    """Loaded after torch, the rounder binds to torch's libgomp: one OpenMP runtime, one pool of
    threads (two runtimes would each keep a spinning thread per core)."""
    if rounding.native() is None:
        pytest.skip("no native rounder here")
    with open("/proc/self/maps") as f:  # by soname (wheels may bundle renamed copies of their own)
        runtimes = {path for line in f if os.path.basename(path := line.split()[-1]).startswith("libgomp.so")}
    assert runtimes == {os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")}, runtimes


def test_views_of_rounded_values_are_not_rounded(monkeypatch):
    """A kernel that only views what it receives (layout only) emits no rounding at all."""
    class Layout(torch.nn.Module):
        def forward(self, x):
            y = torch.sigmoid(x)
            return y, y.t().reshape(-1)  # the second output moves rounded values only

    x = torch.randn(4, 6)
    compiled = rebel.compile_from_torch(Layout(), example_inputs=[x], fusion=False)
    monkeypatch.setenv(EXECUTOR_ENV, "generated")
    blocks = [w for _, work in bind_segments(compiled.program) for w in work
              if isinstance(w, CompiledBlock)]
    source = "\n".join(b.source for b in blocks)
    relu_lines = [line for line in source.splitlines() if "R(" in line]
    assert len(relu_lines) == 1, source  # only sigmoid's fresh output is rounded (in place)
    a, b = rebel.Runtime(compiled, tensor_type="pt").run(x)
    assert torch.equal(b, a.t().reshape(-1))


def _globals(compiled):
    for _, work in bind_segments(compiled.program, "generated"):
        for block in work:
            if isinstance(block, CompiledBlock):
                yield from block.fn.__globals__.values()


def _in_place_calls(compiled) -> list[str]:
    """Names of the in-place ops the generated blocks of `compiled` call."""
    ops = (("gelu_", epilogues.gelu_), ("add_", torch.ops.aten.add_.Tensor._op),
           ("mul_", torch.ops.aten.mul_.Tensor._op), ("mul_", torch.ops.aten.mul_.Scalar._op))
    return sorted(name for value in _globals(compiled) for name, op in ops if value is op)


class _GeluScaleResidual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)) * 2.0) + x


def test_dead_operands_are_written_in_place(monkeypatch):
    """GELU, the scaling and the residual add write over the values that die there (as eager's
    `gelu_` after `addmm`), with results equal to the interpreter's bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 64)
    compiled = rebel.compile_from_torch(_GeluScaleResidual().eval(), example_inputs=[x])
    assert _in_place_calls(compiled) == ["add_", "gelu_", "mul_"]
    old, new = _both(compiled, monkeypatch)
    for seed in range(3):
        xi = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(old.run(xi), new.run(xi))


def test_encoder_kernel_tails_round_in_their_own_pass(monkeypatch):
    """The encoder's linears (with their bias, one with its GELU) and its residual norms end
    their kernels as fused tails that round themselves (tail_fusion): no in-place op and no
    separate rounding is left for them; only attention's output is rounded apart."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 64)
    compiled = rebel.compile_from_torch(_encoder(), example_inputs=[x])
    fused = sorted(name for value in _globals(compiled) for name, fn in tail_fusion.FUSED.items()
                   if value is fn)
    assert fused == ["rbln_tail.layer_norm", "rbln_tail.linear", "rbln_tail.linear_gelu"]
    sources = [b.source for _, work in bind_segments(compiled.program, "generated")
               for b in work if isinstance(b, CompiledBlock)]
    assert sum(src.count(" = R(") for src in sources) == 1
    assert _in_place_calls(compiled) == []
    old, new = _both(compiled, monkeypatch)
    xi = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(5)) * 4
    assert torch.equal(old.run(xi), new.run(xi))


def test_in_place_never_writes_what_others_see(monkeypatch):
    """Operands that are views of inputs or weights, values read twice, and elided clones of
    views stay untouched: no in-place op, and weights, inputs and outputs as the interpreter's."""
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(6, 4))

        def forward(self, x):
            a = torch.nn.functional.gelu(x.t().clone())     # an elided clone of a view of x
            b = torch.sigmoid(x) * 2.0
            return a, b + b.exp(), torch.relu(self.w.t() + 0.0), torch.add(x, self.w.t())

    x = torch.randn(4, 6)
    compiled = rebel.compile_from_torch(Shared(), example_inputs=[x])
    old, new = _both(compiled, monkeypatch)
    weights = {k: v.clone() for k, v in new._die_weights[0].items()}
    x_copy = x.clone()
    for _ in range(2):
        for a, b in zip(old.run(x), new.run(x)):
            assert torch.equal(a, b)
    assert torch.equal(x, x_copy)
    assert all(torch.equal(v, new._die_weights[0][k]) for k, v in weights.items())


def test_unknown_executor_mode_is_refused(monkeypatch):
    compiled = rebel.compile_from_torch(torch.nn.Linear(4, 4), example_inputs=[torch.randn(2, 4)])
    monkeypatch.setenv(EXECUTOR_ENV, "fast")
    with pytest.raises(ValueError, match="RBLN_EXECUTOR"):
        rebel.Runtime(compiled)
