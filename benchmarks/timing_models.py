"""The whole models of the timing check (`validate_timing.py` rows of kind "model"), built on the
meta device (shapes, no weights) exactly as the measurement ran them: transformers `BertModel`
(bert-large), a ResNet-50 (transformers `ResNetForImageClassification` at its default config,
which is ResNet-50, with the 1000-class head torchvision's resnet50 has) and `LlamaForCausalLM`
at the Llama-3-8B shape (`use_cache=False`, `logits_to_keep=1`: a prefill that returns the last
token's logits).

A record may carry `"config": {...}`, overrides of the architecture (e.g. `num_hidden_layers`),
so tests can run the same path on a tiny model.
"""
from __future__ import annotations

import torch

MODELS = ("bert-large", "resnet50", "llama3-8b-shape")

BERT_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096)
LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                 max_position_embeddings=8192, rope_theta=500000.0)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class LastLogits(torch.nn.Module):
    """A causal LM's prefill as the measurement called it: no KV cache kept, logits of the last
    token only (the LM head runs on one row, not S)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def build_model(rec: dict):
    """(module, example inputs, device dtype name) for one model record."""
    from transformers import (BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, ResNetConfig,
                              ResNetForImageClassification)

    name = rec.get("model")
    dtype_name = rec.get("dtype", "bfloat16")
    if dtype_name not in DTYPES:
        raise ValueError(f"model record {name!r}: dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
    dtype = DTYPES[dtype_name]
    overrides = dict(rec.get("config", {}))
    needs = ("B",) if name == "resnet50" else ("B", "S")
    missing = [k for k in needs if k not in rec]
    if name in MODELS and missing:
        raise ValueError(f"model record {name!r} lacks {', '.join(missing)}")
    b = int(rec.get("B", 0))
    with torch.device("meta"):
        if name == "bert-large":
            config = BertConfig(**{**BERT_LARGE, **overrides}, attn_implementation="sdpa")
            module = BertModel(config)
            inputs = [_meta(b, int(rec["S"]), dtype=torch.long)]
        elif name == "resnet50":
            config = ResNetConfig(**{"num_labels": 1000, **overrides})
            module = ResNetForImageClassification(config)
            size = int(rec.get("image", 224))
            inputs = [_meta(b, config.num_channels, size, size, dtype=dtype)]
        elif name == "llama3-8b-shape":
            config = LlamaConfig(**{**LLAMA3_8B, **overrides}, attn_implementation="sdpa")
            module = LastLogits(LlamaForCausalLM(config))
            inputs = [_meta(b, int(rec["S"]), dtype=torch.long)]
        else:
            raise ValueError(f"unknown model {name!r} in a record of kind 'model'; known: {', '.join(MODELS)}")
        module = module.to(dtype).eval()
    return module, inputs, dtype_name
