"""Linear weights packed once per runtime (rebel.device.packed_linear). Wide ones, for oneDNN:
the results match the FP32 reference as the MKL path's do, a row's result does not depend on the
batch it runs in, an untied weight is held packed only, a weight something else reads (a tied
embedding) keeps its plain copy too, and RBLN_PACKED_LINEAR=0 gives back the plain path,
bit-identical to the reference interpreter. Narrower ones, in 16 bits: bit-identical to the
interpreter as they are."""
from __future__ import annotations

import pytest
import torch

import rebel
from rebel.device import packed_linear
from rebel.device.codegen import CompiledBlock
from rebel.runtime.executor import EXECUTOR_ENV

pytestmark = pytest.mark.skipif(not packed_linear.available(), reason="torch without oneDNN")
WIDE = packed_linear.WIDE_OUT_FEATURES


class Head(torch.nn.Module):
    """A norm and a vocabulary-wide projection, optionally tied to an embedding it also reads."""

    def __init__(self, tied: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(WIDE, 32)
        self.norm = torch.nn.LayerNorm(32)
        self.head = torch.nn.Linear(32, WIDE, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.tied = tied

    def forward(self, ids, x):
        h = self.norm(x + self.embed(ids)) if self.tied else self.norm(x)
        return self.head(h)


def _compile(model, batches):
    examples = [[torch.zeros(b, dtype=torch.long), torch.zeros(b, 32)] for b in batches]
    return rebel.compile_from_torch(model.eval(), example_inputs=examples, progress=False)


def _held(runtime):
    return set(runtime._die_weights[0])


def _needs_16_bit():
    if not packed_linear._form((8, 8), torch.float16, 1, 1):
        pytest.skip("no native few-row kernel here")


# A decode-sized reader only: 16-bit. A 64-row reader too, with a weight too large to convert for
# it (the limit lowered to make this head "large"): oneDNN.
FORMS = {packed_linear.SIXTEEN_BIT: ([1, 4], None), packed_linear.ONEDNN: ([1, 4, 64], 0)}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("tied", [False, True])
def test_wide_head_runs_packed_and_matches_the_reference(tied, form, monkeypatch):
    monkeypatch.delenv(packed_linear.ENV, raising=False)
    batches, limit = FORMS[form]
    if form == packed_linear.SIXTEEN_BIT:
        _needs_16_bit()
    else:
        monkeypatch.setattr(packed_linear, "NARROW_MAX_ELEMENTS", limit)
    torch.manual_seed(0)
    model = Head(tied)
    runtime = rebel.Runtime(_compile(model, batches), tensor_type="pt")
    name = next(n for n in runtime.program.weights if "weight" in n and
                tuple(runtime.program.weights[n].shape) == (WIDE, 32))
    held = _held(runtime)
    assert name + packed_linear.SUFFIX in held
    assert runtime._die_weights[0][name + packed_linear.SUFFIX].is_mkldnn == (form == packed_linear.ONEDNN)
    # the embedding's lookup reads the plain copy, or the 16-bit one
    assert (name in held) == (tied and form == packed_linear.ONEDNN)
    source = "".join(w.source for _, work in runtime._segments for w in work
                     if isinstance(w, CompiledBlock))
    assert f"env[{name + packed_linear.SUFFIX!r}]" in source

    ids, x = torch.randint(0, WIDE, (4,)), torch.randn(4, 32)
    out = runtime.run(ids, x)
    with torch.no_grad():
        ref = model(ids, x)
    assert out.shape == (4, WIDE)
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    # Each row gives the same logits alone as in the batch of 4 (the batch-1 graph runs it).
    for row in range(4):
        assert torch.equal(runtime.run(ids[row:row + 1], x[row:row + 1])[0], out[row])


@pytest.mark.parametrize("tied", [False, True])
def test_packing_off_is_the_interpreters_result(tied, monkeypatch):
    torch.manual_seed(1)
    model = Head(tied)
    compiled = _compile(model, [4, 64])
    ids, x = torch.randint(0, WIDE, (4,)), torch.randn(4, 32)
    monkeypatch.setenv(packed_linear.ENV, "0")
    plain = rebel.Runtime(compiled, tensor_type="pt")
    assert not any(n.endswith(packed_linear.SUFFIX) for n in _held(plain))
    monkeypatch.setenv(EXECUTOR_ENV, "interpret")
    reference = rebel.Runtime(compiled, tensor_type="pt")
    monkeypatch.delenv(packed_linear.ENV)
    monkeypatch.setenv(EXECUTOR_ENV, "generated")
    monkeypatch.setattr(packed_linear, "NARROW_MAX_ELEMENTS", 0)
    onednn = rebel.Runtime(compiled, tensor_type="pt")
    a, b, c = plain.run(ids, x), reference.run(ids, x), onednn.run(ids, x)
    assert torch.equal(a, b)
    # oneDNN: another FP32 summation order, so a few 16-bit results are a step or so apart.
    assert (c - b).abs().max() <= 2e-3 * b.abs().max()
    assert (c != b).float().mean() < 0.02
    if packed_linear._form((8, 8), torch.float16, 1, 1):  # 16-bit: the interpreter's result exactly
        monkeypatch.undo()
        assert torch.equal(rebel.Runtime(compiled, tensor_type="pt").run(ids, x), b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_narrow_linears_are_held_in_16_bits_and_give_the_interpreters_result(dtype, monkeypatch):
    """Narrower weights are held in the device's 16-bit format only (half the bytes) and give the
    interpreter's float32-weight result bit for bit, decode-sized batches and larger ones alike."""
    _needs_16_bit()
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(32, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 8)).eval()
    compiled = rebel.compile_from_torch(model, example_inputs=[[torch.randn(b, 32)] for b in (1, 4, 8, 9, 64)],
                                        device_dtype=str(dtype).removeprefix("torch."), progress=False)
    packed = rebel.Runtime(compiled, tensor_type="pt")
    held = packed._die_weights[0]
    names = [n for n in compiled.program.weights if len(compiled.program.weights[n].shape) == 2]
    assert len(names) == 2
    for name in names:
        assert name not in held and held[name + packed_linear.SUFFIX].dtype == dtype
        # the compiled model's own 16-bit tensor: no FP32 copy was made on the way
        assert held[name + packed_linear.SUFFIX].data_ptr() == compiled.compiled.weights[name].data_ptr()
    monkeypatch.setenv(EXECUTOR_ENV, "interpret")
    reference = rebel.Runtime(compiled, tensor_type="pt")
    for batch in (1, 4, 8, 9, 64):
        x = torch.randn(batch, 32)
        out = packed.run(x)
        assert torch.equal(out, reference.run(x))
        with torch.no_grad():
            ref = model(x)
        assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_weights_read_only_by_many_rows_or_too_large_stay_fp32(monkeypatch):
    """16-bit storage needs a decode-sized reader (a many-row product would convert the weight
    back each time) and a weight small enough for that conversion to be cheap."""
    _needs_16_bit()
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    many = rebel.compile_from_torch(model, example_inputs=[torch.randn(64, 32)], progress=False)
    assert not any(n.endswith(packed_linear.SUFFIX) for n in _held(rebel.Runtime(many)))
    both = rebel.compile_from_torch(model, example_inputs=[[torch.randn(2, 32)], [torch.randn(64, 32)]],
                                    progress=False)
    assert sum(n.endswith(packed_linear.SUFFIX) for n in _held(rebel.Runtime(both))) == 2
    monkeypatch.setattr(packed_linear, "NARROW_MAX_ELEMENTS", 32 * 64 - 1)  # the first one is too large now
    assert sum(n.endswith(packed_linear.SUFFIX) for n in _held(rebel.Runtime(both))) == 1
    few = rebel.compile_from_torch(model, example_inputs=[torch.randn(2, 32)], progress=False)
    assert sum(n.endswith(packed_linear.SUFFIX) for n in _held(rebel.Runtime(few))) == 2  # never converted
