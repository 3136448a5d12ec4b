"""`RBLNAutoModelForCausalLM`: pick the RBLN class from config.model_type, as transformers' Auto
classes do."""
from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoConfig

from .configuration import CONFIG_NAME, RBLNConfig, RBLNConfigError
from .decoder_only.modeling import (RBLNLlamaForCausalLM, RBLNMistralForCausalLM, RBLNQwen2ForCausalLM,
                                    RBLNQwen3ForCausalLM)

CAUSAL_LM = {"llama": RBLNLlamaForCausalLM, "qwen2": RBLNQwen2ForCausalLM,
             "qwen3": RBLNQwen3ForCausalLM, "mistral": RBLNMistralForCausalLM}


class RBLNAutoModelForCausalLM:
    @classmethod
    def from_pretrained(cls, model_id: str | os.PathLike, *args, **kwargs):
        folder = Path(model_id)
        if (folder / CONFIG_NAME).is_file():
            model_type = RBLNConfig.load(folder).model_type
        else:
            keep = {k: v for k, v in kwargs.items() if k in ("gguf_file", "trust_remote_code")}
            model_type = AutoConfig.from_pretrained(model_id, **keep).model_type
        if model_type not in CAUSAL_LM:
            raise RBLNConfigError(f"no RBLN causal-LM class for model type {model_type!r}; "
                                  f"supported: {', '.join(sorted(CAUSAL_LM))}")
        return CAUSAL_LM[model_type].from_pretrained(model_id, *args, **kwargs)
