"""rebel.runtime.op_timing: a vendor attention op called outside a graph (vllm_rbln Path B) is
timed exactly as its kernel in a graph compiled by compile_from_torch and run by a Runtime, and
its time follows the context the sequences have reached."""
from __future__ import annotations

import pytest
import torch

import rebel
from rebel.device.events import NEURAL_ENGINE, TASK_DMA
from rebel.errors import CompileError
from rebel.runtime.op_timing import attention_events, attention_seconds

H = torch.float16
KV_HEADS, GROUP, D, BLOCK, BLOCKS = 3, 3, 64, 32, 80


class OneOp(torch.nn.Module):
    """The op alone, its caches and scale as the module's buffers (as a model's are)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.register_buffer("kc", torch.zeros(BLOCKS, KV_HEADS, 1, BLOCK, D, dtype=H))
        self.register_buffer("vc", torch.zeros(BLOCKS, KV_HEADS, 1, BLOCK, D, dtype=H))
        self.register_buffer("scale", torch.tensor(D ** -0.5))

    def forward(self, q, k, v, seq, table):
        op = getattr(torch.ops.rbln_custom_ops, self.name)
        return op(q, k, v, self.kc, self.vc, seq, self.scale, table, BLOCK)


def decode_inputs(contexts: list[int], width: int = 20):
    n = len(contexts)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(n, KV_HEADS, GROUP, 1, D, generator=g).to(H)
    k = torch.randn(n, KV_HEADS, 1, 1, D, generator=g).to(H)
    v = torch.randn(n, KV_HEADS, 1, 1, D, generator=g).to(H)
    table = torch.arange(n * width).view(n, width) % BLOCKS
    return q, k, v, torch.tensor(contexts).view(n, 1), table


def prefill_inputs(start: int, chunk: int, width: int = 20):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, KV_HEADS, GROUP, chunk, D, generator=g).to(H)
    k = torch.randn(1, KV_HEADS, 1, chunk, D, generator=g).to(H)
    v = torch.randn(1, KV_HEADS, 1, chunk, D, generator=g).to(H)
    return q, k, v, torch.tensor([[start]]), torch.arange(width).view(1, width)


def as_args(module: OneOp, inputs) -> dict:
    q, k, v, seq, table = inputs
    return dict(q=q, k=k, v=v, kcache=module.kc, vcache=module.vc, seq=seq, scale=module.scale,
                block_table=table, block_size=BLOCK)


def kernel_events(events, kernel: str) -> list[tuple[str, str, float]]:
    return sorted((e.track, e.name, e.dur_s) for e in events
                  if e.track in (TASK_DMA, NEURAL_ENGINE) and e.name.endswith(kernel))


@pytest.mark.parametrize("name, inputs", [
    ("paged_causal_attn_decode", decode_inputs([63, 200, 511, 5])),
    ("paged_causal_attn_prefill", prefill_inputs(96, 48)),
])
def test_same_time_as_the_kernel_in_a_compiled_graph(name, inputs):
    module = OneOp(name)
    runtime = rebel.Runtime(rebel.compile_from_torch(module, list(inputs)), tensor_type="pt")
    runtime.run(*inputs)
    [kernel] = [k.name for k in runtime.last_report.kernels if name in k.name]
    compiled = kernel_events(runtime.last_report.events, kernel)
    mine = attention_events(name, as_args(module, inputs))
    assert len(compiled) == 4  # weights (the caches), activations, compute, stores
    ours = kernel_events(mine, kernel)
    assert [(t, n) for t, n, _ in ours] == [(t, n) for t, n, _ in compiled]
    assert [d for *_, d in ours] == pytest.approx([d for *_, d in compiled], rel=1e-9)
    seconds = attention_seconds(name, as_args(module, inputs))
    assert seconds == pytest.approx(max(e.end_s for e in mine) - min(e.start_s for e in mine))
    assert seconds >= sum(d for t, _, d in compiled if t == NEURAL_ENGINE)


def test_time_follows_the_context():
    module = OneOp("paged_causal_attn_decode")
    times = [attention_seconds("paged_causal_attn_decode", as_args(module, decode_inputs([c] * 4)))
             for c in (63, 511)]
    assert times[1] > 2 * times[0]
    # a prefill chunk late in a long prompt reads more of the cache than the same chunk early on
    early, late = (attention_seconds("paged_causal_attn_prefill",
                                     as_args(module, prefill_inputs(start, 32)))
                   for start in (0, 480))
    assert late > early


def test_clear_errors():
    module = OneOp("paged_causal_attn_decode")
    with pytest.raises(CompileError, match="not a vendor attention op"):
        attention_seconds("paged_attention", as_args(module, decode_inputs([4])))
    with pytest.raises(CompileError, match="unknown argument"):
        attention_seconds("paged_causal_attn_decode",
                          {**as_args(module, decode_inputs([4])), "query": None})
