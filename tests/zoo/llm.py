"""A decode step of a transformers causal LM, shaped for compilation.

The KV cache of `past` tokens is held as persistent buffers (device DRAM, like the chip's KV
cache), handed to the model as a DynamicCache; one new token attends to past + 1 positions.
Built on the meta device, this sizes models too large for this machine (Llama-3-8B).
"""
from __future__ import annotations

import torch


class DecodeStep(torch.nn.Module):
    def __init__(self, model, past: int):
        super().__init__()
        self.model = model
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        shape = (1, c.num_key_value_heads, past, head_dim)
        for i in range(c.num_hidden_layers):
            self.register_buffer(f"past_key_{i}", torch.zeros(shape, device=model.device))
            self.register_buffer(f"past_value_{i}", torch.zeros(shape, device=model.device))

    def forward(self, input_ids, position_ids):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.model.config.num_hidden_layers):
            cache.update(getattr(self, f"past_key_{i}"), getattr(self, f"past_value_{i}"), i)
        return self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache,
                          use_cache=True).logits


def llama3_8b_config():
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                       max_position_embeddings=8192, rope_theta=500000.0)


def llama_decode_step(config, past: int, device: str = "cpu"):
    """(module, example inputs) of one decode step after `past` tokens."""
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    step = DecodeStep(model, past)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.full((1, 1), past, dtype=torch.long, device=device)
    return step, [ids, pos]
