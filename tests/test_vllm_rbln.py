"""vllm_rbln: vLLM serving compiled RBLN models through the platform plugin.

The engine runs in a subprocess per case (`vllm_serve.py`), as a user's script would; its greedy
tokens must equal optimum.rbln's `generate` on the same compiled folder (both run the same device
graphs), whatever vLLM does in between: batching, chunked prefill, prefix caching."""
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
from vllm_serve import stand_in_logits  # noqa: E402

SERVE = Path(__file__).with_name("vllm_serve.py")
OPTIONS = dict(rbln_batch_size=4, rbln_max_seq_len=128, rbln_kvcache_partition_len=32,
               rbln_prefill_chunk_size=16, rbln_decoder_batch_sizes=[1, 2, 4])
ENGINE = dict(device="rbln", max_num_seqs=4, max_model_len=128, block_size=32)
GREEDY = dict(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A small random Llama with SmolLM2's tokenizer: its HF folder and its compiled folder."""
    root = tmp_path_factory.mktemp("vllm")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                         max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    AutoTokenizer.from_pretrained(smollm2_folder()).save_pretrained(root / "hf")
    model = RBLNLlamaForCausalLM.from_pretrained(root / "hf", export=True, **OPTIONS)
    model.save_pretrained(root / "compiled")
    return root / "hf", root / "compiled"


@pytest.fixture(scope="module")
def compiled(folders):
    return RBLNLlamaForCausalLM.from_pretrained(folders[1], export=False)


def serve(tmp_path: Path, *cases: dict) -> list[dict]:
    """Each case's outputs and the worker's stats (`rbln_stats`), or its error."""
    request = tmp_path / f"request{len(list(tmp_path.iterdir()))}.json"
    request.write_text(json.dumps(list(cases)))
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, str(SERVE), str(request)], capture_output=True,
                         text=True, timeout=600, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


def prompts(n: int) -> list[list[int]]:
    """Token-id prompts of 5, 20, 37, 70... tokens (past one prefill chunk and one KV block)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(10, 49000, (length,), generator=g).tolist()
            for length in (5, 20, 37, 70, 12, 50)[:n]]


def expected(model, prompt: list[int], new: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new, eos_token_id=[])
    return out[0, len(prompt):].tolist()


@pytest.mark.slow
def test_seed_call_matches_generate(folders, compiled, tmp_path):
    """The seed's call shape: LLM(model=compiled_folder, device="rbln", ...).generate(prompts)."""
    batch = prompts(6)
    [case] = serve(tmp_path, {"llm": {"model": str(folders[1]), **ENGINE}, "prompts": batch,
                              "sampling": GREEDY})
    assert [o["tokens"] for o in case["outputs"]] == [expected(compiled, p, 10) for p in batch]
    stats = case["stats"]  # 4 sequences decode together: 6 prompts need at least 2 x 9 batches
    assert stats["decode_batches"] >= 18 and stats["prefill_s"] > 0 and stats["decode_s"] > 0


@pytest.mark.slow
def test_chunked_prefill_and_prefix_caching_keep_results(folders, compiled, tmp_path):
    """Small token budgets split prompts over steps and mix them with decodes; a later prompt
    that shares two full KV blocks with an earlier one reuses them (prefix caching). Tokens stay
    those of generate."""
    shared = prompts(4)[3][:64]
    first, later = [shared + [101, 102, 103], prompts(2)[1]], [shared + [7] * 9]
    [case] = serve(tmp_path, {"llm": {"model": str(folders[1]), **ENGINE, "max_num_batched_tokens": 24},
                              "prompts": first, "after": later, "sampling": GREEDY})
    batch = first + later
    assert [o["tokens"] for o in case["outputs"]] == [expected(compiled, p, 10) for p in batch]
    assert case["stats"]["cached_prompt_tokens"] == 64
    # the later prompt computes only its 9 new tokens (one chunk); the 24-token budget splits
    # the first prompt's 67 tokens into more chunks than 67/16 alone would
    assert case["stats"]["prefill_chunks"] > sum(-(-len(p) // 16) for p in first)


@pytest.fixture(scope="module")
def prefix_folders(folders, tmp_path_factory):
    """The same random Llama at 512 tokens, one attention partition of 512, compiled with KV-cache
    blocks of 128 (sub-partition blocks) and of 512 (a block per partition, as before
    rbln_kvcache_block_size)."""
    root = tmp_path_factory.mktemp("prefix")
    hf = AutoModelForCausalLM.from_pretrained(folders[0])
    hf.config.max_position_embeddings = 512
    hf.save_pretrained(root / "hf")
    AutoTokenizer.from_pretrained(folders[0]).save_pretrained(root / "hf")
    options = dict(rbln_batch_size=2, rbln_max_seq_len=512, rbln_kvcache_partition_len=512,
                   rbln_prefill_chunk_size=128, rbln_decoder_batch_sizes=[1, 2])
    out = {}
    for block in (128, 512):
        model = RBLNLlamaForCausalLM.from_pretrained(root / "hf", export=True, **options,
                                                     rbln_kvcache_block_size=block)
        out[block] = (model, model.save_pretrained(root / f"block{block}"))
    return out


PREFIX_METRICS = ["vllm:prefix_cache_queries", "vllm:prefix_cache_hits"]


@pytest.mark.slow
def test_prefix_cache_hits_with_sub_partition_blocks(prefix_folders, tmp_path):
    """Two prompts sharing a 256-token prefix, the second sent after the first finished: with
    blocks of 128 tokens (partitions of 512) vLLM's prefix cache supplies the two shared blocks
    of the second prompt (256 hit tokens in vLLM's metrics and in the runner's stats), and the
    greedy tokens are those with caching off and those of optimum's generate. With one block per
    partition (512) a 256-token prefix is not a whole block: nothing to share."""
    model, folder = prefix_folders[128]
    _, whole = prefix_folders[512]
    g = torch.Generator().manual_seed(7)
    shared = torch.randint(10, 49000, (256,), generator=g).tolist()
    first = shared + torch.randint(10, 49000, (20,), generator=g).tolist()
    later = shared + torch.randint(10, 49000, (37,), generator=g).tolist()
    engine = dict(device="rbln", max_num_seqs=2, max_model_len=512, disable_log_stats=False)
    case = {"prompts": [first], "after": [later], "sampling": GREEDY, "metrics": PREFIX_METRICS}
    on, off, one_block = serve(
        tmp_path,
        {**case, "llm": {"model": str(folder), **engine, "enable_prefix_caching": True}},
        {**case, "llm": {"model": str(folder), **engine, "enable_prefix_caching": False}},
        {**case, "llm": {"model": str(whole), **engine, "enable_prefix_caching": True}})
    for c in (on, off, one_block):
        assert "error" not in c, c.get("error")
    tokens = [o["tokens"] for o in on["outputs"]]
    assert tokens == [o["tokens"] for o in off["outputs"]] == [o["tokens"] for o in one_block["outputs"]]
    assert tokens == [expected(model, p, 10) for p in (first, later)]
    assert on["metrics"]["vllm:prefix_cache_hits"] == 256
    assert on["metrics"]["vllm:prefix_cache_queries"] == len(first) + len(later)
    assert on["stats"]["cached_prompt_tokens"] == 256
    assert off["stats"]["cached_prompt_tokens"] == 0 and off["metrics"]["vllm:prefix_cache_hits"] == 0
    assert one_block["stats"]["cached_prompt_tokens"] == 0
    assert one_block["metrics"]["vllm:prefix_cache_hits"] == 0
    # the later prompt's prefill ran only its 37 new tokens: one chunk instead of three
    assert on["stats"]["prefill_chunks"] == off["stats"]["prefill_chunks"] - 2
    assert on["stats"]["prefill_s"] < off["stats"]["prefill_s"]


@pytest.mark.slow
def test_short_prefill_chunks_keep_results_for_less_npu_time(folders, compiled, tmp_path):
    """A folder compiled with prefill chunks of 4, 8 and 16 tokens: vLLM's chunked prefill and
    prefix caching run each chunk in the smallest graph that holds it. Tokens stay those of
    generate (and of the one-chunk folder); the predicted prefill time drops."""
    model = RBLNLlamaForCausalLM.from_pretrained(folders[0], export=True,
                                                 **{**OPTIONS, "rbln_prefill_chunk_sizes": [4, 8, 16]})
    short = model.save_pretrained(tmp_path / "short")
    shared = prompts(4)[3][:64]
    first, later = [shared + [101, 102, 103], prompts(2)[1], prompts(1)[0]], [shared + [7] * 9]
    engine = {**ENGINE, "max_num_batched_tokens": 24}
    cases = serve(tmp_path, *({"llm": {"model": str(f), **engine}, "prompts": first, "after": later,
                               "sampling": GREEDY} for f in (folders[1], short)))
    want = [expected(compiled, p, 10) for p in first + later]
    assert [[o["tokens"] for o in case["outputs"]] for case in cases] == [want, want]
    assert [expected(model, p, 10) for p in first + later] == want
    whole, bucketed = (case["stats"] for case in cases)
    assert bucketed["prefill_chunks"] == whole["prefill_chunks"]
    assert bucketed["cached_prompt_tokens"] == whole["cached_prompt_tokens"] == 64
    assert bucketed["prefill_s"] < whole["prefill_s"]
    assert bucketed["decode_s"] == pytest.approx(whole["decode_s"])


@pytest.mark.slow
def test_sampling_options(folders, compiled, tmp_path):
    """Seeds, structured output (choice), logprobs and bad_words, in one engine."""
    prompt = prompts(3)[2]
    greedy = expected(compiled, prompt, 3)
    banned = AutoTokenizer.from_pretrained(folders[1]).decode(greedy[:1])
    sampled = dict(temperature=0.9, top_p=0.9, top_k=200, max_tokens=8, ignore_eos=True)
    [case] = serve(tmp_path, {"llm": {"model": str(folders[1]), **ENGINE},
                              "prompts": [prompt] * 3 + ["Answer yes or no:", prompt, prompt],
                              "sampling": [{**sampled, "seed": 5}, {**sampled, "seed": 5},
                                           {**sampled, "seed": 6},
                                           {"temperature": 0.0, "max_tokens": 4,
                                            "choice": ["yes", "no"]},
                                           {**GREEDY, "max_tokens": 3, "logprobs": 2},
                                           {**GREEDY, "max_tokens": 3, "bad_words": [banned]}]})
    first, again, other, choice, scored, avoided = case["outputs"]
    assert first["tokens"] == again["tokens"] and len(first["tokens"]) == 8
    assert other["tokens"] != first["tokens"]
    assert choice["text"] in ("yes", "no")
    # logprobs: log-softmax of the device logits; the greedy token is the top one (rank 1)
    assert scored["tokens"] == greedy
    assert avoided["tokens"][0] != greedy[0]
    graphs = compiled.paged_graphs()
    table = torch.arange(4)
    for start in range(0, len(prompt), 16):
        logits, _ = graphs.prefill_chunk(torch.tensor(prompt[start:start + 16]), start, table)
    reference = torch.log_softmax(logits.float(), -1)
    first_position = scored["logprobs"][0]
    assert len(first_position) == 2  # the sampled token is also the best one
    token = str(scored["tokens"][0])
    assert first_position[token][1] == 1
    assert first_position[token][0] == pytest.approx(float(reference.max()), abs=1e-4)
    assert len(scored["logprobs"]) == 3


@pytest.mark.slow
def test_tensor_parallel_model_serves_on_two_dies(folders, tmp_path):
    """Tensor parallelism is compiled in: vLLM runs one worker, the runtime spans rbln:0 and
    rbln:1, and the tokens are those of the same compiled model's generate."""
    model = RBLNLlamaForCausalLM.from_pretrained(folders[0], export=True, **OPTIONS,
                                                 rbln_tensor_parallel_size=2)
    model.save_pretrained(tmp_path / "tp2")
    assert model.runtimes["model"].devices == (0, 1)
    batch = prompts(3)
    [case] = serve(tmp_path, {"llm": {"model": str(tmp_path / "tp2"), **ENGINE}, "prompts": batch,
                              "sampling": GREEDY})
    assert [o["tokens"] for o in case["outputs"]] == [expected(model, p, 10) for p in batch]


@pytest.mark.slow
def test_options_the_compiled_model_cannot_honour(folders, tmp_path):
    hf, folder = (str(f) for f in folders)
    cases = serve(tmp_path,
                  {"llm": {"model": hf, "device": "rbln"}, "prompts": ["hi"]},
                  {"llm": {"model": folder, **ENGINE, "block_size": 16}, "prompts": ["hi"]},
                  {"llm": {"model": folder, **ENGINE, "max_model_len": 256}, "prompts": ["hi"]},
                  {"llm": {"model": folder, **ENGINE, "device": "cuda"}, "prompts": ["hi"]},
                  {"llm": {"model": folder, **ENGINE, "tensor_parallel_size": 2}, "prompts": ["hi"]},
                  {"llm": {"model": folder, **ENGINE}, "prompts": ["hi"],
                   "sampling": {"prompt_logprobs": 2}})
    errors = [c.get("error", "") for c in cases]
    assert "has no rbln_config.json" in errors[0]
    assert "block_size=16 differs from the compiled rbln_kvcache_block_size=32" in errors[1]
    assert "max_model_len=256 exceeds the compiled rbln_max_seq_len=128" in errors[2]
    assert "device='cuda'" in errors[3]
    assert "run vLLM with tensor_parallel_size=1" in errors[4]
    assert "does not support prompt_logprobs" in errors[5]


def stock_sampler_tokens(prompt: list[int], seed: int, steps: int, vocab: int,
                         mode: str) -> tuple[list[int], list[float]]:
    """vLLM's v1 Sampler called directly, step by step, on the stand-in logits (temperature 0.8,
    top_p 0.9, its own generator seeded as vLLM seeds a request's): the tokens and the sampled
    tokens' logprobs in `mode`."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler

    sampler, generator = Sampler(logprobs_mode=mode), torch.Generator().manual_seed(seed)
    tokens, logprobs = [], []
    for _ in range(steps):
        position = len(prompt) + len(tokens) - 1
        logits = stand_in_logits((prompt + tokens)[-1], position, vocab)[None]
        meta = SamplingMetadata(
            temperature=torch.tensor([0.8]), all_greedy=False, all_random=True,
            top_p=torch.tensor([0.9]), top_k=None, generators={0: generator}, max_num_logprobs=1,
            no_penalties=True, prompt_token_ids=None, frequency_penalties=torch.zeros(1),
            presence_penalties=torch.zeros(1), repetition_penalties=torch.ones(1),
            output_token_ids=[tokens], allowed_token_ids_mask=None, bad_words_token_ids={},
            logitsprocs=LogitsProcessors())
        out = sampler(logits, meta)
        tokens.append(int(out.sampled_token_ids[0, 0]))
        logprobs.append(float(out.logprobs_tensors.logprobs[0, 0]))
    return tokens, logprobs


@pytest.mark.slow
def test_vllm_sampler_on_fixed_logits(folders, tmp_path):
    """vLLM's own sampling on the runner's logits (a fixed-logits stand-in for the graphs, so a
    direct call of vLLM's Sampler can replay it): seeded samples and their processed logprobs
    equal the direct call's; min_tokens holds back a stop token; logit_bias counts."""
    vocab, prompt = 49152, prompts(2)[1]
    first = int(stand_in_logits(prompt[-1], len(prompt) - 1, vocab).argmax())
    seeded = dict(temperature=0.8, top_p=0.9, max_tokens=12, ignore_eos=True, logprobs=1)
    greedy = dict(temperature=0.0, max_tokens=6, stop_token_ids=[first])
    [case] = serve(tmp_path, {"llm": {"model": str(folders[1]), **ENGINE,
                                      "logprobs_mode": "processed_logprobs"},
                              "stand_in": {}, "prompts": [prompt] * 5,
                              "sampling": [{**seeded, "seed": 7}, {**seeded, "seed": 8},
                                           {**greedy, "min_tokens": 4}, greedy,
                                           {**GREEDY, "max_tokens": 3, "logit_bias": {123: 1000}}]})
    assert "error" not in case, case
    seven, eight, held, stopped, biased = case["outputs"]
    for out, seed in ((seven, 7), (eight, 8)):
        tokens, logprobs = stock_sampler_tokens(prompt, seed, 12, vocab, "processed_logprobs")
        assert out["tokens"] == tokens
        assert [position[str(t)][0] for position, t in zip(out["logprobs"], tokens)] == \
            pytest.approx(logprobs, abs=1e-5)
    assert seven["tokens"] != eight["tokens"]
    assert stopped["tokens"] == [first]  # the stop token ends it at once...
    masked = stand_in_logits(prompt[-1], len(prompt) - 1, vocab)
    masked[first] = float("-inf")
    assert held["tokens"][0] == int(masked.argmax())  # ...but not before min_tokens
    assert len(held["tokens"]) >= 4 and first not in held["tokens"][:4]
    assert biased["tokens"] == [123] * 3


def test_npu_time_metrics_sum_workers_files(tmp_path):
    """Each worker's cumulative file, summed by the collector into Prometheus text: the step
    histogram (cumulative buckets, count, sum) and the seconds by phase."""
    from prometheus_client import CollectorRegistry, generate_latest

    from vllm_rbln.metrics import BUCKETS, NpuTimeCollector, StepMetrics

    one, two = StepMetrics(), StepMetrics()
    one.observe(2e-4, 0.0)       # a prefill-only step
    one.observe(0.0, 3e-5)
    two.observe(1e-3, 5e-3)      # a mixed step of 6 ms
    one.write(tmp_path)
    (tmp_path / "worker-2.json").write_text((tmp_path / f"worker-{os.getpid()}.json").read_text())
    (tmp_path / f"worker-{os.getpid()}.json").unlink()
    two.write(tmp_path)
    registry = CollectorRegistry()
    registry.register(NpuTimeCollector(tmp_path))
    text = generate_latest(registry).decode()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    values = {k: float(v) for k, v in values.items()}
    assert values["vllm_rbln:npu_step_seconds_count"] == 3
    assert values["vllm_rbln:npu_step_seconds_sum"] == pytest.approx(2e-4 + 3e-5 + 6e-3)
    assert values['vllm_rbln:npu_seconds_total{phase="prefill"}'] == pytest.approx(1.2e-3)
    assert values['vllm_rbln:npu_seconds_total{phase="decode"}'] == pytest.approx(5.03e-3)
    below = {b: sum(s <= b for s in (2e-4, 3e-5, 6e-3)) for b in BUCKETS}
    for bound, count in below.items():
        assert values[f'vllm_rbln:npu_step_seconds_bucket{{le="{bound!r}"}}'] == count
    assert values['vllm_rbln:npu_step_seconds_bucket{le="+Inf"}'] == 3


def test_plugin_steps_aside_for_a_real_accelerator(monkeypatch):
    """Installing open-rbln must not take vLLM over on a GPU machine: the plugin activates when
    asked for (RBLN_VLLM_PLATFORM=1, VLLM_PLUGINS=rbln) or when no accelerator platform is
    found, and device='rbln' where vLLM chose another platform says how to ask for it."""
    import vllm_rbln
    from vllm import platforms
    from vllm.engine.arg_utils import EngineArgs

    for name in ("RBLN_VLLM_PLATFORM", "VLLM_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    assert vllm_rbln.register() == "vllm_rbln.platform.RblnPlatform"  # CPU only: we serve
    monkeypatch.setitem(platforms.builtin_platform_plugins, "cuda",
                        lambda: "vllm.platforms.cuda.CudaPlatform")
    assert vllm_rbln.register() is None
    with pytest.raises(ValueError, match="RBLN_VLLM_PLATFORM=1 or VLLM_PLUGINS=rbln"):
        EngineArgs(model="m", device="rbln")
    monkeypatch.setenv("VLLM_PLUGINS", "rbln")
    assert vllm_rbln.register() == "vllm_rbln.platform.RblnPlatform"
    monkeypatch.delenv("VLLM_PLUGINS")
    monkeypatch.setenv("RBLN_VLLM_PLATFORM", "1")
    assert vllm_rbln.register() == "vllm_rbln.platform.RblnPlatform"
    EngineArgs(model="m", device="rbln")  # accepted again
    monkeypatch.setenv("RBLN_VLLM_PLATFORM", "0")
    assert vllm_rbln.register() is None
