"""Vendor decoder-only LLM classes: compile with the vendor's class, save, reload in a fresh
process, generate greedily, and match the FP32 transformers model's greedy tokens.

Each case builds a tiny random-weight model from a config (no downloads; initializer_range is
raised so the FP32 logits have real top-2 margins), compiles it with
`RBLNXxx.from_pretrained(folder, export=True, rbln_...)`, saves it, reloads it with `export=False`
in the reload worker and calls `generate`. Tokens must equal FP32 `generate`'s, or every
disagreement must sit where the FP32 model itself hesitates (top-2 margin below 0.1). Every
compiled graph's host-fallback count is asserted (0: all ops on the device).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import optimum.rbln
from compat_support import (assert_greedy_matches, assert_host_fallbacks, decoder_only_logits,
                            left_padded_prompts)

VOCAB = 256
NEW_TOKENS = 8


def _m(name):
    import transformers
    return getattr(transformers, name)


def _llm(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False)
    base.update(kw)
    return base


@dataclass
class Case:
    id: str
    cls: str                                  # the vendor's class, in optimum.rbln
    build: Callable[[], torch.nn.Module]      # FP32 transformers model with random weights
    rbln: dict = field(default_factory=dict)  # rbln_* compile options
    lengths: tuple = (12, 7)                  # prompt lengths (a batch, left-padded)
    graphs: int | None = None                 # compiled graphs save_pretrained writes
    check: Callable | None = None             # extra check on the saved rbln_config.json

    def __str__(self):
        return self.id


def _flash_blocks(cfg: dict):
    """kvcache_num_blocks was unset: the vendor sized it from our memory queries. The whole
    cache fits a 16 GiB die, so it must come out as every block the batch can use."""
    want = cfg["max_seq_len"] // cfg["kvcache_block_size"] * cfg["batch_size"]
    assert cfg["kvcache_block_size"] == cfg["kvcache_partition_len"] == 1024
    assert cfg["kvcache_num_blocks"] == want, cfg


CASES = [
    Case("llama-b2-left-padded", "RBLNLlamaForCausalLM", lambda: _m("LlamaForCausalLM")(_m("LlamaConfig")(**_llm())),
         {"rbln_batch_size": 2, "rbln_max_seq_len": 128}, graphs=2),
    Case("llama-flash-auto-blocks", "RBLNLlamaForCausalLM",
         lambda: _m("LlamaForCausalLM")(_m("LlamaConfig")(**_llm(max_position_embeddings=2048))),
         {"rbln_batch_size": 1, "rbln_max_seq_len": 2048, "rbln_attn_impl": "flash_attn",
          "rbln_kvcache_partition_len": 1024}, lengths=(10,), check=_flash_blocks),
    Case("llama-tp2", "RBLNLlamaForCausalLM", lambda: _m("LlamaForCausalLM")(_m("LlamaConfig")(**_llm())),
         {"rbln_batch_size": 1, "rbln_max_seq_len": 128, "rbln_tensor_parallel_size": 2}, lengths=(9,)),
    Case("qwen3-two-prefill-chunks", "RBLNQwen3ForCausalLM",
         lambda: _m("Qwen3ForCausalLM")(_m("Qwen3Config")(**_llm())),
         {"rbln_batch_size": 1, "rbln_max_seq_len": 256, "rbln_prefill_chunk_size": 64}, lengths=(100,)),
    Case("gpt2", "RBLNGPT2LMHeadModel",
         lambda: _m("GPT2LMHeadModel")(_m("GPT2Config")(
             vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)),
         {"rbln_batch_size": 1, "rbln_max_seq_len": 128}, lengths=(11,)),
    Case("gemma", "RBLNGemmaForCausalLM",
         lambda: _m("GemmaForCausalLM")(_m("GemmaConfig")(**_llm(tie_word_embeddings=True))),
         {"rbln_batch_size": 1, "rbln_max_seq_len": 128}, lengths=(11,)),
    Case("qwen3-moe", "RBLNQwen3MoeForCausalLM",
         lambda: _m("Qwen3MoeForCausalLM")(_m("Qwen3MoeConfig")(**_llm(
             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1,
             norm_topk_prob=True, mlp_only_layers=[]))),
         {"rbln_batch_size": 1, "rbln_max_seq_len": 128}, lengths=(11,)),
]


def _compile(case: Case, tmp_path):
    torch.manual_seed(0)
    model = case.build().eval()
    hf_dir, out_dir = tmp_path / "hf", tmp_path / "rbln"
    model.save_pretrained(hf_dir)
    compiled = getattr(optimum.rbln, case.cls).from_pretrained(
        hf_dir, export=True, rbln_create_runtimes=False, **case.rbln)
    compiled.save_pretrained(out_dir)
    del compiled
    return model, out_dir


@pytest.mark.parametrize("case", CASES, ids=str)
def test_vendor_decoder_generate(case: Case, tmp_path, reloader):
    model, out_dir = _compile(case, tmp_path)
    assert_host_fallbacks(out_dir, graphs=case.graphs)
    if case.check is not None:
        case.check(json.loads((out_dir / "rbln_config.json").read_text()))

    ids, mask = left_padded_prompts(case.lengths, VOCAB, pad_id=0)
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)
    got = reloader.run(case.cls, out_dir, ids, method="generate", attention_mask=mask, **gen)[""]
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, **gen)
    assert_greedy_matches(got, want, ids.shape[1], decoder_only_logits(model, mask), case.id)


def _tiny_llama():
    torch.manual_seed(0)
    return _m("LlamaForCausalLM")(_m("LlamaConfig")(**_llm())).eval()


def _unique_bytes(tensors) -> int:
    """16-bit bytes of the distinct tensors (equal contents stored once: weight sharing is by
    content, so the all-ones RMSNorm weights of every layer are one copy)."""
    seen = {}
    for t in tensors:
        h = t.detach().half().contiguous()
        seen.setdefault((tuple(h.shape), h.numpy().tobytes()), h.numel() * 2)
    return sum(seen.values())


def test_decoder_dram_is_one_weight_copy_plus_kv_cache(tmp_path):
    """Prefill and decode are two graphs and two runtimes of one compile context with weight
    sharing: the die holds the weights once and the KV cache once; per runtime only its own
    activation area."""
    from rebel.device.memory import device_memory, reset_memory
    from rebel.runtime import device_state

    model = _tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    reset_memory()
    compiled = optimum.rbln.RBLNLlamaForCausalLM.from_pretrained(
        tmp_path / "hf", export=True, rbln_batch_size=2, rbln_max_seq_len=128)
    try:
        cfg, c = compiled.rbln_config, model.config
        used = device_memory(0).used
        # the weights once, plus the constants the vendor's wrapper adds to the graph: the
        # rotary cos/sin tables (max_seq_len x head_dim each) and the attention scale
        weights = (_unique_bytes(model.parameters()) + 2 * cfg.max_seq_len * c.head_dim * 2 + 2)
        kv_cache = (2 * c.num_hidden_layers * cfg.kvcache_num_blocks * c.num_key_value_heads
                    * cfg.kvcache_block_size * c.head_dim * 2)
        activations = sum(m.get_alloc_per_chiplet_by_key()["Activation"][0][0]
                          for m in compiled.compiled_models)
        states = [s for s in device_state.states() if s.devices == (0,)]
        assert len(states) == 1 and states[0].runtimes == 2, [(s.context_id, s.runtimes) for s in states]
        assert sum(states[0].static_bytes.values()) == kv_cache, states[0].static_bytes
        assert used == weights + kv_cache + activations, (
            f"device DRAM {used} B != weights {weights} + KV cache {kv_cache} + activations "
            f"{activations} (two runtimes)")
    finally:
        del compiled
        reset_memory()


def test_decoder_too_large_for_device_dram(tmp_path, monkeypatch):
    """A model whose weights, KV cache and activations exceed the die's DRAM: the vendor layer's
    runtime creation gets our DeviceMemoryError (which it wraps) naming what did not fit and how much was free
    (not a crash, not a silent success). The die here is an RBLN-CA12 whose DRAM a spec file
    shrinks to 256 KiB; the tiny Llama needs about 540 KiB."""
    import rebel
    from rebel.device.memory import reset_memory
    from rebel.npu.machine import reset_machine

    spec = tmp_path / "small-dram.toml"
    spec.write_text('base = "RBLN-CA12"\n\n[die.memory]\ndram_gib = 0.000244140625\n'
                    'dram_reserved_mib = 0.001\n')
    model = _tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    monkeypatch.setenv("RBLN_VIRTUAL_NPU", str(spec))
    reset_machine()
    reset_memory()
    try:
        # the vendor re-raises it as "Failed to create RBLN runtime: <our message>"
        with pytest.raises(RuntimeError, match=r"needs .* of device DRAM but rbln:0 has") as err:
            optimum.rbln.RBLNLlamaForCausalLM.from_pretrained(
                tmp_path / "hf", export=True, rbln_batch_size=2, rbln_max_seq_len=128)
        cause = err.value if isinstance(err.value, rebel.DeviceMemoryError) else err.value.__cause__
        assert isinstance(cause, rebel.DeviceMemoryError), repr(err.value)
    finally:
        monkeypatch.delenv("RBLN_VIRTUAL_NPU")
        reset_machine()
        reset_memory()
