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


def test_tensor_parallel_vendor_attention_matches_hf():
    hf = _llama()
    model = VendorLM(copy.deepcopy(hf), "causal")
    prefill, decode = _inputs(PROMPT, 0, CHUNK), _inputs([1], len(PROMPT), 1)
    compiled = rebel.compile_from_torch(model, example_inputs=[prefill, decode], tensor_parallel_size=2)
    runtime = rebel.Runtime(compiled)
    pairs = _run_session(lambda inputs: runtime(*inputs), hf)
    for ours, ref in pairs:
        torch.testing.assert_close(ours, ref, atol=3e-2, rtol=3e-2)


# --- T5's additive-mask decode attention, fed a position bias picked with .item() -------------

class T5LikeSelfAttention(torch.nn.Module):
    """The T5 decoder's self attention as the vendor compiles it (t5_architecture.py): the
    position bias row of each sequence is selected with `cache_position[i][0].item()` (a
    data-dependent index), added to the padding mask, and fed to paged_add_softmax_attn_decode
    with caches [B, H, L, D] viewed as one block of L slots per sequence."""

    def __init__(self, batch=2, heads=2, length=8, dim=4):
        super().__init__()
        torch.manual_seed(1)
        self.b, self.h, self.length, self.d = batch, heads, length, dim
        self.register_buffer("position_bias", torch.randn(1, heads, length, length))
        self.register_buffer("kc", torch.zeros(batch, heads, length, dim))
        self.register_buffer("vc", torch.zeros(batch, heads, length, dim))

    def forward(self, q, k, v, pad_mask, cache_position, block_tables):
        rows = []
        for i in range(self.b):
            if torch.compiler.is_exporting():
                pos = cache_position[i][0].item()
                torch._check_is_size(pos)
                torch._check(pos < self.length)
            else:
                pos = cache_position[i][0]
            rows.append(torch.select(self.position_bias, dim=2, index=pos).unsqueeze(2))
        mask = torch.cat(rows, 0) + pad_mask                                   # [B, H, 1, L]
        return OPS.paged_add_softmax_attn_decode(
            q, k, v, mask.unsqueeze(2), self.kc.view(self.b, self.h, 1, -1, self.d),
            self.vc.view(self.b, self.h, 1, -1, self.d), cache_position,
            torch.tensor(1.0), block_tables, self.length)


def _t5_steps(model, run, steps=4):
    """Decode `steps` tokens per sequence (sequence 1 starts 2 tokens later); returns (ours,
    dense FP32 reference) per step."""
    torch.manual_seed(2)
    b, h, length, d = model.b, model.h, model.length, model.d
    keys, values, out = [[] for _ in range(b)], [[] for _ in range(b)], []
    start = [0, 2]
    for row in range(b):  # sequence 1's first two tokens were cached by an earlier step
        for p in range(start[row]):
            kk, vv = torch.randn(h, d), torch.randn(h, d)
            model.kc[row, :, p], model.vc[row, :, p] = kk, vv
            keys[row].append(kk)
            values[row].append(vv)
    pad = torch.zeros(b, 1, 1, length)
    pad[1, ..., 0] = -1e9  # sequence 1's first token is padding
    for step in range(steps):
        q, k, v = (torch.randn(b, h, 1, 1, d) for _ in range(3))
        pos = torch.tensor([[start[0] + step], [start[1] + step]], dtype=torch.int32)
        tables = torch.tensor([[0], [1]], dtype=torch.int16)
        ours = run([q, k, v, pad, pos, tables])
        ref = []
        for row in range(b):
            keys[row].append(k[row, :, 0, 0])
            values[row].append(v[row, :, 0, 0])
            kk, vv = torch.stack(keys[row], 1), torch.stack(values[row], 1)      # [H, n, D]
            n = kk.shape[1]
            bias = model.position_bias[0, :, int(pos[row, 0]), :n] + pad[row, 0, 0, :n]
            w = torch.softmax(torch.einsum("hd,hnd->hn", q[row, :, 0, 0], kk) + bias, -1)
            ref.append(torch.einsum("hn,hnd->hd", w, vv))
        out.append((ours[:, :, 0, 0].float(), torch.stack(ref)))
    return out


@pytest.mark.parametrize("compiled", [False, True])
def test_t5_additive_attention_with_item_index(compiled):
    model = T5LikeSelfAttention()
    if compiled:
        example = [torch.zeros(2, 2, 1, 1, 4) for _ in range(3)] + [torch.zeros(2, 1, 1, 8),
                                                     torch.zeros(2, 1, dtype=torch.int32),
                                                     torch.zeros(2, 1, dtype=torch.int16)]
        c = rebel.compile_from_torch(model, example_inputs=example)
        assert not c.program.host_ops
        assert any(o.target == "aten._local_scalar_dense.default" for k in c.program.kernels for o in k.ops)
        runtime = rebel.Runtime(c)
        state = runtime._die_weights[0]

        def run(inputs):  # the test seeds the cache; the runtime's persistent copy must see it
            for name in ("kc", "vc"):
                state[name].copy_(getattr(model, name))
            out = runtime(*inputs)
            for name in ("kc", "vc"):
                getattr(model, name).copy_(state[name])
            return out
        tol = 1e-2
    else:
        run, tol = (lambda inputs: model(*inputs)), 1e-5
    for ours, ref in _t5_steps(model, run):
        torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)


def test_item_index_compiles_and_follows_the_runtime_value():
    class Pick(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.randn(6, 5))

        def forward(self, x, index):
            i = index[0].item()
            torch._check_is_size(i)
            torch._check(i < 6)
            return torch.select(self.table, 0, i) * x

    m = Pick()
    c = rebel.compile_from_torch(m, example_inputs=[torch.randn(5), torch.tensor([0])])
    runtime = rebel.Runtime(c)
    x = torch.randn(5)
    for i in (0, 3, 5):
        torch.testing.assert_close(runtime(x, torch.tensor([i])), m(x, torch.tensor([i])),
                                   atol=5e-3, rtol=5e-3)
    assert not c.program.host_ops


def test_item_arithmetic_runs_and_other_uses_are_refused_clearly():
    class Shift(torch.nn.Module):
        def forward(self, x, index):
            i = index[0].item()
            torch._check_is_size(i)
            torch._check(i < 3)
            return torch.select(x, 0, i * 2 - i + 1)

    c = rebel.compile_from_torch(Shift(), example_inputs=[torch.randn(4, 2), torch.tensor([0])])
    x = torch.randn(4, 2)
    for i in (0, 2):
        torch.testing.assert_close(rebel.Runtime(c)(x, torch.tensor([i])), x[i + 1], atol=2e-3, rtol=2e-3)

    class Halve(torch.nn.Module):
        def forward(self, x, index):
            i = index[0].item()
            torch._check_is_size(i)
            torch._check(i < 3)
            return torch.select(x, 0, i // 2)

    with pytest.raises(CompileError, match="Python number"):
        rebel.compile_from_torch(Halve(), example_inputs=[torch.randn(4, 2), torch.tensor([0])])


# --- sinks (s_aux) and FP8 KV caches ----------------------------------------------------------

def _prefill_case(seed=3, s=5, heads=4, kv_heads=2, d=8):
    torch.manual_seed(seed)
    q = torch.randn(1, heads, s, d)
    k, v = torch.randn(1, kv_heads, s, d), torch.randn(1, kv_heads, s, d)
    caches = [torch.zeros(NUM_BLOCKS, kv_heads, 1, BLOCK, d) for _ in range(2)]
    return q, k, v, caches


def test_sinks_match_hf_gpt_oss_attention():
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    q, k, v, (kc, vc) = _prefill_case()
    heads, kv_heads, s, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    sinks = torch.randn(heads)
    module = torch.nn.Module()
    module.sinks, module.num_key_value_groups, module.training = sinks, heads // kv_heads, False
    causal = torch.full((s, s), float("-inf")).triu(1).view(1, 1, s, s)
    ref, _ = eager_attention_forward(module, q, k, v, causal, scaling=d ** -0.5)
    out = OPS.paged_flash_causal_attn_prefill(
        q=q.view(1, kv_heads, heads // kv_heads, s, d), k=k.unsqueeze(2), v=v.unsqueeze(2),
        kcache=kc, vcache=vc, seq=torch.tensor([[0]]), scale=torch.tensor(d ** -0.5),
        block_table=torch.tensor(TABLE), block_size=BLOCK, partition=2, s_aux=sinks)
    torch.testing.assert_close(out.view(1, heads, s, d).transpose(1, 2), ref, atol=1e-5, rtol=1e-5)
    # the new keys landed in the table's blocks, in order
    torch.testing.assert_close(kc[TABLE[1], :, 0, 0], k[0, :, BLOCK])


@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_kv_cache_stores_scaled_fp8_and_attends_dequantized(compiled):
    q, k, v, _ = _prefill_case(seed=4)
    heads, kv_heads, s, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    k_scale, v_scale = torch.tensor([0.05]), torch.tensor([0.02])

    class Fp8Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("kc", torch.zeros(NUM_BLOCKS, kv_heads, BLOCK, d, dtype=torch.float8_e4m3fn))
            self.register_buffer("vc", torch.zeros(NUM_BLOCKS, kv_heads, BLOCK, d, dtype=torch.float8_e4m3fn))

        def forward(self, q, k, v, seq, table):
            return OPS.paged_causal_attn_prefill_kv_fp8(
                q=q, k=k, v=v, kcache=self.kc.unsqueeze(2), vcache=self.vc.unsqueeze(2), seq=seq,
                scale=torch.tensor(d ** -0.5), block_table=table, block_size=BLOCK,
                k_scale=k_scale, v_scale=v_scale)

    model = Fp8Attention()
    inputs = [q.view(1, kv_heads, heads // kv_heads, s, d), k.unsqueeze(2), v.unsqueeze(2),
              torch.tensor([[0]], dtype=torch.int32), torch.tensor([TABLE], dtype=torch.int16)]
    if compiled:
        c = rebel.compile_from_torch(model, example_inputs=inputs)
        assert not c.program.host_ops
        out = rebel.Runtime(c)(*inputs)
        tol = 5e-2  # 16-bit q/k/v before the FP8 rounding can land k/k_scale in the next FP8 bin
    else:
        out = model(*inputs)
        tol = 1e-5
        assert model.kc.dtype == torch.float8_e4m3fn
        expect = (k[0, :, 0] / k_scale).to(torch.float8_e4m3fn).float()
        assert torch.equal(model.kc[TABLE[0], :, 0].float(), expect)
    kq = (k / k_scale).to(torch.float8_e4m3fn).float() * k_scale    # what the cache gives back
    vq = (v / v_scale).to(torch.float8_e4m3fn).float() * v_scale
    ref = F.scaled_dot_product_attention(q, kq, vq, is_causal=True, enable_gqa=True, scale=d ** -0.5)
    torch.testing.assert_close(out.view(1, heads, s, d), ref, atol=tol, rtol=tol)
    assert not torch.allclose(ref, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                                  scale=d ** -0.5), atol=1e-4)


# --- cache update, linear, MoE ----------------------------------------------------------------

class CrossCache(torch.nn.Module):
    """Whisper's encoder (whisper_architecture.py): writes the batch row b_idx of a cross-attention
    cache [layers*2, B, H, L, D] in place with rbln_cache_update along axis 1."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(2, 3, 2, 4, 4))
        self.proj = torch.nn.Linear(4, 8)

    def forward(self, x, b_idx):
        state = self.proj(x).view(1, 4, 2, 4).transpose(1, 2)                  # [1, H, L, D]
        state = torch.stack([state, state * 2], 0)                              # [2, 1, H, L, D]
        return OPS.rbln_cache_update(self.cache, state, b_idx[0], torch.tensor(1, dtype=torch.int16))


def test_cache_update_writes_rows_in_place_eager_and_compiled():
    torch.manual_seed(5)
    eager, model = CrossCache(), CrossCache()
    model.load_state_dict(eager.state_dict())
    c = rebel.compile_from_torch(model, example_inputs=[torch.randn(4, 4), torch.tensor([0], dtype=torch.int16)])
    assert not c.program.host_ops and c.program.mutable_buffers == ["cache"]
    runtime = rebel.Runtime(c)
    for row in (2, 0):
        x, b = torch.randn(4, 4), torch.tensor([row], dtype=torch.int16)
        expect = eager(x, b)
        got = runtime(x, b)
        torch.testing.assert_close(got, expect, atol=5e-3, rtol=5e-3)
    assert eager.cache[:, 1].abs().sum() == 0 and eager.cache[:, 0].abs().sum() > 0
    assert torch.equal(eager.cache, expect)   # the buffer itself was updated
    # the device's copy persisted across runs: row 2 is still there after row 0 was written
    torch.testing.assert_close(runtime._die_weights[0]["cache"].reshape(expect.shape), expect, atol=5e-3, rtol=5e-3)


class QIntLinear(torch.nn.Module):
    """The vendor's int8 weight-only linear (utils/qlinear.py): dequantize, then F.linear."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        scale = linear.weight.abs().amax(1, keepdim=True) / 127
        self.register_buffer("weight", (linear.weight / scale).round().to(torch.int8))
        self.weight_scale = torch.nn.Parameter(scale)
        self.bias = linear.bias

    def forward(self, x):
        return F.linear(x, self.weight * self.weight_scale, self.bias)


def test_linear_op_and_patched_f_linear_compile_to_gemms():
    torch.manual_seed(6)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8))
    mlp[2] = QIntLinear(mlp[2])
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        ref = mlp(x)
    original = F.linear
    F.linear = OPS.linear  # as modeling_decoderonly.py does around its compiles
    try:
        torch.testing.assert_close(mlp(x), ref)
        c = rebel.compile_from_torch(mlp, example_inputs=[x])
    finally:
        F.linear = original
    ops = [o for k in c.program.kernels for o in k.ops]
    assert not any(o.target.startswith("rbln_custom_ops") for o in ops)
    assert sum(k.kind == "gemm" for k in c.program.kernels) == 2 and not c.program.host_ops
    torch.testing.assert_close(rebel.Runtime(c)(x), ref, atol=1e-2, rtol=1e-2)
    w, b = torch.randn(8, 16), torch.randn(8)
    torch.testing.assert_close(OPS.linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(OPS.linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)


class VendorMoE(torch.nn.Module):
    """A Mixtral MoE block as the vendor runs it (mixtral_architecture.py): router logits, a
    dense [experts, tokens] routing mask (top-k, renormalised), then custom_moe_glu."""

    def __init__(self, block):
        super().__init__()
        self.gate_weight = block.gate.weight
        self.top_k = block.top_k
        gate_up = block.experts.gate_up_proj.detach()
        inner = gate_up.shape[1] // 2
        self.gate_proj = torch.nn.Parameter(gate_up[:, :inner].contiguous())
        self.up_proj = torch.nn.Parameter(gate_up[:, inner:].contiguous())
        self.down_proj = block.experts.down_proj

    def routing(self, hidden):
        probs = torch.softmax(F.linear(hidden.reshape(-1, hidden.shape[-1]), self.gate_weight), -1)
        top, idx = probs.topk(self.top_k, -1)                                  # [T, E] -> top-k
        return torch.zeros_like(probs).scatter(1, idx, top / top.sum(-1, keepdim=True)).t()

    def forward(self, hidden, routing=None):
        b, s, h = hidden.shape
        x = hidden.reshape(-1, h)
        routing = self.routing(hidden) if routing is None else routing
        out = OPS.custom_moe_glu(hidden_states=x, gate_proj_weight=self.gate_proj,
                                 up_proj_weight=self.up_proj, down_proj_weight=self.down_proj,
                                 masked_routing_weight=routing, hidden_act="silu")
        return out.view(b, s, h)


def test_moe_glu_matches_hf_mixtral_block_eager_and_compiled():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(7)
    cfg = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(cfg).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        ref = block(x)
        model = VendorMoE(block).eval()
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    # compiled with the routing mask as an input (top-k is a host op, which this test is not about)
    routing = model.routing(x).detach()
    c = rebel.compile_from_torch(model, example_inputs=[x, routing])
    assert sum(k.kind == "gemm" for k in c.program.kernels) == 3  # gate, up, down expert GEMMs
    assert not c.program.host_ops
    torch.testing.assert_close(rebel.Runtime(c)(x, routing), ref, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="hidden_act"):
        OPS.custom_moe_glu(x[0], model.gate_proj, model.up_proj, model.down_proj,
                           torch.zeros(4, 5), "swish2")


def test_paged_timeline_is_memoised_by_the_blocks_the_context_reached():
    """Decode steps whose contexts fill the same KV blocks share one memoised timeline, equal to
    a fresh prediction; a step that reaches one more block is re-timed (its attention kernels do more work)."""
    from rebel.runtime.timeline import build_steps, paged_fill

    compiled, _ = _compile_and_runner(VendorLM(_llama(), "causal", partition=8))
    runtime = rebel.Runtime(compiled)
    runtime(*_inputs(PROMPT, 0, CHUNK))
    bucket = runtime._select_bucket(_inputs([1], 6, 1))
    assert bucket.paged

    def decode(start):
        inputs = _inputs([1], start, 1)
        runtime(*inputs)
        values = {n: t for (n, _), t in zip(bucket.program.inputs, inputs)}
        fresh = runtime._engine.run(build_steps(bucket.program, runtime.spec,
                                                paged_fill(bucket.paged, values)))
        assert runtime.last_report.wall_time_s > 0
        return runtime.last_report, runtime._timeline, fresh

    report6, timeline6, fresh6 = decode(6)     # 7 tokens: 2 blocks of 4
    misses = bucket.timelines.misses
    report7, timeline7, fresh7 = decode(7)     # 8 tokens: still 2 blocks
    assert bucket.timelines.misses == misses and bucket.timelines.hits >= 1
    assert timeline7 is timeline6
    assert timeline7.events == fresh7.events and timeline7.end_s == fresh7.end_s
    assert report7.latency_s == report6.latency_s == pytest.approx(fresh6.latency_s, rel=0, abs=0)
    report8, timeline8, fresh8 = decode(8)     # 9 tokens: 3 blocks
    assert bucket.timelines.misses == misses + 1
    assert timeline8.events == fresh8.events
    assert timeline8 is not timeline7 and timeline8.events != timeline7.events
    # a fresh runtime predicts the same for the same context
    other = rebel.Runtime(compiled)
    other(*_inputs([1], 8, 1))
    assert other.last_report.latency_s == report8.latency_s


def test_timeline_cache_is_bounded():
    from rebel.device.engine import Timeline
    from rebel.runtime.timeline import TimelineCache

    class Engine:
        def run(self, steps, pinned=frozenset()):
            return Timeline([], 0.0, 0.0)

    compiled, _ = _compile_and_runner(VendorLM(_llama(), "causal", partition=8))
    spec = rebel.Runtime(compiled).spec
    cache = TimelineCache(size=3)
    kernel = next(k.name for k in compiled.program.kernels if k.kind == "attention")
    first = cache.get(Engine(), compiled.program, spec, {kernel: 0.25})[0]
    for f in (0.5, 0.75, 1.0):
        cache.get(Engine(), compiled.program, spec, {kernel: f})
    assert len(cache) == 3
    last = cache.get(Engine(), compiled.program, spec, {kernel: 1.0})[0]
    assert cache.get(Engine(), compiled.program, spec, {kernel: 1.0})[0] is last and cache.misses == 4
    assert cache.get(Engine(), compiled.program, spec, {kernel: 0.25})[0] is not first  # evicted
    assert cache.misses == 5 and len(cache) == 3
