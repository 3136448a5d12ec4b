"""Vendor encoder and vision classes: compile, save, reload in a fresh process, match FP32."""
from __future__ import annotations

import pytest
import torch

import optimum.rbln
from compat_support import assert_close, assert_host_fallbacks


def _ids(batch=1, seq=8, vocab=100, seed=0):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _text(**kw):
    base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64)
    base.update(kw)
    return base


def compile_and_reload(tmp_path, reloader, hf_model, cls: str, rbln: dict, *args, **kwargs):
    """Save `hf_model`, compile it with the vendor's `cls`, save that, reload and run it in the
    reload worker. Returns (reloaded outputs, saved folder)."""
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "rbln"
    hf_model.save_pretrained(hf_dir)
    compiled = getattr(optimum.rbln, cls).from_pretrained(hf_dir, export=True,
                                                         rbln_create_runtimes=False, **rbln)
    compiled.save_pretrained(out_dir)
    del compiled
    return reloader.run(cls, out_dir, *args, **kwargs), out_dir


def test_bert_model(tmp_path, reloader):
    from transformers import BertConfig, BertModel
    model = BertModel(BertConfig(**_text())).eval()
    ids, mask = _ids(seq=16), torch.ones(1, 16, dtype=torch.long)
    mask[:, 12:] = 0
    got, folder = compile_and_reload(tmp_path, reloader, model, "RBLNBertModel",
                                     {"rbln_max_seq_len": 16}, input_ids=ids, attention_mask=mask,
                                     token_type_ids=torch.zeros_like(ids))
    print(sorted(got))
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask)
    assert_close(got["last_hidden_state"], want.last_hidden_state, "last_hidden_state")
    assert_host_fallbacks(folder, graphs=1)
