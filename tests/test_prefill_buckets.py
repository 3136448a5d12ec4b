"""Prefill compiled for several chunk sizes (rbln_prefill_chunk_sizes): a chunk runs in the
smallest compiled chunk that holds it, giving the logits the whole-chunk graph gives, for less
predicted time; folders compiled before the option load with their one prefill graph."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig

import rebel
from optimum.rbln import RBLNConfigError, RBLNLlamaForCausalLM
from optimum.rbln.configuration import RBLNConfig, default_prefill_buckets

from test_optimum_llm import SMALL, prompt, save_model

OPTIONS = dict(rbln_batch_size=2, rbln_max_seq_len=128, rbln_kvcache_partition_len=32,
               rbln_prefill_chunk_size=16, rbln_decoder_batch_sizes=[1, 2])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("llama"), LlamaConfig(**SMALL))


@pytest.fixture(scope="module")
def whole(llama_dir):
    """One prefill graph: every chunk pads to 16 tokens (what every model compiled to before)."""
    return RBLNLlamaForCausalLM.from_pretrained(llama_dir, export=True, rbln_prefill_chunk_sizes=[16],
                                                **OPTIONS)


@pytest.fixture(scope="module")
def bucketed(llama_dir):
    return RBLNLlamaForCausalLM.from_pretrained(llama_dir, export=True,
                                                rbln_prefill_chunk_sizes=[8, 4, 16], **OPTIONS)


def test_default_buckets():
    assert default_prefill_buckets(128) == [32, 48, 64, 128]
    assert default_prefill_buckets(256) == [32, 48, 64, 128, 256]
    assert default_prefill_buckets(512) == [128, 256, 512]  # halves stop above 128: no short steps
    assert default_prefill_buckets(2048) == [512, 1024, 2048]
    assert default_prefill_buckets(64) == [32, 48, 64]
    assert default_prefill_buckets(96) == [32, 48, 64, 96]
    assert default_prefill_buckets(192) == [32, 48, 64, 96, 192]
    assert default_prefill_buckets(40) == [32, 40]
    assert default_prefill_buckets(32) == [32]
    assert default_prefill_buckets(16) == [16]
    assert default_prefill_buckets(2) == [2]
    options = RBLNConfig(max_seq_len=2048).finalize(2048)
    assert options.prefill_chunk_sizes == [32, 48, 64, 128]
    assert [options.prefill_bucket(n) for n in (1, 16, 17, 37, 48, 49, 64, 65, 128)] == \
        [32, 32, 32, 48, 48, 64, 64, 128, 128]


def test_graphs_are_named_by_their_chunk(bucketed, whole):
    assert bucketed.rbln_config.prefill_chunk_sizes == [4, 8, 16]
    assert bucketed.graph_names == ["prefill", "prefill_4", "prefill_8", "decoder_batch_1",
                                    "decoder_batch_2"]
    assert whole.graph_names == ["prefill", "decoder_batch_1", "decoder_batch_2"]
    programs = bucketed.compiled_models["model"].compiled.buckets
    shapes = [tuple(p.inputs[0][1].shape) for p in programs]  # input_ids [batch, tokens]
    assert shapes == [(1, 16), (1, 4), (1, 8), (1, 1), (2, 1)]


@pytest.mark.parametrize("length", [3, 7, 16, 21, 40])  # one short chunk; whole chunks + a short tail
def test_short_chunk_gives_the_whole_chunk_logits_for_less_time(bucketed, whole, length):
    tokens = prompt(length, length)
    short, full = bucketed.start_session([tokens]), whole.start_session([tokens])
    a, b = short.prefill(), full.prefill()
    assert (a.float() - b.float()).abs().max() <= 2e-3 * b.float().abs().max()
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    tail = length % 16 or 16
    ran = bucketed.runtimes["model"].program.inputs[0][1].shape[1]
    assert ran == bucketed.rbln_config.prefill_bucket(tail)
    if tail <= 8:
        assert short.timing.prefill_s[-1] < full.timing.prefill_s[-1]
    for s in (short, full):
        s.close()


def test_generate_agrees_with_the_whole_chunk_model(bucketed, whole):
    ids = prompt(7, 5).unsqueeze(0)  # one chunk of 7: runs prefill_8
    assert torch.equal(bucketed.generate(ids, max_new_tokens=8), whole.generate(ids, max_new_tokens=8))
    assert bucketed.last_generation_report.time_to_first_token_s < \
        whole.last_generation_report.time_to_first_token_s


def test_folder_from_before_the_option_loads_with_one_prefill_graph(whole, tmp_path):
    folder = whole.save_pretrained(tmp_path / "old")
    path = folder / "rbln_config.json"
    data = json.loads(path.read_text())
    assert data["prefill_chunk_sizes"] == [16]
    del data["prefill_chunk_sizes"]
    path.write_text(json.dumps(data))
    old = RBLNLlamaForCausalLM.from_pretrained(folder)
    assert old.rbln_config.prefill_chunk_sizes == [16]
    assert old.graph_names == ["prefill", "decoder_batch_1", "decoder_batch_2"]
    ids = prompt(9, 3).unsqueeze(0)
    assert torch.equal(old.generate(ids, max_new_tokens=4), whole.generate(ids, max_new_tokens=4))


def test_bucketed_folder_reloads(bucketed, tmp_path):
    loaded = RBLNLlamaForCausalLM.from_pretrained(bucketed.save_pretrained(tmp_path / "c"))
    assert loaded.rbln_config.prefill_chunk_sizes == [4, 8, 16]
    assert loaded.graph_names == bucketed.graph_names
    ids = prompt(6, 9).unsqueeze(0)
    assert torch.equal(loaded.generate(ids, max_new_tokens=4), bucketed.generate(ids, max_new_tokens=4))


@pytest.mark.parametrize("options, message", [
    (dict(rbln_prefill_chunk_sizes=[4, 8]), "rbln_prefill_chunk_sizes=[4, 8] must include "
                                            "rbln_prefill_chunk_size=16"),
    (dict(rbln_prefill_chunk_sizes=[0, 16]), "integers between 1 and rbln_prefill_chunk_size=16"),
    (dict(rbln_prefill_chunk_sizes=[16, 32]), "integers between 1 and rbln_prefill_chunk_size=16"),
    (dict(rbln_prefill_chunk_sizes=["8", 16]), "integers between 1 and rbln_prefill_chunk_size=16"),
    (dict(rbln_prefill_chunk_sizes=[]), "integers between 1 and rbln_prefill_chunk_size=16"),
    (dict(rbln_prefill_chunk_sizes=16), "integers between 1 and rbln_prefill_chunk_size=16"),
    (dict(rbln_prefill_chunk_sizes=[1, 16]), "rbln_prefill_chunk_sizes=1 would give a prefill graph "
                                             "the same shape as the batch-1 decode graph"),
])
def test_bad_prefill_sizes_fail_before_compiling(llama_dir, options, message, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("compiled despite bad options")

    monkeypatch.setattr(rebel, "compile_from_torch", no_compile)
    with pytest.raises(RBLNConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        RBLNLlamaForCausalLM.from_pretrained(llama_dir, export=True, **OPTIONS, **options)


def test_prefill_size_1_is_fine_without_a_batch_1_decode_graph(llama_dir, monkeypatch):
    monkeypatch.setattr(rebel, "compile_from_torch", lambda *a, **k: "compiled")
    o = RBLNConfig.from_kwargs({**OPTIONS, "rbln_decoder_batch_sizes": [2],
                                "rbln_prefill_chunk_sizes": [1, 16]}).finalize(256)
    assert o.prefill_chunk_sizes == [1, 16] and o.prefill_bucket(1) == 1
