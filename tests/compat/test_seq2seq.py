"""Vendor encoder-decoder classes (BART, T5, Whisper) and the T5 encoder: compile with the
vendor's class, save, reload in a fresh process, generate greedily, and match the FP32 model.

Encoder and decoder are separate graphs of one compile context: the decoder's self-attention
cache and the cross-attention cache the encoder fills are static-address buffers shared by both
runtimes. Greedy tokens must equal FP32 `generate`'s, or differ only where FP32's top-2 margin is
below 0.1 (judged step by step on the vendor's own tokens). Host fallbacks are asserted per graph.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import optimum.rbln
from compat_support import assert_greedy_matches, assert_host_fallbacks

VOCAB = 256
NEW_TOKENS = 8


def _m(name):
    import transformers
    return getattr(transformers, name)


def _ids(batch=1, seq=12, seed=0):
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _bart():
    return _m("BartForConditionalGeneration")(_m("BartConfig")(
        vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        init_std=0.2, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        forced_bos_token_id=None, forced_eos_token_id=None))


def _t5_cfg():
    return _m("T5Config")(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        initializer_factor=4.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _whisper():
    return _m("WhisperForConditionalGeneration")(_m("WhisperConfig")(
        vocab_size=VOCAB, num_mel_bins=16, d_model=64, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=32, max_target_positions=32, init_std=0.2, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=3, begin_suppress_tokens=None,
        suppress_tokens=None))


@dataclass
class Case:
    id: str
    cls: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]           # encoder inputs, the same for both models
    rbln: dict = field(default_factory=dict)

    def __str__(self):
        return self.id


ENC_LEN = 32


def _text_inputs(pad_id):
    """A 20-token text right-padded to the compiled encoder length. Full length because the
    vendor's RBLNT5ForConditionalGeneration.generate hands the decoder the encoder mask unpadded
    (a vendor bug, seq2seq/modeling_seq2seq.py): a shorter prompt fails our runtime's shape check."""
    ids = _ids(seq=ENC_LEN)
    mask = torch.ones(1, ENC_LEN, dtype=torch.long)
    ids[:, 20:], mask[:, 20:] = pad_id, 0
    return lambda: {"input_ids": ids.clone(), "attention_mask": mask.clone()}


def _features():
    return {"input_features": torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))}


CASES = [
    Case("bart", "RBLNBartForConditionalGeneration", _bart, _text_inputs(1),
         {"rbln_enc_max_seq_len": ENC_LEN, "rbln_dec_max_seq_len": 32}),
    Case("t5", "RBLNT5ForConditionalGeneration", lambda: _m("T5ForConditionalGeneration")(_t5_cfg()),
         _text_inputs(0), {"rbln_enc_max_seq_len": ENC_LEN, "rbln_dec_max_seq_len": 32}),
    Case("whisper", "RBLNWhisperForConditionalGeneration", _whisper, _features),
]


def _compile(cls, model, tmp_path, rbln):
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "rbln"
    model.save_pretrained(hf_dir)
    compiled = getattr(optimum.rbln, cls).from_pretrained(hf_dir, export=True, rbln_create_runtimes=False,
                                                          **rbln)
    compiled.save_pretrained(out_dir)
    del compiled
    return out_dir


@pytest.mark.parametrize("case", CASES, ids=str)
def test_vendor_seq2seq_generate(case: Case, tmp_path, reloader):
    torch.manual_seed(0)
    model = case.build().eval()
    out_dir = _compile(case.cls, model, tmp_path, case.rbln)
    assert_host_fallbacks(out_dir, graphs=2)

    inputs = case.inputs()
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    got = reloader.run(case.cls, out_dir, method="generate", **inputs, **gen)[""]
    with torch.no_grad():
        want = model.generate(**inputs, **gen)

    def logits(dec):
        with torch.no_grad():
            return model(**inputs, decoder_input_ids=dec).logits.float()
    # Whisper's generate returns the tokens after its decoder prompt; BART/T5 begin with it
    start = torch.tensor([[model.config.decoder_start_token_id]])
    if not torch.equal(want[:, :1], start):
        assert not torch.equal(got[:, :1], start), f"{case.id}: got starts with the decoder prompt"
        got, want = torch.cat([start, got], 1), torch.cat([start, want], 1)
    assert_greedy_matches(got, want, 1, logits, case.id)


def test_vendor_batch_over_compiled_gets_our_error(tmp_path):
    """Batch 2 into a model compiled for batch 1, through the vendor's forward: our runtime's
    InputError names the input, the shape it got and the one compiled."""
    import rebel
    torch.manual_seed(0)
    model = _m("T5EncoderModel")(_t5_cfg()).eval()
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    compiled = optimum.rbln.RBLNT5EncoderModel.from_pretrained(hf_dir, export=True, rbln_max_seq_len=16)
    ids = _ids(batch=2, seq=16)
    with pytest.raises(rebel.InputError, match=r"\[2, 16\].*\[1, 16\]|\[1, 16\].*\[2, 16\]"):
        compiled(input_ids=ids, attention_mask=torch.ones_like(ids))
