"""A decoder LLM from its Hugging Face `config.json` alone, on meta tensors (shapes, no weights).

A planner has a config, not weights: the model is transformers' own class for the config's
`model_type`, built on the meta device, so the compiler sees exactly the graph a real checkpoint
would give (GQA, tied embeddings, Qwen3's per-head norms come from the class, not from copies of
it here). `num_layers` builds a shallower copy of the same model, which is how the predictor
compiles 1 and 2 layers and extrapolates.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PlanError

# model_type -> transformers causal-LM class name. Dense decoders whose attention goes through
# transformers' AttentionInterface, which the paged model (rebel.plan.paged) plugs into.
SUPPORTED = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
             "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
             "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
             "mixtral": "MixtralForCausalLM"}
# Mixture-of-experts decoders: model_type -> (key of the expert count, key of each expert's
# intermediate size). Their experts run as grouped GEMMs (rebel.plan.moe).
MOE = {"qwen3_moe": ("num_experts", "moe_intermediate_size"),
       "qwen2_moe": ("num_experts", "moe_intermediate_size"),
       "mixtral": ("num_local_experts", "intermediate_size")}
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "vocab_size")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelShape:
    """The figures of a config the planner reasons with (memory, TP divisibility)."""

    model_type: str
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    max_position_embeddings: int | None
    experts: int = 0              # routed experts per MoE layer (0: a dense MLP)
    top_k: int = 0                # experts each token is routed to
    moe_intermediate: int = 0     # each expert's intermediate size
    shared_intermediate: int = 0  # an always-on shared expert's (Qwen2-MoE), 0 if none

    @property
    def params(self) -> int:
        """Parameter count (norms included, biases ignored; every expert), for the plan's
        header line and the memory bounds."""
        return self._params(self.experts)

    @property
    def active_params(self) -> int:
        """Parameters one token computes with: its top-k experts instead of all of them."""
        return self._params(self.top_k)

    def _params(self, experts: int) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        if self.experts:
            mlp = experts * 3 * self.hidden * self.moe_intermediate + self.experts * self.hidden
            if self.shared_intermediate:
                mlp += 3 * self.hidden * self.shared_intermediate + self.hidden  # and its gate
        else:
            mlp = 3 * self.hidden * self.intermediate
        per_layer = attn + mlp + 2 * self.hidden
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * per_layer + embed + self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int, tp: int = 1) -> int:
        """KV-cache bytes one die holds per token of context, all layers (K and V)."""
        return self.layers * 2 * math.ceil(self.kv_heads / tp) * self.head_dim * dtype_bytes


def read_json(p: Path, what: str = "JSON config") -> dict:
    """The JSON object in file `p`; PlanError naming the file otherwise."""
    try:
        table = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PlanError(f"{p} is not a readable {what}: {e}") from None
    if not isinstance(table, dict):
        raise PlanError(f"{p} must hold a JSON object, got {type(table).__name__}")
    return table


def read_table(path: str | Path) -> dict:
    """config.json of `path` (the file or its folder; or a dict, copied) as a dict, unchecked,
    `_name` set to the folder's name."""
    if isinstance(path, dict):
        return dict(path)
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise PlanError(f"no Hugging Face config at {str(path)!r} (give a config.json or a folder "
                        "holding one)")
    table = read_json(p)
    table.setdefault("_name", p.parent.name if p.name == "config.json" else p.stem)
    return table


def read_config(path: str | Path) -> dict:
    """The config.json of `path` (the file itself, or a folder holding one) as a dict, checked
    for what a decoder LLM needs; PlanError naming the problem otherwise."""
    p = Path(path)
    return check_config(read_table(p), str(p / "config.json" if p.is_dir() else p))


def load_config(config) -> dict:
    """A config given as a path (file or folder) or as a dict of config.json's keys, checked."""
    if isinstance(config, dict):
        return check_config(dict(config), "the config")
    return read_config(config)


def check_config(table: dict, p: str) -> dict:
    """The table if it describes a supported decoder LLM; PlanError naming the problem."""
    model_type = table.get("model_type")
    if model_type is None:
        raise PlanError(f"{p} has no 'model_type'; a Hugging Face config names its architecture "
                        f"there (supported: {', '.join(sorted(SUPPORTED))})")
    if model_type not in SUPPORTED:
        raise PlanError(f"model_type {model_type!r} ({p}) is not supported by the planner yet; "
                        f"supported decoder LLMs: {', '.join(sorted(SUPPORTED))}")
    missing = [k for k in REQUIRED if k not in table]
    if missing:
        raise PlanError(f"{p} ({model_type}) lacks {', '.join(missing)}")
    for key in (*REQUIRED, "num_key_value_heads", "head_dim"):
        value = table.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise PlanError(f"{p}: {key} must be a positive integer, got {value!r}")
    heads = table["num_attention_heads"]
    kv = table.get("num_key_value_heads") or heads
    if heads % kv:
        raise PlanError(f"{p}: {heads} attention heads are not a multiple of {kv} KV heads")
    if table.get("head_dim") is None and table["hidden_size"] % heads:
        raise PlanError(f"{p}: hidden_size {table['hidden_size']} is not a multiple of "
                        f"{heads} heads and no head_dim is given")
    if model_type in MOE:
        _check_moe(table, p)
    return table


def _check_moe(table: dict, p: str) -> None:
    """A MoE config's expert figures, and layers that are all alike (the predictor compiles 1
    and 2 layers and extrapolates, which a mix of dense and MoE layers would break)."""
    count_key, inter_key = MOE[table["model_type"]]
    keys = [count_key, "num_experts_per_tok", inter_key]
    if table["model_type"] == "qwen2_moe":  # transformers would add a default-sized one
        keys.append("shared_expert_intermediate_size")
    missing = [k for k in keys if k not in table]
    if missing:
        raise PlanError(f"{p} ({table['model_type']}) lacks {', '.join(missing)}")
    for key in keys:
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise PlanError(f"{p}: {key} must be a positive integer, got {value!r}")
    if table["num_experts_per_tok"] > table[count_key]:
        raise PlanError(f"{p}: num_experts_per_tok {table['num_experts_per_tok']} exceeds the "
                        f"{table[count_key]} experts")
    if table.get("mlp_only_layers") or table.get("decoder_sparse_step", 1) != 1:
        raise PlanError(f"{p}: mixes dense and MoE layers (mlp_only_layers "
                        f"{table.get('mlp_only_layers')!r}, decoder_sparse_step "
                        f"{table.get('decoder_sparse_step')!r}); the planner needs every layer alike")


def shape_of(table: dict) -> ModelShape:
    heads = table["num_attention_heads"]
    tied = table.get("tie_word_embeddings")
    if tied is None:  # transformers' class defaults: Qwen2/3 configs say so explicitly anyway
        tied = False
    return ModelShape(
        model_type=table["model_type"], name=str(table.get("_name", table["model_type"])),
        layers=table["num_hidden_layers"], hidden=table["hidden_size"], heads=heads,
        kv_heads=table.get("num_key_value_heads") or heads,
        head_dim=table.get("head_dim") or table["hidden_size"] // heads,
        intermediate=table["intermediate_size"], vocab=table["vocab_size"],
        tied_embeddings=bool(tied), max_position_embeddings=table.get("max_position_embeddings"),
        **_moe_shape(table))


def _moe_shape(table: dict) -> dict:
    if table["model_type"] not in MOE:
        return {}
    count_key, inter_key = MOE[table["model_type"]]
    return {"experts": table[count_key], "top_k": table["num_experts_per_tok"],
            "moe_intermediate": table[inter_key],
            "shared_intermediate": table.get("shared_expert_intermediate_size") or 0}


def hf_config(table: dict, num_layers: int | None = None):
    """transformers' config object for the table, optionally with fewer layers."""
    from transformers import AutoConfig

    values = {k: v for k, v in table.items() if not k.startswith("_") and k not in (
        "model_type", "architectures", "transformers_version", "torch_dtype", "dtype",
        "auto_map", "quantization_config")}
    if num_layers is not None:
        values["num_hidden_layers"] = num_layers
        if isinstance(values.get("layer_types"), list):
            values["layer_types"] = values["layer_types"][:num_layers]
    values["attn_implementation"] = "sdpa"
    try:
        return AutoConfig.for_model(table["model_type"], **values)
    except (TypeError, ValueError, KeyError) as e:
        raise PlanError(f"transformers rejects the {table['model_type']} config: {e}") from None


def build_meta_model(table: dict, num_layers: int | None = None, dtype: str = "float16"):
    """transformers' causal LM for the config on the meta device, in the device dtype."""
    import transformers

    if dtype not in DTYPES:
        raise PlanError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    cls = getattr(transformers, SUPPORTED[table["model_type"]])
    config = hf_config(table, num_layers)
    with torch.device("meta"):
        model = cls(config).to(DTYPES[dtype]).eval()
    if table["model_type"] in MOE:
        from .moe import use_grouped_experts

        use_grouped_experts(model)
    return model
