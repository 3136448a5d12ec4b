"""Tensor parallelism: TP=2 and TP=4 match TP=1 within 16-bit tolerance, weights split over dies,
collectives where Megatron puts them, and the runtime on several devices."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rebel
from rebel.compiler.tensor_parallel import ALL_GATHER, ALL_REDUCE
from rebel.device.events import LINK
from rebel.device.memory import device_memory
from rebel.runtime.timeline import predict


class Block(torch.nn.Module):
    """A small Llama-style decoder block: RMSNorm, GQA attention over a KV cache, SwiGLU MLP."""

    def __init__(self, hidden=128, heads=8, kv_heads=4, inter=256):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, hidden // heads
        self.q = torch.nn.Linear(hidden, hidden, bias=True)
        self.k = torch.nn.Linear(hidden, kv_heads * self.d, bias=False)
        self.v = torch.nn.Linear(hidden, kv_heads * self.d, bias=False)
        self.o = torch.nn.Linear(hidden, hidden, bias=True)
        self.gate = torch.nn.Linear(hidden, inter, bias=False)
        self.up = torch.nn.Linear(hidden, inter, bias=False)
        self.down = torch.nn.Linear(inter, hidden, bias=False)
        self.n1, self.n2 = torch.nn.RMSNorm(hidden), torch.nn.RMSNorm(hidden)

    def forward(self, x, k_cache, v_cache):
        b, s, _ = x.shape
        h = self.n1(x)
        q = self.q(h).view(b, s, self.h, self.d).transpose(1, 2)
        k = torch.cat([k_cache, self.k(h).view(b, s, self.kv, self.d).transpose(1, 2)], 2)
        v = torch.cat([v_cache, self.v(h).view(b, s, self.kv, self.d).transpose(1, 2)], 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=s > 1, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        return x + self.down(F.silu(self.gate(self.n2(x))) * self.up(self.n2(x)))


@pytest.fixture(scope="module")
def block():
    torch.manual_seed(0)
    return Block().eval()


def inputs(seq=4, ctx=16):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(1, seq, 128, generator=g), torch.randn(1, 4, ctx, 16, generator=g),
            torch.randn(1, 4, ctx, 16, generator=g)]


@pytest.mark.parametrize("seq", [1, 4])
def test_tp2_and_tp4_match_tp1(block, seq):
    xs = inputs(seq)
    with torch.no_grad():
        reference = block(*xs)
    outputs = {}
    for tp in (1, 2, 4):
        compiled = rebel.compile_from_torch(block, example_inputs=xs, tensor_parallel_size=tp)
        outputs[tp] = rebel.Runtime(compiled).run(*xs)
    scale = reference.abs().max().item()
    for tp in (1, 2, 4):
        assert (outputs[tp] - reference).abs().max().item() < 1e-2 * scale
    for tp in (2, 4):
        assert (outputs[tp] - outputs[1]).abs().max().item() < 5e-3 * scale


def test_megatron_layout(block):
    compiled = rebel.compile_from_torch(block, example_inputs=inputs(), tensor_parallel_size=4)
    p = compiled.program
    split = p.sharding.weights
    # Weights are stored as nn.Linear holds them, [out, in]: q/k/v/gate/up column parallel
    # (split output features, dim 0, with the q bias), o/down row parallel (split inputs, dim 1)
    assert {n: split.get(f"{n}.weight") for n in ("q", "k", "v", "gate", "up", "o", "down")} == {
        "q": 0, "k": 0, "v": 0, "gate": 0, "up": 0, "o": 1, "down": 1}
    assert split.get("q.bias") == 0 and "o.bias" not in split  # o's bias: bias/N on every die
    collectives = [k.ops[0].target for k in p.kernels if k.kind == "collective"]
    assert collectives.count(ALL_REDUCE) == 2  # after o_proj and after down_proj
    assert ALL_GATHER not in collectives  # the output is replicated already
    one = rebel.compile_from_torch(block, example_inputs=inputs()).program
    assert p.weight_bytes < 0.35 * one.weight_bytes  # each die holds about a quarter


def test_runtime_uses_consecutive_devices_and_accounts_each(block):
    compiled = rebel.compile_from_torch(block, example_inputs=inputs(), tensor_parallel_size=2)
    before = [device_memory(d).used for d in range(4)]
    runtime = rebel.Runtime(compiled, device=2)
    assert runtime.devices == (2, 3)
    used = [device_memory(d).used - b for d, b in zip(range(4), before)]
    assert used[0] == used[1] == 0 and used[2] == used[3] == runtime.dram_bytes > 0
    runtime.run(*inputs())
    assert {e.device for e in runtime.last_report.events if e.device is not None} == {2, 3}
    runtime.close()
    assert [device_memory(d).used for d in range(4)] == before


def test_explicit_devices_and_errors(block):
    compiled = rebel.compile_from_torch(block, example_inputs=inputs(), tensor_parallel_size=2)
    assert rebel.Runtime(compiled, device=[3, 1]).devices == (3, 1)
    with pytest.raises(rebel.DeviceError, match="tensor_parallel_size=2 but 3 device"):
        rebel.Runtime(compiled, device=[0, 1, 2])
    with pytest.raises(rebel.DeviceError, match="distinct"):
        rebel.Runtime(compiled, device=[1, 1])
    with pytest.raises(rebel.DeviceError, match="device 4 does not exist"):
        rebel.Runtime(compiled, device=3)


def test_tensor_parallel_artifact_round_trip(block, tmp_path):
    compiled = rebel.compile_from_torch(block, example_inputs=inputs(), tensor_parallel_size=4)
    xs = inputs()
    expected = rebel.Runtime(compiled).run(*xs)
    path = compiled.save(tmp_path / "tp4.rbln")
    loaded = rebel.Runtime(str(path))
    assert loaded.devices == (0, 1, 2, 3)
    assert torch.equal(loaded.run(*xs), expected)


def test_tp_speeds_up_a_weight_bound_decode(block):
    big = Block(hidden=1024, heads=16, kv_heads=8, inter=4096).eval()
    xs = [torch.randn(1, 1, 1024), torch.randn(1, 8, 64, 64), torch.randn(1, 8, 64, 64)]
    compiled = {tp: rebel.compile_from_torch(big, example_inputs=xs, tensor_parallel_size=tp)
                for tp in (1, 4)}
    latency = {tp: c.predicted_latency_s() for tp, c in compiled.items()}
    # The prediction includes the all-reduces over the card's switch (they block every die);
    # the work split over the dies is what shrinks.
    events = predict(compiled[4].program, compiled[4].compiled.spec).events
    comm = sum(e.dur_s for e in events if e.track == LINK and e.device == 0)
    assert comm > 0
    assert latency[4] < latency[1]
    assert latency[4] - comm < 0.6 * latency[1]
