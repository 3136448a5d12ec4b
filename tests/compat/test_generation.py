"""Vendor generative classes (decoder LLMs, seq2seq, Whisper): greedy tokens after a
fresh-process reload equal the FP32 transformers model's, or every disagreement sits where FP32's
top-2 logit margin is below 0.1 (a tie that 16-bit rounding may break either way).

They need the vendor's `rebel.compile_context.CompileContext` (static-address KV caches shared
by prefill and decode graphs) and the `torch.ops.rbln_custom_ops` paged-attention ops (issue 10
items 2-3). A test still marked XFAIL_API is a strict xfail that counts only when the failure
names exactly such a missing API (`compat_support.needs_vendor_api`); others fail for real.
"""
from __future__ import annotations

import pytest
import torch

import optimum.rbln
from compat_support import MissingVendorAPI, assert_host_fallbacks, needs_vendor_api

MARGIN = 0.1

XFAIL_API = pytest.mark.xfail(strict=True, raises=MissingVendorAPI,
                              reason="needs rbln_custom_ops and CompileContext (issue 10 items 2-3)")


def _ids(batch, seq, vocab=100, seed=0):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _left_padded(batch=2, seq=8, pads=(0, 3), pad_id=0):
    """Prompts of different lengths, left-padded to `seq` as a tokenizer with padding_side=left does."""
    ids, mask = _ids(batch, seq), torch.ones(batch, seq, dtype=torch.long)
    for row, pad in enumerate(pads):
        ids[row, :pad], mask[row, :pad] = pad_id, 0
    return ids, mask


def _sequences(outputs: dict) -> torch.Tensor:
    for key in ("", "sequences", "0"):
        if key in outputs:
            return outputs[key]
    raise AssertionError(f"generate returned {sorted(outputs)}, no token ids")


def assert_greedy_match(got: torch.Tensor, want: torch.Tensor, logits_of, prompt_len: int):
    """got == want token for token; where a row first differs, FP32's top-2 margin there must be
    below MARGIN (after that the rows continue from different prefixes and are not compared).
    logits_of(row, prefix) -> FP32 logits of the next token after `prefix` (1-D)."""
    assert got.shape[0] == want.shape[0], f"batch {got.shape[0]} != FP32 {want.shape[0]}"
    for row in range(want.shape[0]):
        g, w = got[row, prompt_len:], want[row, prompt_len:]
        n = min(len(g), len(w))
        diff = [i for i in range(n) if g[i] != w[i]]
        if not diff:
            assert len(g) == len(w), f"row {row}: {len(g)} new tokens, FP32 {len(w)}"
            continue
        i = diff[0]
        logits = logits_of(row, want[row, :prompt_len + i])
        top2 = torch.topk(logits.float(), 2).values
        margin = (top2[0] - top2[1]).item()
        assert margin < MARGIN, (f"row {row} token {i}: got {int(g[i])}, FP32 {int(w[i])} with "
                                 f"top-2 margin {margin:.3f} >= {MARGIN}: a real disagreement")


def _decoder_cfg(**kw):
    base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=8192,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    base.update(kw)
    return base


def _causal_lm(name, cfg_name, **kw):
    import transformers
    torch.manual_seed(0)
    return getattr(transformers, name)(getattr(transformers, cfg_name)(**kw)).eval()


def _run_decoder(tmp_path, reloader, model, cls, rbln, ids, mask, new_tokens=8):
    model.save_pretrained(tmp_path / "hf")
    with needs_vendor_api():
        compiled = getattr(optimum.rbln, cls).from_pretrained(
            tmp_path / "hf", export=True, rbln_create_runtimes=False, **rbln)
        compiled.save_pretrained(tmp_path / "rbln")
        del compiled
    assert_host_fallbacks(tmp_path / "rbln")
    got = _sequences(reloader.run(cls, tmp_path / "rbln", method="generate", input_ids=ids,
                                  attention_mask=mask, max_new_tokens=new_tokens, do_sample=False))
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              do_sample=False)

    def logits_of(row, prefix):
        keep = mask[row].bool()
        tokens = torch.cat([prefix[:ids.shape[1]][keep], prefix[ids.shape[1]:]])[None]
        with torch.no_grad():
            return model(input_ids=tokens).logits[0, -1]
    assert_greedy_match(got, want, logits_of, ids.shape[1])


DECODERS = [
    pytest.param("RBLNLlamaForCausalLM", "LlamaForCausalLM", "LlamaConfig", {},
                 {"rbln_batch_size": 2, "rbln_max_seq_len": 256}, id="llama-batch2-left-padded"),
    pytest.param("RBLNLlamaForCausalLM", "LlamaForCausalLM", "LlamaConfig", {},
                 {"rbln_batch_size": 1, "rbln_max_seq_len": 8192, "rbln_attn_impl": "flash_attn",
                  "rbln_kvcache_partition_len": 4096}, id="llama-flash-attn-auto-kv-blocks",
                 marks=pytest.mark.xfail(strict=True, raises=RuntimeError,
                                         reason="flash_attn with automatic KV-block sizing: the "
                                                "reloaded decode reshapes a KV cache to "
                                                "[1, 2, 1, 4096, 8] from 131072 elements (found "
                                                "after merging CompileContext + rbln_custom_ops)")),
    pytest.param("RBLNLlamaForCausalLM", "LlamaForCausalLM", "LlamaConfig", {},
                 {"rbln_batch_size": 2, "rbln_max_seq_len": 256, "rbln_tensor_parallel_size": 2},
                 id="llama-tp2",
                 marks=pytest.mark.xfail(strict=True, raises=Exception,
                                         reason="TP=2 through the vendor layer: the reloaded "
                                                "model fails in a size check (tensor a (16) vs b "
                                                "(32) at dim 2), found after merging "
                                                "CompileContext + rbln_custom_ops")),
    pytest.param("RBLNQwen3ForCausalLM", "Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 8},
                 {"rbln_batch_size": 1, "rbln_max_seq_len": 256, "rbln_prefill_chunk_size": 64},
                 id="qwen3-two-prefill-chunks"),
    pytest.param("RBLNGemmaForCausalLM", "GemmaForCausalLM", "GemmaConfig", {"head_dim": 8},
                 {"rbln_batch_size": 2, "rbln_max_seq_len": 256}, id="gemma"),
]


@pytest.mark.parametrize("cls,hf_cls,cfg_cls,extra,rbln", DECODERS)
def test_decoder_generate(cls, hf_cls, cfg_cls, extra, rbln, tmp_path, reloader):
    model = _causal_lm(hf_cls, cfg_cls, **_decoder_cfg(**extra))
    if rbln.get("rbln_prefill_chunk_size"):  # a prompt longer than one prefill chunk
        ids, mask = _ids(1, 80), torch.ones(1, 80, dtype=torch.long)
    elif rbln["rbln_batch_size"] == 2:
        ids, mask = _left_padded()
    else:
        ids, mask = _ids(1, 8), torch.ones(1, 8, dtype=torch.long)
    _run_decoder(tmp_path, reloader, model, cls, rbln, ids, mask)


def test_gpt2_generate(tmp_path, reloader):
    model = _causal_lm("GPT2LMHeadModel", "GPT2Config", vocab_size=100, n_embd=32, n_layer=2,
                       n_head=2, n_positions=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ids, mask = _left_padded()
    _run_decoder(tmp_path, reloader, model, "RBLNGPT2LMHeadModel",
                 {"rbln_batch_size": 2, "rbln_max_seq_len": 256}, ids, mask)


def _run_seq2seq(tmp_path, reloader, model, cls, rbln, inputs, decoder_prompt_len, new_tokens=8):
    model.save_pretrained(tmp_path / "hf")
    with needs_vendor_api():
        compiled = getattr(optimum.rbln, cls).from_pretrained(
            tmp_path / "hf", export=True, rbln_create_runtimes=False, **rbln)
        compiled.save_pretrained(tmp_path / "rbln")
        del compiled
    assert_host_fallbacks(tmp_path / "rbln")
    got = _sequences(reloader.run(cls, tmp_path / "rbln", method="generate", max_new_tokens=new_tokens,
                                  do_sample=False, **inputs))
    with torch.no_grad():
        want = model.generate(max_new_tokens=new_tokens, do_sample=False, **inputs)

    def logits_of(row, prefix):
        one = {k: v[row:row + 1] for k, v in inputs.items()}
        with torch.no_grad():
            return model(**one, decoder_input_ids=prefix[None]).logits[0, -1]
    assert_greedy_match(got, want, logits_of, decoder_prompt_len)


def test_bart_generate(tmp_path, reloader):
    model = _causal_lm("BartForConditionalGeneration", "BartConfig", vocab_size=100, d_model=32,
                       encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                       max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                       decoder_start_token_id=2, forced_bos_token_id=None)
    ids = _ids(1, 16)
    _run_seq2seq(tmp_path, reloader, model, "RBLNBartForConditionalGeneration",
                 {"rbln_batch_size": 1, "rbln_enc_max_seq_len": 16, "rbln_dec_max_seq_len": 16},
                 {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, decoder_prompt_len=1)


def test_whisper_generate(tmp_path, reloader):
    model = _causal_lm("WhisperForConditionalGeneration", "WhisperConfig", vocab_size=100,
                       d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                       num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                       begin_suppress_tokens=None, suppress_tokens=None)
    features = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(0))
    _run_seq2seq(tmp_path, reloader, model, "RBLNWhisperForConditionalGeneration",
                 {"rbln_batch_size": 1, "rbln_token_timestamps": False},
                 {"input_features": features}, decoder_prompt_len=1)
