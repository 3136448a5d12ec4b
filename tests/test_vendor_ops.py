"""The vendor's `torch.ops.rbln_custom_ops.*` and data-dependent `.item()` scalars.

Attention variants are checked against FP32 Hugging Face models: a tiny random-weight Llama (and
Mistral for the sliding window) whose attention is replaced by the vendor's call convention
(q [B, kv_heads, group, S, D], caches [num_blocks, kv_heads, 1, block_size, D] updated in place,
seq [B, 1], block tables), run as a prefill chunk then decode steps, eagerly (the ops' reference
kernels) and compiled (caches are module buffers: persistent device buffers shared by the
prefill and decode shape buckets).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.masking_utils import AttentionMaskInterface

import rebel
from rebel.errors import CompileError

OPS = torch.ops.rbln_custom_ops
ATTN = "vendor_convention_test"
BLOCK, BLOCKS_PER_SEQ, NUM_BLOCKS = 4, 4, 8
MAX_LEN = BLOCK * BLOCKS_PER_SEQ
CHUNK = 8
TABLE = [5, 2, 7, 0]  # a scattered block table: paging must follow it


class Ctx:
    def __init__(self, owner, seq, block_table, mask, window_args):
        self.owner, self.seq, self.block_table, self.mask, self.window = owner, seq, block_table, mask, window_args


def _vendor_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      vendor_ctx=None, **kwargs):
    """HF attention -> the vendor's op call, shaped as decoderonly_architecture.py does."""
    ctx = vendor_ctx
    owner, layer = ctx.owner, module.layer_idx
    b, heads, s, d = query.shape
    kv_heads = key.shape[1]
    phase = "decode" if s == 1 else "prefill"
    args = {"q": query.reshape(b, kv_heads, heads // kv_heads, s, d), "k": key.unsqueeze(2),
            "v": value.unsqueeze(2), "kcache": owner.kcache(layer).unsqueeze(2),
            "vcache": owner.vcache(layer).unsqueeze(2), "scale": torch.tensor(scaling),
            "block_table": ctx.block_table, "block_size": owner.block_size}
    kind = owner.kind
    if kind == "sliding":
        args["cache_seq_len"], args["cache_offset"] = ctx.window
        if phase == "prefill":
            args["is_bidirectional"] = False
            args["attn_mask"] = None
        else:
            args["attn_mask"] = ctx.mask
        op = getattr(OPS, f"paged_sliding_window_attn_{phase}")
    else:
        args["seq"] = ctx.seq
        if kind.endswith("masked"):
            args["mask"] = ctx.mask
        elif phase == "prefill":
            args["is_bidirectional"] = False
        if kind.startswith("flash"):
            args["partition"] = owner.partition
        name = {"causal": "paged_causal_attn_", "masked": "paged_attn_",
                "flash_causal": "paged_flash_causal_attn_", "flash_masked": "paged_flash_attn_"}[kind]
        op = getattr(OPS, name + phase)
    out = op(**args)
    return out.reshape(b, heads, s, d).transpose(1, 2), None


AttentionInterface.register(ATTN, _vendor_attention)
AttentionMaskInterface.register(ATTN, lambda *args, **kwargs: None)


class VendorLM(torch.nn.Module):
    """forward(input_ids [B, S], position_ids [B, S], seq [B, 1], block_table, mask, window)
    -> logits [B, S, vocab]; the KV caches are buffers [num_blocks, kv_heads, block, D]."""

    def __init__(self, hf, kind: str, partition: int = 8, block_size: int = BLOCK, num_blocks=NUM_BLOCKS):
        super().__init__()
        hf.config._attn_implementation = ATTN
        self.hf, self.kind, self.partition, self.block_size = hf, kind, partition, block_size
        c = hf.config
        shape = (num_blocks, c.num_key_value_heads, block_size, c.hidden_size // c.num_attention_heads)
        for i in range(c.num_hidden_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape))
            self.register_buffer(f"v{i}", torch.zeros(shape))

    def kcache(self, i):
        return getattr(self, f"k{i}")

    def vcache(self, i):
        return getattr(self, f"v{i}")

    def forward(self, input_ids, position_ids, seq, block_table, mask, cache_seq_len, cache_offset):
        ctx = Ctx(self, seq, block_table, mask, (cache_seq_len, cache_offset))
        return self.hf(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                       vendor_ctx=ctx).logits


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _mistral(window: int):
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        sliding_window=window)
    cfg._attn_implementation = "eager"
    return MistralForCausalLM(cfg).eval()


def _inputs(tokens: list[int], start: int, width: int, window: int | None = None):
    """One row's graph inputs for `tokens` at positions start.. padded to `width` tokens."""
    n = len(tokens)
    ids = torch.tensor([tokens + [0] * (width - n)])
    pos = torch.arange(start, start + width).view(1, -1)
    key = torch.arange(MAX_LEN).view(1, 1, 1, -1)
    query = pos.view(1, 1, -1, 1)
    mask = (key <= query).float().unsqueeze(2)                         # [1, 1, 1, S, L] 0/1
    if window is not None:  # the vendor's get_swa_custom_op_args
        csl = torch.tensor([[min(start, window)]], dtype=torch.int32)
        off = csl + n
        mask = torch.where(torch.arange(window)[None, :] - csl > 0, 0.0, 1.0)[:, None, None, :]
        return [ids, pos, torch.tensor([[start]], dtype=torch.int32),
                torch.tensor([[TABLE[0]]], dtype=torch.int16), mask, csl, off]
    return [ids, pos, torch.tensor([[start]], dtype=torch.int32),
            torch.tensor([TABLE], dtype=torch.int16), mask, torch.zeros(1, 1, dtype=torch.int32),
            torch.zeros(1, 1, dtype=torch.int32)]


PROMPT = [5, 17, 3, 42, 8, 29]
STEPS = 3


def _run_session(run, hf, window=None):
    """Prefill PROMPT (padded to CHUNK) then STEPS decode steps fed HF's greedy tokens;
    returns [(our logits, HF FP32 logits)] of each step's new token."""
    tokens, pairs = list(PROMPT), []
    logits = run(_inputs(tokens, 0, CHUNK, window))[0, len(tokens) - 1]
    for step in range(STEPS + 1):
        with torch.no_grad():
            ref = hf(torch.tensor([tokens])).logits[0, -1]
        pairs.append((logits.float(), ref))
        if step == STEPS:
            break
        tokens.append(int(ref.argmax()))
        logits = run(_inputs(tokens[-1:], len(tokens) - 1, 1, window))[0, 0]
    return pairs


def _compile_and_runner(model, window=None):
    prefill, decode = _inputs(PROMPT, 0, CHUNK, window), _inputs([1], len(PROMPT), 1, window)
    compiled = rebel.compile_from_torch(model, example_inputs=[prefill, decode])
    runtime = rebel.Runtime(compiled)
    return compiled, lambda inputs: runtime(*inputs)


KINDS = ["causal", "masked", "flash_causal", "flash_masked"]


@pytest.mark.parametrize("kind", KINDS)
def test_llama_vendor_attention_eager_matches_hf(kind):
    hf = _llama()
    model = VendorLM(copy.deepcopy(hf), kind, partition=4)
    with torch.no_grad():
        pairs = _run_session(lambda inputs: model(*inputs), hf)
    for ours, ref in pairs:
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["causal", "flash_masked"])
def test_llama_vendor_attention_compiled_matches_hf(kind):
    hf = _llama()
    compiled, run = _compile_and_runner(VendorLM(copy.deepcopy(hf), kind, partition=8))
    kernels = compiled.program.kernels
    attention = [k for k in kernels if k.kind == "attention"]
    assert len(attention) == 2 and all("attn" in k.name for k in attention)
    assert not compiled.program.host_ops
    assert len(compiled.program.mutable_buffers) == 4     # k, v per layer: persistent buffers
    pairs = _run_session(run, hf)
    for ours, ref in pairs:
        torch.testing.assert_close(ours, ref, atol=3e-2, rtol=3e-2)
        assert int(ours.argmax()) == int(ref.argmax())


@pytest.mark.parametrize("compiled", [False, True])
def test_mistral_sliding_window_matches_hf(compiled):
    window = 4  # the prompt (6 tokens) is longer than the window: the cache must roll
    hf = _mistral(window)
    model = VendorLM(copy.deepcopy(hf), "sliding", block_size=window)
    if compiled:
        _, run = _compile_and_runner(model, window)
    else:
        run = lambda inputs: model(*inputs)  # noqa: E731
    with torch.no_grad():
        pairs = _run_session(run, hf, window)
    tol = 3e-2 if compiled else 1e-4
    for ours, ref in pairs:
        torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
