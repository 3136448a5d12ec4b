"""Shape buckets: one compiled model holds several static input shapes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import rebel
from rebel.compiler.artifact import FORMAT_VERSION


class PositionalMLP(nn.Module):
    """Slices a position table to the sequence length: at compile time the slice folds into a
    constant whose value depends on the bucket's shape (same name, different tensors)."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 16, 8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.fc(x + self.pos[:, : x.shape[1]]))


def _model():
    torch.random.default_generator.manual_seed(0)
    return PositionalMLP().eval()


def _x(seq, seed=0):
    return torch.randn(1, seq, 8, generator=torch.Generator().manual_seed(seed))


def _close(a, b):
    return ((a - b).abs().max() / b.abs().max()).item() < 1e-2


def test_runtime_picks_the_bucket_that_matches():
    model = _model()
    compiled = rebel.compile_from_torch(model, [[_x(4)], [_x(8)], [_x(16)]])
    assert len(compiled.buckets) == 3
    runtime = compiled.create_runtime()
    for seq in (16, 4, 8):
        x = _x(seq, seed=seq)
        assert _close(runtime.run(x), model(x))
        assert runtime.program.inputs[0][1].shape == (1, seq, 8)
    # One copy of the shared weights; the folded slices are per bucket.
    assert sum(1 for n in compiled.compiled.weights if "@bucket" in n) >= 1


def test_no_matching_bucket_is_a_clear_error():
    runtime = rebel.compile_from_torch(_model(), [[_x(4)], [_x(8)]]).create_runtime()
    with pytest.raises(rebel.InputError, match=r"match no compiled shape bucket.*bucket 0.*\[1, 4, 8\].*bucket 1"):
        runtime.run(_x(6))
    with pytest.raises(rebel.InputError):
        runtime.run(_x(4).double())


def test_buckets_survive_save_and_load(tmp_path):
    model = _model()
    path = rebel.compile_from_torch(model, [[_x(4)], [_x(8)]]).save(tmp_path / "b.rbln")
    loaded = rebel.RBLNCompiledModel.load(path)
    assert len(loaded.buckets) == 2 and FORMAT_VERSION == 2
    runtime = rebel.Runtime(path)
    assert _close(runtime.run(_x(8, 3)), model(_x(8, 3)))
    assert _close(runtime.run(_x(4, 3)), model(_x(4, 3)))


def test_memory_counts_shared_weights_once():
    model = _model()
    one = rebel.compile_from_torch(model, [_x(16)])
    two = rebel.compile_from_torch(model, [[_x(8)], [_x(16)]])
    assert two.program.weight_bytes <= one.program.weight_bytes * 2
    assert two.device_memory_bytes() < one.device_memory_bytes() * 2
    assert two.predicted_latency_s(bucket=0) < two.predicted_latency_s(bucket=1)


def test_duplicate_buckets_are_rejected():
    with pytest.raises(rebel.CompileError, match="same input shapes"):
        rebel.compile_from_torch(_model(), [[_x(4)], [_x(4, seed=1)]])


def test_explain_lists_every_bucket():
    report = rebel.explain(rebel.compile_from_torch(_model(), [[_x(4)], [_x(8)]]))
    assert [b.inputs for b in report.buckets] == [["input_1: float32[1, 4, 8]"],
                                                   ["input_1: float32[1, 8, 8]"]]
    assert "bucket 1" in str(report)
