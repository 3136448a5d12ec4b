"""MultiheadAttention's head split as views (device/attention_layout.py): the generated code runs
it without torch's layout copies, bit-identical (torch.equal) to the reference interpreter, with
or without batch_first, masks and odd sizes; an attention it does not recognise runs as before."""
from __future__ import annotations

import pytest
import torch

import rebel
from rebel.device import attention_layout
from rebel.runtime.executor import EXECUTOR_ENV


def _runtimes(model, inputs, monkeypatch):
    compiled = rebel.compile_from_torch(model, example_inputs=inputs)
    monkeypatch.setenv(EXECUTOR_ENV, "interpret")
    old = rebel.Runtime(compiled, tensor_type="pt")
    monkeypatch.setenv(EXECUTOR_ENV, "generated")
    return compiled, old, rebel.Runtime(compiled, tensor_type="pt")


def _rewritten(compiled) -> list:
    kernels = [(k.ops, k.outputs) for seg in compiled.program.segments if seg.kind == "device" for k in seg.kernels]
    return attention_layout.rewrite(kernels, keep=set())


def _copies(kernels) -> int:
    """Contiguous copies and transposes of a [.., E] input the kernels make."""
    return sum(op.target == "aten.clone.default" and op.kwargs.get("memory_format") is torch.contiguous_format
               for ops, _ in kernels for op in ops)


class Block(torch.nn.Module):
    def __init__(self, batch_first: bool, mask: str):
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=batch_first,
                                                      activation="gelu", dropout=0.0)
        self.mask = mask

    def forward(self, x):
        length = x.shape[1] if self.layer.self_attn.batch_first else x.shape[0]
        if self.mask == "causal":
            mask = torch.nn.Transformer.generate_square_subsequent_mask(length)
            return self.layer(x, src_mask=mask, is_causal=True)
        if self.mask == "additive":
            return self.layer(x, src_mask=torch.arange(length * length).view(length, length) % 3 * -0.5)
        return self.layer(x)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "causal", "additive"])
@pytest.mark.parametrize("batch, length", [(3, 10), (1, 7), (2, 1)])
def test_head_split_as_views_is_bit_identical(batch_first, mask, batch, length, monkeypatch):
    torch.manual_seed(0)
    model = Block(batch_first, mask).eval()
    shape = (batch, length, 32) if batch_first else (length, batch, 32)
    x = torch.randn(*shape)
    compiled, old, new = _runtimes(model, [x], monkeypatch)
    before = [(k.ops, k.outputs) for seg in compiled.program.segments if seg.kind == "device" for k in seg.kernels]
    after = _rewritten(compiled)
    if length > 1 and batch > 1:  # torch's chain; size-1 dims change its ops, left as they are
        assert _copies(before) >= 1 and _copies(after) == _copies(before) - 1
    for seed in range(3):
        xi = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2
        assert torch.equal(old.run(xi), new.run(xi))
    # The reference is torch's documented path: under no_grad eager takes its fused fast path,
    # which reads a batch_first block's additive mask differently (0.56 apart here).
    ref = model(x).detach()
    assert (new.run(x) - ref).abs().max() < 0.02 * ref.abs().max() + 1e-2


def test_batch_first_projections_run_on_batch_rows(monkeypatch):
    torch.manual_seed(0)
    model = Block(True, "none").eval()
    compiled = rebel.compile_from_torch(model, example_inputs=[torch.randn(2, 6, 32)])
    after = _rewritten(compiled)
    ops = [op for block, _ in after for op in block]
    linears = [op for op in ops if op.target == attention_layout.LINEAR]
    assert [tuple(op.out.shape) for op in linears[:2]] == [(2, 6, 96), (12, 32)]
    # No transpose of the [B, L, E] input or back: the block's only permute is the head split.
    assert [op.args[1] for op in ops if op.target == "aten.permute.default"] == [[2, 0, 3, 1, 4]]


class CrossAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, memory):
        return self.attn(x, memory, memory, need_weights=False)[0]


def test_other_attention_is_left_as_it_is(monkeypatch):
    torch.manual_seed(0)
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    compiled, old, new = _runtimes(CrossAttention().eval(), [x, memory], monkeypatch)
    kernels = [(k.ops, k.outputs) for seg in compiled.program.segments if seg.kind == "device" for k in seg.kernels]
    assert attention_layout.rewrite(kernels, keep=set()) is kernels
    assert torch.equal(old.run(x, memory), new.run(x, memory))


def test_values_read_outside_the_block_keep_the_chain():
    torch.manual_seed(0)
    compiled = rebel.compile_from_torch(Block(True, "none").eval(), example_inputs=[torch.randn(2, 6, 32)])
    kernels = [(k.ops, k.outputs) for seg in compiled.program.segments if seg.kind == "device" for k in seg.kernels]
    clone = next(op.name for ops, _ in kernels for op in ops if op.target == "aten.clone.default")
    assert attention_layout.rewrite(kernels, keep={clone}) is kernels
