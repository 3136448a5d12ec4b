"""Vendor encoder, vision and audio classes: compile with the vendor's class, save, reload in a
fresh process, run, and match the FP32 transformers model.

Each case builds a tiny random-weight model from a config (no downloads), compiles it with
`RBLNXxx.from_pretrained(folder, export=True, rbln_...)`, saves it, reloads it with
`export=False` in the reload worker, and compares the named outputs with the FP32 model's.
Every compiled graph's host-fallback count is asserted (0: all ops on the device).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import optimum.rbln
from compat_support import assert_close, assert_host_fallbacks


def _ids(batch=1, seq=16, vocab=100, seed=0):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _mask(batch=1, seq=16, pad=4):
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[:, seq - pad:] = 0  # right padding: the attention-mask path runs
    return mask


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _text(**kw):
    base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64)
    base.update(kw)
    return base


def _text_inputs(token_type_ids=True):
    ids = _ids()
    inputs = {"input_ids": ids, "attention_mask": _mask()}
    if token_type_ids:
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


@dataclass
class Case:
    cls: str                                   # the vendor's class, in optimum.rbln
    build: Callable[[], torch.nn.Module]       # FP32 transformers model with random weights
    inputs: Callable[[], dict]                 # keyword inputs, the same for both models
    compare: dict[str, Callable]               # vendor output key -> FP32 output -> tensor
    rbln: dict = field(default_factory=dict)   # rbln_* compile options
    host_fallbacks: dict = field(default_factory=dict)  # graph file -> count (default 0)

    def __str__(self):
        return self.cls


def _m(name):
    import transformers
    return getattr(transformers, name)


def _bert_cfg():
    return _m("BertConfig")(**_text())


def _roberta_cfg():
    return _m("RobertaConfig")(**_text(pad_token_id=1))


def _xlmr_cfg():
    return _m("XLMRobertaConfig")(**_text(pad_token_id=1))


def _distilbert_cfg():
    return _m("DistilBertConfig")(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                  max_position_embeddings=64)


def _vit_cfg():
    return _m("ViTConfig")(**_text(), image_size=32, patch_size=8, num_labels=5)


def _resnet_cfg():
    return _m("ResNetConfig")(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                              layer_type="basic", num_labels=5)


def _clip_text_cfg():
    # the vendor compiles CLIP text at max_position_embeddings tokens
    return _m("CLIPTextConfig")(**_text(max_position_embeddings=16), projection_dim=24)


def _clip_vision_cfg():
    return _m("CLIPVisionConfig")(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, image_size=32, patch_size=8,
                                  projection_dim=24)


def _siglip_vision_cfg():
    return _m("SiglipVisionConfig")(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)


def _t5_cfg():
    return _m("T5Config")(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                          use_cache=False)


def _ast_cfg():
    return _m("ASTConfig")(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, patch_size=16, frequency_stride=10, time_stride=10,
                           max_length=64, num_mel_bins=32, num_labels=5)


def _wav2vec2_cfg():
    return _m("Wav2Vec2Config")(vocab_size=32, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
                                conv_stride=(5, 2), conv_kernel=(10, 3),
                                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                                do_stable_layer_norm=False)


def _swin_cfg():
    return _m("SwinConfig")(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                            num_heads=[1, 2], window_size=4, out_features=["stage1", "stage2"])


def _dpt_cfg():
    return _m("DPTConfig")(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                           intermediate_size=64, image_size=32, patch_size=8,
                           backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                           fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5],
                           head_in_index=-1, initializer_range=0.1)  # 0.02 gives depths ~1e-8


def _modernbert_cfg():
    return _m("ModernBertConfig")(vocab_size=100, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2,
                                  max_position_embeddings=64, local_attention=8, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)


def _pixels():
    return {"pixel_values": _rand(1, 3, 32, 32)}


def _get(attr):
    return lambda out: getattr(out, attr)


CASES = [
    Case("RBLNBertModel", lambda: _m("BertModel")(_bert_cfg()), _text_inputs,
         {"last_hidden_state": _get("last_hidden_state"), "pooler_output": _get("pooler_output")},
         {"rbln_max_seq_len": 16}),
    Case("RBLNBertForMaskedLM", lambda: _m("BertForMaskedLM")(_bert_cfg()), _text_inputs,
         {"logits": _get("logits")}, {"rbln_max_seq_len": 16}),
    Case("RBLNBertForQuestionAnswering", lambda: _m("BertForQuestionAnswering")(_bert_cfg()),
         _text_inputs, {"start_logits": _get("start_logits"), "end_logits": _get("end_logits")},
         {"rbln_max_seq_len": 16}),
    Case("RBLNRobertaForMaskedLM", lambda: _m("RobertaForMaskedLM")(_roberta_cfg()),
         lambda: _text_inputs(False), {"logits": _get("logits")}, {"rbln_max_seq_len": 16}),
    Case("RBLNRobertaForSequenceClassification",
         lambda: _m("RobertaForSequenceClassification")(_roberta_cfg()),
         lambda: _text_inputs(False), {"logits": _get("logits")}, {"rbln_max_seq_len": 16}),
    Case("RBLNXLMRobertaModel", lambda: _m("XLMRobertaModel")(_xlmr_cfg()),
         lambda: _text_inputs(False), {"last_hidden_state": _get("last_hidden_state")},
         {"rbln_max_seq_len": 16}),
    Case("RBLNXLMRobertaForSequenceClassification",
         lambda: _m("XLMRobertaForSequenceClassification")(_xlmr_cfg()),
         lambda: _text_inputs(False), {"logits": _get("logits")}, {"rbln_max_seq_len": 16}),
    Case("RBLNDistilBertForQuestionAnswering",
         lambda: _m("DistilBertForQuestionAnswering")(_distilbert_cfg()),
         lambda: _text_inputs(False),
         {"start_logits": _get("start_logits"), "end_logits": _get("end_logits")},
         {"rbln_max_seq_len": 16}),
    Case("RBLNModernBertForMaskedLM", lambda: _m("ModernBertForMaskedLM")(_modernbert_cfg()),
         lambda: _text_inputs(False), {"logits": _get("logits")}, {"rbln_max_seq_len": 16}),
    Case("RBLNViTForImageClassification", lambda: _m("ViTForImageClassification")(_vit_cfg()),
         _pixels, {"logits": _get("logits")}, {"rbln_image_size": 32}),
    Case("RBLNResNetForImageClassification",
         lambda: _m("ResNetForImageClassification")(_resnet_cfg()), _pixels,
         {"logits": _get("logits")}, {"rbln_image_size": 32}),
    # The vendor labels CLIPTextModel's two outputs the other way round (its bug, see the notes):
    # its "text_embeds" is the FP32 last_hidden_state and its "last_hidden_state" the pooler output.
    Case("RBLNCLIPTextModel", lambda: _m("CLIPTextModel")(_clip_text_cfg()),
         lambda: {"input_ids": _ids()},
         {"text_embeds": _get("last_hidden_state"), "last_hidden_state": _get("pooler_output")}),
    Case("RBLNCLIPTextModelWithProjection",
         lambda: _m("CLIPTextModelWithProjection")(_clip_text_cfg()), lambda: {"input_ids": _ids()},
         {"text_embeds": _get("text_embeds"), "last_hidden_state": _get("last_hidden_state")}),
    Case("RBLNCLIPVisionModel", lambda: _m("CLIPVisionModel")(_clip_vision_cfg()), _pixels,
         {"last_hidden_state": _get("last_hidden_state"), "pooler_output": _get("pooler_output")}),
    Case("RBLNCLIPVisionModelWithProjection",
         lambda: _m("CLIPVisionModelWithProjection")(_clip_vision_cfg()), _pixels,
         {"image_embeds": _get("image_embeds"), "last_hidden_state": _get("last_hidden_state")}),
    Case("RBLNSiglipVisionModel", lambda: _m("SiglipVisionModel")(_siglip_vision_cfg()), _pixels,
         {"last_hidden_state": _get("last_hidden_state"), "pooler_output": _get("pooler_output")}),
    Case("RBLNT5EncoderModel", lambda: _m("T5EncoderModel")(_t5_cfg()),
         lambda: {"input_ids": _ids(), "attention_mask": _mask()},
         {"last_hidden_state": _get("last_hidden_state")}, {"rbln_max_seq_len": 16}),
    Case("RBLNASTForAudioClassification",
         lambda: _m("ASTForAudioClassification")(_ast_cfg()),
         lambda: {"input_values": _rand(1, 64, 32)}, {"logits": _get("logits")},
         {"rbln_max_length": 64}),
    Case("RBLNWav2Vec2ForCTC", lambda: _m("Wav2Vec2ForCTC")(_wav2vec2_cfg()),
         lambda: {"input_values": _rand(1, 400)}, {"logits": _get("logits")},
         {"rbln_max_seq_len": 400}),
    Case("RBLNSwinBackbone", lambda: _m("SwinBackbone")(_swin_cfg()), _pixels,
         {"feature_maps.0": lambda o: o.feature_maps[0], "feature_maps.1": lambda o: o.feature_maps[1]},
         {"rbln_image_size": 32}),
    Case("RBLNDPTForDepthEstimation", lambda: _m("DPTForDepthEstimation")(_dpt_cfg()), _pixels,
         {"predicted_depth": _get("predicted_depth")}, {"rbln_image_size": 32}),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_vendor_encoder(case: Case, tmp_path, reloader):
    torch.manual_seed(0)
    model = case.build().eval()
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "rbln"
    model.save_pretrained(hf_dir)
    compiled = getattr(optimum.rbln, case.cls).from_pretrained(
        hf_dir, export=True, rbln_create_runtimes=False, **case.rbln)
    compiled.save_pretrained(out_dir)
    del compiled
    assert_host_fallbacks(out_dir, case.host_fallbacks)

    inputs = case.inputs()
    got = reloader.run(case.cls, out_dir, **inputs)
    with torch.no_grad():
        want = model(**inputs)
    for key, pick in case.compare.items():
        assert key in got, f"{case.cls} returned {sorted(got)}, no {key!r}"
        assert_close(got[key], pick(want), f"{case.cls} {key}")
