"""vllm_rbln Path B (`VLLM_RBLN_USE_VLLM_MODEL=1`): vLLM's own Llama class on a Hugging Face
folder, compiled by torch.compile(backend="rbln"), attending through the device's paged attention
op on vLLM's KV cache. Its greedy tokens must be those of optimum.rbln's compiled model on the
same weights (or differ only where the FP32 model's top-2 logits are within 0.1), at tensor
parallel sizes 1 and 3 (the model has SmolLM2's head layout: 9 query heads, 3 KV heads); a
second process loads every graph from the compile cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vllm_rbln needs vLLM: pip install 'open-rbln[vllm]'")

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig  # noqa: E402

from optimum.rbln import RBLNLlamaForCausalLM  # noqa: E402
from optimum.rbln.offline import smollm2_folder  # noqa: E402
from vllm_rbln.vllm_model_runner import bucket_for, buckets  # noqa: E402

SERVE = Path(__file__).with_name("vllm_pathb_serve.py")
OPTIONS = dict(rbln_batch_size=4, rbln_max_seq_len=128, rbln_kvcache_partition_len=32,
               rbln_prefill_chunk_size=16, rbln_decoder_batch_sizes=[1, 2, 4])
ENGINE = dict(device="rbln", max_num_seqs=4, max_model_len=128, block_size=32,
              max_num_batched_tokens=256)
NEW = 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small random Llama with SmolLM2's head layout (9 heads, 3 KV heads) and tokenizer."""
    root = tmp_path_factory.mktemp("pathb")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=144, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=256, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    AutoTokenizer.from_pretrained(smollm2_folder()).save_pretrained(root / "hf")
    return root / "hf"


def prompts() -> list[list[int]]:
    """Prompts of 5, 20, 37 and 70 tokens: past a KV block, four decoding together."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, 49000, (n,), generator=g).tolist() for n in (5, 20, 37, 70)]


@pytest.fixture(scope="module")
def expected(folder) -> list[list[int]]:
    """optimum.rbln's compiled model on the same weights (Path A's graphs)."""
    model = RBLNLlamaForCausalLM.from_pretrained(folder, export=True, **OPTIONS)
    return [model.generate(torch.tensor([p]), max_new_tokens=NEW, eos_token_id=[])[0, len(p):]
            .tolist() for p in prompts()]


def serve(tmp_path: Path, folder: Path, cache: Path, **engine) -> dict:
    request = tmp_path / f"request{len(list(tmp_path.glob('request*')))}.json"
    request.write_text(json.dumps({"llm": {"model": str(folder), **ENGINE, **engine},
                                   "prompts": prompts(), "max_tokens": NEW}))
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_RBLN_USE_VLLM_MODEL": "1", "VLLM_RBLN_CACHE_DIR": str(cache)}
    run = subprocess.run([sys.executable, str(SERVE), str(request)], capture_output=True,
                         text=True, timeout=900, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(lines[-1][len("RESULT "):])


def assert_same_greedy(folder: Path, got: list[list[int]], want: list[list[int]]) -> None:
    """Equal tokens, or the first disagreement of a sequence where the FP32 model's two best
    logits are within 0.1 (a tie the 16-bit device may break either way); later tokens of that
    sequence follow a different prefix and are not compared."""
    model = None
    for prompt, a, b in zip(prompts(), got, want):
        assert len(a) == len(b) == NEW
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if i is None:
            continue
        model = model or AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            logits = model(torch.tensor([prompt + a[:i]])).logits[0, -1]
        top = logits.topk(2).values
        assert float(top[0] - top[1]) < 0.1, (i, a, b, float(top[0] - top[1]))


def test_buckets_and_padding():
    assert buckets(4, 256) == [1, 2, 4, 256]
    assert buckets(6, 256) == [1, 2, 4, 6, 256]
    assert [bucket_for([1, 2, 4, 256], n) for n in (1, 2, 3, 4, 5, 256)] == [1, 2, 4, 4, 256, 256]
    with pytest.raises(ValueError, match="exceeds max_num_batched_tokens"):
        bucket_for([1, 2, 4, 256], 257)


def test_slot_mapping_matches_vllm_formula():
    """The PyTorch slot mapping (vLLM's Triton kernel has no CPU target) on a two-request step."""
    from types import SimpleNamespace

    from vllm.v1.attention.backends.utils import PAD_SLOT_ID
    from vllm_rbln.vllm_model_runner import _slot_mapping

    table = SimpleNamespace(block_size=4, slot_mapping=SimpleNamespace(gpu=torch.zeros(10, dtype=torch.long)),
                            block_table=SimpleNamespace(gpu=torch.tensor([[3, 5, 0], [7, 2, 6]])))
    positions = torch.tensor([2, 3, 4, 5, 7, 8, 0, 0])  # request 0: 2..5; request 1: 7, 8
    _slot_mapping(table, 2, torch.tensor([0, 4, 6]), positions)
    assert table.slot_mapping.gpu.tolist() == [14, 15, 20, 21, 11, 24] + [PAD_SLOT_ID] * 4


@pytest.mark.slow
def test_vllm_model_compiled_matches_optimum_and_reuses_cache(folder, expected, tmp_path):
    cache = tmp_path / "cache"
    first = serve(tmp_path, folder, cache)
    assert_same_greedy(folder, first["tokens"], expected)
    [stats] = first["stats"]
    assert stats["compiled"] and stats["buckets"] == [1, 2, 4, 256]
    assert stats["graphs_compiled"] > 0 and stats["graphs_from_cache"] == 0
    # every step ran compiled device graphs at a warmed-up bucket: nothing compiled or fell back
    assert stats["graphs_compiled_after_warm_up"] == 0 and stats["graph_fallback_runs"] == 0
    assert stats["graph_runs"] > 0 and stats["device_time_s"] > 0
    # a step's predicted time: its graphs, the attention calls between them (every layer of
    # every step), nothing else at one die
    assert stats["attention_calls"] >= 2 * stats["steps"] and stats["attention_s"] > 0
    assert stats["step_s"] == pytest.approx(stats["device_time_s"] + stats["attention_s"])
    assert stats["step_s"] == pytest.approx(stats["prefill_s"] + stats["decode_s"])
    second = serve(tmp_path, folder, cache)
    assert second["tokens"] == first["tokens"]
    [again] = second["stats"]
    assert again["graphs_compiled"] == 0 and again["graphs_from_cache"] == stats["graphs_compiled"]


@pytest.mark.slow
def test_vllm_model_tensor_parallel_three_dies(folder, expected, tmp_path):
    """One worker per die (rbln:0..2), vLLM's own TP layers; their all-reduces and the logits
    gather are timed on the die-to-die link."""
    result = serve(tmp_path, folder, tmp_path / "cache", tensor_parallel_size=3)
    assert_same_greedy(folder, result["tokens"], expected)
    stats = result["stats"]
    assert [s["die"] for s in stats] == [0, 1, 2]
    for s in stats:
        assert s["graph_fallback_runs"] == 0 and s["graphs_compiled_after_warm_up"] == 0
        assert s["collectives"] > 0 and s["collective_s"] > 0
        # each die attends with its own heads (3 of 9, 1 KV head of 3), timed on that die
        assert s["attention_calls"] > 0 and s["attention_s"] > 0
        assert s["step_s"] == pytest.approx(s["device_time_s"] + s["attention_s"] +
                                            s["collective_s"])


@pytest.mark.slow
@pytest.mark.parametrize("family, extra", [("Qwen3", {"head_dim": 16}), ("Qwen2", {})])
def test_vllm_qwen_classes(tmp_path, family, extra):
    """vLLM's Qwen3 class (per-head q/k RMSNorm) and Qwen2 class (q/k/v biases) through the same
    path: greedy tokens of the FP32 Hugging Face model, up to top-2 ties."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        hidden_size=144, intermediate_size=192, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, max_position_embeddings=256,
        tie_word_embeddings=False, **extra)
    model = AutoModelForCausalLM.from_config(config).eval()
    if family == "Qwen2":  # random biases, not the zeros they start as: the path must add them
        with torch.no_grad():
            for layer in model.model.layers:
                attn = layer.self_attn
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    folder = tmp_path / family.lower()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_folder()).save_pretrained(folder)
    with torch.no_grad():
        want = [model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False)[0, len(p):]
                .tolist() for p in prompts()]
    result = serve(tmp_path, folder, tmp_path / "cache")
    assert_same_greedy(folder, result["tokens"], want)
    [stats] = result["stats"]
    assert stats["graph_fallback_runs"] == 0 and stats["graphs_compiled_after_warm_up"] == 0


@pytest.mark.slow
def test_attention_share_of_the_step_grows_with_context(tmp_path):
    """Decode steps of one sequence at context ~64, then ~512: the attention calls' predicted
    time is part of each step's, and a larger part at the longer context (the graphs' work does
    not depend on the context; attention reads 8x the KV blocks)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=144, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "long")
    AutoTokenizer.from_pretrained(smollm2_folder()).save_pretrained(tmp_path / "long")
    g = torch.Generator().manual_seed(2)
    rounds = [[torch.randint(10, 49000, (n,), generator=g).tolist()] for n in (63, 511)]
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"llm": {"model": str(tmp_path / "long"), **ENGINE,
                                           "max_model_len": 640},
                                   "rounds": rounds, "max_tokens": 4}))
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_RBLN_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, str(SERVE), str(request)], capture_output=True,
                         text=True, timeout=900, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-6000:]
    [first], [second] = json.loads(lines[-1][len("RESULT "):])["rounds"]
    shares = []
    for before, after in ((None, first), (first, second)):
        decode = {k: v - (before["phases"]["decode"][k] if before else 0.0)
                  for k, v in after["phases"]["decode"].items()}
        assert decode["attention_s"] > 0 and decode["device_time_s"] > 0
        shares.append(decode["attention_s"] / sum(decode.values()))
    assert shares[1] > shares[0], shares
