"""optimum.rbln decoder-only LLMs on small random models: paged KV cache, chunked prefill,
generate(), save/reload, tensor parallelism, and every bad input with its message."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)

import rebel
from optimum.rbln.decoder_only.modeling import left_padded
from optimum.rbln import (RBLNAutoModelForCausalLM, RBLNConfigError, RBLNLlamaForCausalLM,
                          RBLNMistralForCausalLM, RBLNQwen2ForCausalLM, RBLNQwen3ForCausalLM)

SRC = Path(__file__).resolve().parents[1] / "src"
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
OPTIONS = dict(rbln_batch_size=4, rbln_max_seq_len=128, rbln_kvcache_partition_len=32,
               rbln_prefill_chunk_size=16, rbln_decoder_batch_sizes=[1, 2, 4])


def save_model(folder: Path, config) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("llama"), LlamaConfig(**SMALL))


@pytest.fixture(scope="module")
def reference(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()


@pytest.fixture(scope="module")
def llama(llama_dir):
    return RBLNLlamaForCausalLM.from_pretrained(llama_dir, export=True, **OPTIONS)


def prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(seed))


def teacher_forced_agreement(model, reference, tokens: torch.Tensor, start: int) -> float:
    """Next-token argmax of the device vs FP32 at every position after `start`."""
    session = model.start_session([tokens[:start]])
    logits = [session.prefill()[0]]
    for t in tokens[start:-1]:
        logits.append(session.step(torch.tensor([t]), [0])[0])
    with torch.no_grad():
        ref = reference(tokens.unsqueeze(0)).logits[0, start - 1:-1]
    device = torch.stack(logits)
    assert (device - ref).abs().max() < 0.05 * ref.abs().max()
    return (device.argmax(-1) == ref.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("length", [5, 16, 40, 70])  # within a chunk, chunks, past a partition
def test_prompt_logits_match_fp32(llama, reference, length):
    tokens = prompt(length + 6, length)
    assert teacher_forced_agreement(llama, reference, tokens, length) >= 0.8


def test_greedy_matches_transformers(llama, reference):
    ids = prompt(21, 1).unsqueeze(0)
    out = llama.generate(ids, max_new_tokens=12)
    with torch.no_grad():
        ref = reference.generate(ids, max_new_tokens=12, do_sample=False)
    assert out.shape == ref.shape and torch.equal(out[:, :21], ids)
    assert (out[0, 21:] == ref[0, 21:]).float().mean() >= 0.75
    report = llama.last_generation_report
    assert report.new_tokens == 12 and report.time_to_first_token_s > 0 and report.per_output_token_s > 0
    assert report.predicted_tokens_per_s > 0 and "tokens/s on the NPU" in str(report)


def test_batch_of_four_left_padded_equals_each_alone(llama):
    prompts = [prompt(n, 10 + n) for n in (3, 17, 40, 9)]
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    batch = llama.generate(ids, attention_mask=mask, max_new_tokens=8)
    for i, p in enumerate(prompts):
        alone = llama.generate(p.unsqueeze(0), max_new_tokens=8)
        assert torch.equal(batch[i, width:], alone[0, len(p):]), i


def test_eos_stops_and_pads(llama):
    ids = prompt(12, 3).unsqueeze(0)
    free = llama.generate(ids, max_new_tokens=10)
    eos = int(free[0, 12 + 3])
    stopped = llama.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=255)
    first = (stopped[0, 12:] == eos).nonzero()[0].item()
    assert torch.equal(stopped[0, 12:12 + first + 1], free[0, 12:12 + first + 1])
    assert stopped.shape[1] == 12 + first + 1


def test_sampling_is_seeded_and_top_k_1_is_greedy(llama):
    ids = prompt(10, 4).unsqueeze(0)
    a = llama.generate(ids, do_sample=True, temperature=0.9, top_p=0.9, seed=7, max_new_tokens=8)
    b = llama.generate(ids, do_sample=True, temperature=0.9, top_p=0.9, seed=7, max_new_tokens=8)
    assert torch.equal(a, b)
    greedy = llama.generate(ids, max_new_tokens=8)
    assert torch.equal(llama.generate(ids, do_sample=True, top_k=1, seed=3, max_new_tokens=8), greedy)


def test_streamer_sees_prompt_then_each_token(llama):
    seen = []

    class Recorder:
        def put(self, value):
            seen.append(value.tolist())

        def end(self):
            seen.append("end")

    ids = prompt(6, 5).unsqueeze(0)
    out = llama.generate(ids, max_new_tokens=4, streamer=Recorder())
    assert seen[0] == ids.tolist() and seen[-1] == "end"
    assert [s[0] for s in seen[1:-1]] == out[0, 6:].tolist()


def test_save_reload_in_fresh_process(llama, tmp_path):
    folder = llama.save_pretrained(tmp_path / "compiled")
    names = {p.name for p in folder.iterdir()}
    assert {"rbln_config.json", "config.json", "model.rbln"} <= names
    assert llama.graph_names == ["prefill", "decoder_batch_1", "decoder_batch_2", "decoder_batch_4"]
    assert len(llama.compiled_models["model"].compiled.buckets) == len(llama.graph_names)
    ids = prompt(20, 6).unsqueeze(0)
    expected = llama.generate(ids, max_new_tokens=10)
    script = (f"import torch\nfrom optimum.rbln import RBLNAutoModelForCausalLM\n"
              f"m = RBLNAutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
              f"print(m.generate(torch.tensor({ids.tolist()}), max_new_tokens=10).tolist())")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(expected.tolist())


def test_compile_only_then_runtimes_from_the_saved_folder(llama_dir, tmp_path):
    model = RBLNLlamaForCausalLM.from_pretrained(llama_dir, export=True, rbln_create_runtimes=False,
                                                 rbln_batch_size=1, rbln_max_seq_len=64,
                                                 rbln_prefill_chunk_size=16)
    assert model.runtimes == {} and "no runtimes" in repr(model)
    with pytest.raises(rebel.RBLNError, match="rbln_create_runtimes=False"):
        model.generate(prompt(4, 1).unsqueeze(0), max_new_tokens=2)
    folder = model.save_pretrained(tmp_path / "c")
    loaded = RBLNLlamaForCausalLM.from_pretrained(folder, rbln_device=2)  # export=False detected
    assert loaded.runtimes["model"].devices == (2,)
    assert loaded.generate(prompt(4, 1).unsqueeze(0), max_new_tokens=2).shape == (1, 6)


@pytest.mark.parametrize("cls, config", [
    (RBLNQwen2ForCausalLM, Qwen2Config(**SMALL)),
    (RBLNQwen3ForCausalLM, Qwen3Config(**SMALL, head_dim=16)),
    (RBLNMistralForCausalLM, MistralConfig(**SMALL)),
])
def test_other_architectures(cls, config, tmp_path):
    folder = save_model(tmp_path / config.model_type, config)
    model = cls.from_pretrained(folder, export=True, rbln_batch_size=1, rbln_max_seq_len=64,
                                rbln_prefill_chunk_size=16)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert teacher_forced_agreement(model, reference, prompt(30, 2), 20) >= 0.8
    auto = RBLNAutoModelForCausalLM.from_pretrained(model.save_pretrained(tmp_path / "c"))
    assert type(auto) is cls


def test_tensor_parallel_matches_single_die(llama_dir, llama):
    tp = RBLNLlamaForCausalLM.from_pretrained(llama_dir, export=True, rbln_tensor_parallel_size=2,
                                              **OPTIONS)
    assert tp.runtimes["model"].devices == (0, 1)
    assert tp.compiled_models["model"].program.sharding.weights["k_cache_0"] == 1  # split by KV head
    ids = prompt(25, 8).unsqueeze(0)
    assert torch.equal(tp.generate(ids, max_new_tokens=8), llama.generate(ids, max_new_tokens=8))
    assert tp.last_generation_report.per_output_token_s < llama.last_generation_report.per_output_token_s * 1.5


# --- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    (dict(rbln_batchsize=4), "unknown option 'rbln_batchsize'"),
    (dict(rbln_max_seq_len=100, rbln_kvcache_partition_len=32), "must divide rbln_max_seq_len=100"),
    (dict(rbln_max_seq_len=64, rbln_prefill_chunk_size=48), "rbln_prefill_chunk_size=48 must divide"),
    (dict(rbln_max_seq_len=1024), "exceeds the model's max_position_embeddings=256"),
    (dict(rbln_batch_size=2, rbln_decoder_batch_sizes=[4]), "between 1 and rbln_batch_size=2"),
    (dict(rbln_tensor_parallel_size=3), "must divide the model's 4 attention heads and 2 KV heads"),
    (dict(rbln_batch_size=0), "rbln_batch_size must be a positive integer"),
    (dict(rbln_kvcache_block_size=12), "rbln_kvcache_block_size=12 must divide rbln_kvcache_partition_len=256"),
    (dict(rbln_kvcache_block_size=0), "rbln_kvcache_block_size must be a positive integer"),
])
def test_bad_options_fail_before_compiling(llama_dir, options, message, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("compiled despite bad options")

    monkeypatch.setattr(rebel, "compile_from_torch", no_compile)
    with pytest.raises(RBLNConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        RBLNLlamaForCausalLM.from_pretrained(llama_dir, export=True, **options)


def test_prompt_longer_than_max_seq_len(llama):
    with pytest.raises(rebel.InputError, match="has 129 tokens, longer than the compiled rbln_max_seq_len=128"):
        llama.generate(prompt(129, 1).unsqueeze(0), max_new_tokens=1)


def test_batch_larger_than_compiled(llama):
    with pytest.raises(rebel.InputError, match="batch of 5 sequences exceeds the compiled rbln_batch_size=4"):
        llama.generate(torch.ones(5, 4, dtype=torch.long), max_new_tokens=1)


def test_generation_stops_at_max_seq_len(llama):
    out = llama.generate(prompt(120, 2).unsqueeze(0), max_new_tokens=50)
    assert out.shape[1] == 128


def test_model_type_without_rbln_class(tmp_path):
    folder = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(folder)
    with pytest.raises(RBLNConfigError, match="no RBLN causal-LM class for model type 'gpt2'"):
        RBLNAutoModelForCausalLM.from_pretrained(folder, export=True)
    with pytest.raises(RBLNConfigError, match="compiles model types llama; this model is 'gpt2'"):
        RBLNLlamaForCausalLM.from_pretrained(folder, export=True)


def test_folder_compiled_for_another_npu(llama_dir, tmp_path):
    model = RBLNLlamaForCausalLM.from_pretrained(llama_dir, export=True, rbln_npu="RBLN-CA12",
                                                 rbln_create_runtimes=False, rbln_max_seq_len=64,
                                                 rbln_prefill_chunk_size=16)
    folder = model.save_pretrained(tmp_path / "ca12")
    with pytest.raises(rebel.DeviceError, match="compiled for RBLN-CA12 but rbln:0 is a RBLN-CA25"):
        RBLNLlamaForCausalLM.from_pretrained(folder)


def test_changing_graph_options_on_reload_is_refused(llama, tmp_path):
    folder = llama.save_pretrained(tmp_path / "c")
    with pytest.raises(RBLNConfigError, match="rbln_batch_size shape the compiled graphs"):
        RBLNLlamaForCausalLM.from_pretrained(folder, rbln_batch_size=8)


def test_not_a_compiled_folder(tmp_path):
    with pytest.raises(RBLNConfigError, match="not a compiled RBLN model folder"):
        RBLNLlamaForCausalLM.from_pretrained(tmp_path, export=False)


def test_beam_search_refused(llama):
    with pytest.raises(rebel.InputError, match="beam search is not supported"):
        llama.generate(prompt(4, 1).unsqueeze(0), num_beams=4)


def test_config_of_reference_untouched(llama_dir):
    """Compiling swaps the attention of the model it compiles, not of others loaded alike."""
    fresh = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert fresh.config._attn_implementation != "rbln_paged"
    assert copy.deepcopy(fresh.config)._attn_implementation != "rbln_paged"


def test_kv_cache_is_not_stored_in_the_artifact(llama, tmp_path):
    import json
    import zipfile

    folder = llama.save_pretrained(tmp_path / "c")
    with zipfile.ZipFile(folder / "model.rbln") as z:
        manifest = json.loads(z.read("manifest.json"))
        weights = z.getinfo("weights.safetensors").file_size
    caches = [n for n in manifest["zero_buffers"] if "cache" in n]
    assert len(caches) == 2 * 2  # k and v for both layers
    program = llama.compiled_models["model"].program
    cache_bytes = sum(program.weights[n].nbytes() for n in caches)
    assert weights < program.weight_bytes - cache_bytes + 4096  # header slack only


def test_concurrent_generate_calls_equal_serial_ones(llama):
    """Threads sharing one model: each generate() gets its own KV-cache slots (they used to all
    take slots 0..b-1 and overwrite each other's caches, giving wrong tokens). Six calls of
    batch 1 and 2 over rbln_batch_size=4 slots also make some of them wait for free slots."""
    import threading
    jobs = [[prompt(n, 40 + n)] for n in (7, 23, 11)] + [[prompt(5, 1), prompt(30, 2)]
                                                          for _ in range(3)]
    serial = [llama.generate(*left_padded(ps), max_new_tokens=10) for ps in jobs]
    got = [None] * len(jobs)

    def work(i):
        ids, mask = left_padded(jobs[i])
        got[i] = llama.generate(ids, attention_mask=mask, max_new_tokens=10)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(g is not None and torch.equal(a, g) for a, g in zip(serial, got))


def test_open_sessions_hold_slots_and_too_many_is_a_clear_error(llama):
    held = llama.start_session([prompt(4, 1), prompt(4, 2), prompt(4, 3)])
    with pytest.raises(rebel.InputError, match="KV-cache slot"):
        llama.start_session([prompt(4, 4), prompt(4, 5)])
    with pytest.raises(rebel.InputError, match="KV-cache slot"):
        llama.generate(*left_padded([prompt(4, 4), prompt(4, 5)]), max_new_tokens=2)
    out = llama.generate(prompt(6, 7).unsqueeze(0), max_new_tokens=3)  # the one free slot
    held.close()
    assert torch.equal(out, llama.generate(prompt(6, 7).unsqueeze(0), max_new_tokens=3))


# --- KV-cache blocks smaller than the attention partition -----------------------------------------

def test_sub_partition_blocks_give_the_same_logits_and_tokens(llama_dir, llama, tmp_path):
    """rbln_kvcache_block_size=8 with partitions of 32: four cache blocks per partition, the same
    attention arithmetic, so the same logits bit for bit and the same greedy tokens, for prompts
    past two partitions and a left-padded batch; save/reload keeps the option."""
    small = RBLNLlamaForCausalLM.from_pretrained(llama_dir, export=True, **OPTIONS,
                                                 rbln_kvcache_block_size=8)
    o = small.rbln_config
    assert (o.kvcache_block_size, o.kvcache_partition_len, o.blocks_per_sequence) == (8, 32, 16)
    assert llama.rbln_config.blocks_per_sequence == 4
    weights = small.compiled_models["model"].program.weights
    assert tuple(weights["k_cache_0"].shape) == (4 * 16, 2, 8, 16)  # same bytes as 4 x 4 blocks of 32
    tokens = prompt(75, 11)
    a, b = small.start_session([tokens]), llama.start_session([tokens])
    try:
        assert torch.equal(a.prefill(), b.prefill())
        for t in (5, 6, 7):
            assert torch.equal(a.step(torch.tensor([t]), [0]), b.step(torch.tensor([t]), [0]))
    finally:
        a.close(), b.close()
    batch = left_padded([prompt(70, 12), prompt(9, 13), prompt(33, 14)])
    expected = llama.generate(*batch, max_new_tokens=12)
    assert torch.equal(small.generate(*batch, max_new_tokens=12), expected)
    # the timing model charges the context read, not the block size
    assert small.last_generation_report.per_output_token_s == pytest.approx(
        llama.last_generation_report.per_output_token_s, rel=1e-3)

    folder = small.save_pretrained(tmp_path / "blocks8")
    import json
    assert json.loads((folder / "rbln_config.json").read_text())["kvcache_block_size"] == 8
    loaded = RBLNLlamaForCausalLM.from_pretrained(folder)
    assert loaded.rbln_config.kvcache_block_size == 8 and loaded.rbln_config.blocks_per_sequence == 16
    assert torch.equal(loaded.generate(*batch, max_new_tokens=12), expected)


def test_folder_from_before_the_block_size_option_loads(llama, tmp_path):
    """A rbln_config.json without kvcache_block_size (written before the option): blocks of a
    whole partition, as then."""
    import json
    folder = llama.save_pretrained(tmp_path / "old")
    path = folder / "rbln_config.json"
    data = json.loads(path.read_text())
    assert data.pop("kvcache_block_size") == 32
    path.write_text(json.dumps(data))
    old = RBLNLlamaForCausalLM.from_pretrained(folder)
    assert old.rbln_config.kvcache_block_size == 32 and old.rbln_config.blocks_per_sequence == 4
    ids = prompt(40, 15).unsqueeze(0)
    assert torch.equal(old.generate(ids, max_new_tokens=6), llama.generate(ids, max_new_tokens=6))
