"""The `fusion=False` compile option, and how collectives scale with the number of dies.

Fusion off is the eager baseline (one kernel per op); fusion should only ever remove launches
and DRAM round trips, so the fused program must never be predicted slower than the unfused one,
and both must still compute the module's FP32 result within 16-bit tolerance.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import rebel
from rebel.device.events import LINK
from rebel.errors import CompileError
from rebel.npu import load_spec
from rebel.device.engine import EventEngine
from rebel.runtime.timeline import build_steps


class MLP(nn.Module):
    """Linear -> GELU -> Linear: GELU (and the biases) fuse into the GEMM kernels when on."""

    def __init__(self, width=256):
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))


class NormLinear(nn.Module):
    """LayerNorm then Linear, with a residual add: a norm kernel and a GEMM with an epilogue."""

    def __init__(self, width=256):
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x):
        return x + self.proj(self.norm(x))


def encoder_layer():
    return nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=256, dropout=0.0,
                                      batch_first=True).eval()


MODULES = {
    "mlp_gelu": (lambda: MLP(), (8, 256)),
    "layernorm_linear": (lambda: NormLinear(), (8, 256)),
    "encoder_layer": (encoder_layer, (2, 16, 128)),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_fusion_off_is_never_faster_and_keeps_numerics(name):
    build, shape = MODULES[name]
    torch.manual_seed(0)
    module = build().eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = module(x)
    fused = rebel.compile_from_torch(module, example_inputs=[x])
    unfused = rebel.compile_from_torch(module, example_inputs=[x], fusion=False)

    assert len(unfused.program.kernels) >= len(fused.program.kernels)
    assert len(unfused.program.kernels) > len(fused.program.kernels), \
        "each module has something to fuse (a bias, GELU, the residual add)"
    # Every unfused kernel computes at most one op (views are free and ride along).
    assert all(len([o for o in k.ops if o.kind != "alias"]) <= 1 for k in unfused.program.kernels)
    assert unfused.predicted_latency_s() >= fused.predicted_latency_s()

    runs = {}
    for label, compiled in (("fused", fused), ("unfused", unfused)):
        runtime = rebel.Runtime(compiled)
        runs[label] = runtime.run(x)
        # The runtime's own prediction agrees with the compiled model's.
        assert runtime.last_report.latency_s == pytest.approx(compiled.predicted_latency_s(), rel=1e-6)
        torch.testing.assert_close(runs[label].float(), expected, rtol=2e-2, atol=2e-2)
    assert runs["unfused"].dtype == runs["fused"].dtype


def test_fusion_off_survives_save_and_load(tmp_path):
    """The kernels are part of the program, so nothing extra needs recording for a reload."""
    x = torch.randn(8, 256)
    unfused = rebel.compile_from_torch(MLP(), example_inputs=[x], fusion=False)
    path = tmp_path / "unfused.rbln"
    unfused.save(path)
    runtime = rebel.Runtime(str(path))
    torch.testing.assert_close(runtime.run(x), rebel.Runtime(unfused).run(x), rtol=0, atol=0)
    assert runtime.last_report.latency_s == pytest.approx(unfused.predicted_latency_s())


@pytest.mark.parametrize("fusion", [None, 0, "no"])
def test_fusion_must_be_a_bool(fusion):
    with pytest.raises(CompileError, match="fusion"):
        rebel.compile_from_torch(MLP(), example_inputs=[torch.randn(8, 256)], fusion=fusion)


class TPStack(nn.Module):
    """Two row-parallel blocks: tensor parallelism all-reduces each block's output."""

    def __init__(self, width=512):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def ring_all_reduce_s(nbytes: int, parties: int, alpha: float, bandwidth: float) -> float:
    """The ring model written out independently of the code under test: 2(p-1)(alpha + S/(pB))."""
    return 2 * (parties - 1) * (alpha + nbytes / (parties * bandwidth))


def test_collective_time_grows_with_dies_by_the_ring_model():
    """Compile the same model for 2, 4 and 8 dies and read the link events of its prediction.

    2(p-1)(alpha + S/(pB)) = 2(p-1)alpha + 2(S/B)(p-1)/p: both terms grow with p, so at a fixed S
    every collective must take strictly longer on more dies, whatever alpha and B are."""
    spec = load_spec("RBLN-CA25")
    link = spec.links.die_to_die
    x = torch.randn(64, 512)
    per_dies = {}
    for parties in (2, 4, 8):
        compiled = rebel.compile_from_torch(TPStack(), example_inputs=[x], npu="RBLN-CA25",
                                            tensor_parallel_size=parties)
        # The dies of a tensor-parallel run time their collectives as one group over the link.
        engine = EventEngine(spec, 0, group=tuple(range(parties)))
        events = [e for e in engine.run(build_steps(compiled.program, spec)).events
                  if e.track == LINK]
        device0 = [e for e in events if e.device == 0]
        assert any(e.args["op"] == "all_reduce" for e in device0), \
            f"tensor parallelism over {parties} dies should all-reduce"
        for e in events:
            assert e.args["dies"] == parties
            if e.args["op"] == "all_reduce":
                assert e.dur_s == pytest.approx(
                    ring_all_reduce_s(e.args["bytes"], parties, link.alpha_s, link.bandwidth))
        per_dies[parties] = [(e.args["op"], e.args["bytes"], e.dur_s) for e in device0]
    # Same collectives of the same full-tensor sizes S at every p, each slower on more dies.
    assert [(op, b) for op, b, _ in per_dies[2]] == [(op, b) for op, b, _ in per_dies[4]] \
        == [(op, b) for op, b, _ in per_dies[8]]
    for two, four, eight in zip(per_dies[2], per_dies[4], per_dies[8]):
        assert two[2] < four[2] < eight[2]
