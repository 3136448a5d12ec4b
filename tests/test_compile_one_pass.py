"""One-pass capture (rebel.compiler.one_pass) against the two-pass path it replaces.

For each module the IR graph from one trace must equal the one from export + run_decompositions
exactly (op names, targets, arguments, labels, output specs, weight names, order and values),
and the compiled programs must run to bit-identical outputs. The modules cover what differs
between the two paths: tied weights, constants (`lift_fresh_copy`), buffers, `torch.no_grad()`,
`torch.autocast` and `.float()` labels.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import rebel
from rebel.compiler import capture as capture_mod
from rebel.compiler import one_pass
from rebel.ir import encode
from zoo.models import ZOO


def _graph_key(graph) -> dict:
    """Everything a Graph holds, as plain data (weights by name, order, dtype and shape; their
    values are compared separately with torch.equal)."""
    return {"inputs": graph.inputs,
            "weights": [(name, tuple(t.shape), t.dtype) for name, t in graph.weights.items()],
            "ops": [op.to_json() for op in graph.ops], "outputs": encode(graph.outputs),
            "out_spec": graph.out_spec, "updates": graph.buffer_updates,
            "mutable": sorted(graph.mutable_buffers), "static": sorted(graph.static_buffers)}


def _both(module: nn.Module, inputs: list[torch.Tensor]):
    module.eval()
    table = capture_mod._decompositions()
    one = capture_mod._lower(one_pass.export_decomposed(module, tuple(inputs), table))
    two = capture_mod._lower(capture_mod._export_two_pass(module, tuple(inputs)))
    return one, two


def assert_same_graph(module: nn.Module, inputs: list[torch.Tensor]):
    one, two = _both(module, inputs)
    key_one, key_two = _graph_key(one), _graph_key(two)
    for field in key_two:
        assert key_one[field] == key_two[field], field
    for name, tensor in two.weights.items():
        assert torch.equal(one.weights[name], tensor), name
    return one


def assert_same_outputs(module: nn.Module, inputs: list[torch.Tensor], monkeypatch):
    module.eval()
    outs, programs, traced = [], [], []

    def spy(*args, **kwargs):  # the one-pass compile must not have fallen back
        ep = one_pass.export_decomposed(*args, **kwargs)
        traced.append(1)
        return ep

    monkeypatch.setattr(capture_mod, "export_decomposed", spy)
    for flag in ("1", "0"):
        monkeypatch.setenv(capture_mod.ONE_PASS_ENV, flag)
        compiled = rebel.compile_from_torch(module, example_inputs=inputs)
        programs.append([p.to_json() for p in compiled.buckets])
        outs.append(rebel.Runtime(compiled).run(*inputs))
    assert traced == [1]
    assert programs[0] == programs[1]
    flat = [torch.utils._pytree.tree_leaves(o) for o in outs]
    assert len(flat[0]) == len(flat[1]) > 0
    for a, b in zip(*flat):
        assert torch.equal(a, b)


class Tied(nn.Module):
    """One weight under two names, the second module's name last (as an LM head tied to its
    embedding): two-pass reads both uses through `head.weight`."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.proj(self.embed(ids))))


class NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        with torch.no_grad():
            y = self.a(x).sin()
        return self.b(x) + y + torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])


class Autocast(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.a(x) @ x.t()
        with torch.autocast("cpu", enabled=False):
            z = x.float().cos()
        return y.float() + z.sum() + x.half().float().sum()


class Cnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

    def forward(self, x):
        return self.body(x)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x)


class TinyLlama(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, tie_word_embeddings=True)
        self.model = LlamaForCausalLM(config)

    def forward(self, ids):
        return self.model(input_ids=ids, use_cache=False).logits


def _mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))


CASES = {
    "mlp": (_mlp, lambda: [torch.randn(2, 16)]),
    "cnn_bn": (Cnn, lambda: [torch.randn(2, 3, 8, 8)]),
    "encoder": (Encoder, lambda: [torch.randn(2, 5, 32)]),
    "llama": (TinyLlama, lambda: [torch.randint(0, 128, (1, 8))]),
    "tied": (Tied, lambda: [torch.randint(0, 32, (2, 5))]),
    "no_grad": (NoGrad, lambda: [torch.randn(4, 8)]),
    "autocast": (Autocast, lambda: [torch.randn(4, 8)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_pass_graph_equals_two_pass(case):
    torch.manual_seed(0)
    make, inputs = CASES[case]
    assert_same_graph(make(), inputs())


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_pass_compiles_to_bit_identical_outputs(case, monkeypatch):
    torch.manual_seed(0)
    make, inputs = CASES[case]
    assert_same_outputs(make(), inputs(), monkeypatch)


def test_labels_of_regions_and_conversions_are_the_two_pass_ones():
    """Not only equal, but the labels that make these cases hard are there (a region label on
    the ops in the no_grad / autocast blocks, `float` for `.float()`, `clone` for constants)."""
    labels = {op.name: op.label for op in assert_same_graph(NoGrad(), [torch.randn(4, 8)]).ops}
    assert labels["linear"] == one_pass.GRAD_LABEL[0] and labels["linear_1"] == "linear"
    graph = assert_same_graph(NoGrad(), [torch.randn(4, 8)])
    assert [op.target for op in graph.ops].count("aten.clone.default") == 1
    autocast = assert_same_graph(Autocast(), [torch.randn(4, 8)])
    assert one_pass.AUTOCAST_LABEL[0] in {op.label for op in autocast.ops}
    assert "float" in {op.label for op in autocast.ops}


def test_tied_weight_is_read_through_its_last_name():
    graph = assert_same_graph(Tied(), [torch.randint(0, 32, (2, 5))])
    refs = {r for op in graph.ops for r in op.refs}
    assert "head.weight" in refs and "embed.weight" not in refs


def test_grad_enabled_region_under_ambient_no_grad():
    """Which blocks are regions depends on the caller's grad mode (two-pass wraps the blocks
    whose mode differs from it): compiled under torch.no_grad(), enable_grad is the region."""
    class EnableGrad(nn.Module):
        def forward(self, x):
            with torch.enable_grad():
                y = x.exp()
            with torch.no_grad():
                z = y.sin()
            return z + 1

    with torch.no_grad():
        graph = assert_same_graph(EnableGrad(), [torch.randn(3)])
    labels = [op.label for op in graph.ops]
    assert labels[0] == one_pass.GRAD_LABEL[0] and one_pass.GRAD_LABEL[0] not in labels[1:]


def test_buffers_and_constants_keep_two_pass_order():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(4)
            self.register_buffer("offset", torch.arange(4.0))
            self.table = torch.linspace(0, 1, 4)  # a plain tensor attribute: a constant

        def forward(self, x):
            return self.norm(x) + self.offset * self.table

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.inner = Inner()
            self.register_buffer("scale", torch.full((4,), 2.0))
            self.register_buffer("shift", torch.ones(4), persistent=False)
            self.last = nn.Linear(4, 4)

        def forward(self, x):
            y = self.inner(self.first(x)) * self.scale + self.shift + torch.tensor([0.5])
            return self.last(y) + torch.tensor([1.5])

    graph = assert_same_graph(Mixed(), [torch.randn(3, 4)])
    names = list(graph.weights)
    assert len(names) >= 12 and any("table" in n for n in names)


def test_fallback_to_two_pass_when_one_pass_fails(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("one pass broke")

    monkeypatch.setattr(capture_mod, "export_decomposed", broken)
    model = _mlp().eval()
    x = torch.randn(2, 16)
    out = rebel.Runtime(rebel.compile_from_torch(model, example_inputs=[x])).run(x)
    assert calls == [1]
    torch.testing.assert_close(out, model(x).detach(), atol=2e-2, rtol=2e-2)


def test_env_var_forces_two_pass(monkeypatch):
    calls = []
    monkeypatch.setattr(capture_mod, "export_decomposed",
                        lambda *a, **k: calls.append(1) or one_pass.export_decomposed(*a, **k))
    model, x = _mlp(), torch.randn(2, 16)
    monkeypatch.setenv(capture_mod.ONE_PASS_ENV, "0")
    rebel.compile_from_torch(model, example_inputs=[x])
    assert calls == []
    monkeypatch.setenv(capture_mod.ONE_PASS_ENV, "1")
    rebel.compile_from_torch(model, example_inputs=[x])
    assert calls == [1]


def test_hooks_are_removed_after_capture():
    """The trace patches torch internals and hooks the module; none of that outlives it, even
    when the trace fails."""
    from torch.autograd import grad_mode
    before = grad_mode.no_grad.__dict__["__enter__"]

    class Fails(nn.Module):
        def forward(self, x):
            raise ValueError("model error")

    model = Fails()
    with pytest.raises(ValueError):
        one_pass.export_decomposed(model, (torch.randn(2),), capture_mod._decompositions())
    assert grad_mode.no_grad.__dict__["__enter__"] is before
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert one_pass._recorder() is None
    assert torch.fx.config.do_not_emit_stack_traces is False


def test_grad_mode_set_directly_is_refused_and_falls_back(monkeypatch):
    """A region one pass cannot see raises there, and capture compiles it in two passes."""
    class Direct(nn.Module):
        def forward(self, x):
            torch._C._set_grad_enabled(False)
            y = x.exp()
            torch._C._set_grad_enabled(True)
            return y + 1

    x = torch.randn(4)
    with pytest.raises(RuntimeError, match="grad mode"):
        one_pass.export_decomposed(Direct(), (x,), capture_mod._decompositions())
    out = rebel.Runtime(rebel.compile_from_torch(Direct(), example_inputs=[x])).run(x)
    torch.testing.assert_close(out, x.exp() + 1, atol=1e-2, rtol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("entry", [pytest.param(z, id=z.name) for z in ZOO])
def test_zoo_graph_one_pass_equals_two_pass(entry):
    """The 23 architectures of the model zoo (transformers and diffusers) capture to the same
    graph either way."""
    torch.random.default_generator.manual_seed(0)
    model, inputs = entry.build()
    assert_same_graph(model, capture_mod._unaliased(list(inputs), {}))
