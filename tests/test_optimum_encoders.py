"""optimum.rbln encoders: BERT base model and sequence classification against FP32."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, BertConfig

from optimum.rbln import RBLNBertForSequenceClassification, RBLNBertModel
from rebel import InputError

CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              vocab_size=500, max_position_embeddings=128, num_labels=3)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(BertConfig(**CONFIG)).save_pretrained(folder)
    return folder


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 500, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    return ids, mask


def test_sequence_classification_matches_fp32(bert_dir, tmp_path):
    model = RBLNBertForSequenceClassification.from_pretrained(bert_dir, export=True, rbln_batch_size=2,
                                                              rbln_max_seq_len=32)
    ids, mask = batch()
    reference = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    logits = model(ids, attention_mask=mask).logits
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, expected, atol=5e-3, rtol=5e-3)
    reloaded = RBLNBertForSequenceClassification.from_pretrained(model.save_pretrained(tmp_path / "c"))
    assert torch.equal(reloaded(ids, attention_mask=mask).logits, logits)


def test_base_model_hidden_states(bert_dir):
    model = RBLNBertModel.from_pretrained(bert_dir, export=True, rbln_batch_size=2, rbln_max_seq_len=32)
    ids, mask = batch()
    reference = AutoModel.from_pretrained(bert_dir).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask)
    out = model(ids, attention_mask=mask)
    assert out.last_hidden_state.shape == (2, 20, 64)
    valid = mask.bool()
    torch.testing.assert_close(out.last_hidden_state[valid], expected.last_hidden_state[valid],
                               atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.pooler_output, expected.pooler_output, atol=1e-2, rtol=1e-2)


def test_input_larger_than_compiled(bert_dir):
    model = RBLNBertModel.from_pretrained(bert_dir, export=True, rbln_batch_size=1, rbln_max_seq_len=16)
    with pytest.raises(InputError, match=r"input of shape \[1, 20\] does not fit"):
        model(torch.ones(1, 20, dtype=torch.long))
