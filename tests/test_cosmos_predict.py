"""The full-size Cosmos prediction (benchmarks/cosmos_predict.py) run on a reduced config: the
same builders, compiles and table, small enough for CI. Asserts what the full-size table relies
on: meta compiles only predict, tensor parallelism trades memory and compute for link time, the
end-to-end figures are sums of the stages, and liveness-planned activations are smaller than one
buffer per tensor."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import rebel
from rebel.runtime.runtime import activation_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cosmos_predict as cp  # noqa: E402

# big enough (1,536 tokens, hidden 512) that compute, not kernel launches, sets a call's time
DIT = {**cp.DIT_7B, "num_attention_heads": 8, "attention_head_dim": 64, "num_layers": 2,
       "text_embed_dim": 32, "adaln_lora_dim": 16, "max_size": (16, 64, 64)}
T5 = {**cp.T5_11B, "d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 2,
      "vocab_size": 100}
VAE = dict(encoder_block_out_channels=(8, 16, 16, 16), decode_block_out_channels=(16, 16, 16, 16),
           attention_resolutions=(8,), resolution=64, num_layers=1)
VIDEO = {**cp.VIDEO, "height": 256, "width": 512, "frames": 17, "steps": 3, "prompt_tokens": 16}


@pytest.fixture(scope="module")
def rows():
    return cp.full_size_table(cards=(1, 2), dit=DIT, t5=T5, vae=VAE, video=VIDEO)


def test_latent_shape_follows_the_8x8x8_causal_tokenizer():
    assert cp.latent_shape(cp.VIDEO) == (16, 16, 88, 160)  # 121 frames: 1 + 120 / 8
    assert cp.latent_shape(VIDEO) == (16, 3, 32, 64)


def test_tensor_parallelism_cuts_memory_and_compute_but_adds_link_time(rows):
    one, card, two_cards = (r.transformer for r in rows)
    assert (one.tp, card.tp, two_cards.tp) == (1, 4, 8)
    # weights per die: the linear layers split, the rest (norms, biases of row-parallel layers) not
    assert one.weights_bytes / 4.5 < card.weights_bytes < one.weights_bytes / 3
    assert card.weights_bytes / 2.5 < two_cards.weights_bytes < card.weights_bytes / 1.5
    assert one.activation_bytes >= card.activation_bytes >= two_cards.activation_bytes > 0
    # collectives: none on one die; over the card's switch on 4; over the slower card link on 8
    assert one.collective_s == 0 and one.link == "-"
    assert 0 < card.collective_s < two_cards.collective_s
    assert card.link != two_cards.link and "between cards" in two_cards.link
    # compute per die falls: the call minus its collectives shrinks with TP
    assert one.latency_s - one.collective_s > card.latency_s - card.collective_s \
        > two_cards.latency_s - two_cards.collective_s


def test_video_time_is_steps_times_two_guided_calls_plus_t5_and_vae(rows):
    for r in rows:
        assert r.calls_per_step == 2  # classifier-free guidance: conditional + unconditional call
        # T5 twice: the prompt and the negative prompt, as the pipeline encodes them
        assert r.video_s == pytest.approx(VIDEO["steps"] * 2 * r.transformer.latency_s
                                          + 2 * r.t5.latency_s + r.vae.latency_s)
        assert r.frames_per_s == pytest.approx(VIDEO["frames"] / r.video_s)
        assert r.realtime_factor == pytest.approx(VIDEO["frames"] / VIDEO["fps"] / r.video_s)
        slowest = max(2 * r.t5.latency_s, r.denoise_s, r.vae.latency_s)
        assert r.videos_per_hour_pipelined == pytest.approx(3600 / slowest)
        assert r.videos_per_hour_pipelined >= r.videos_per_hour_sequential
        assert all(s.fits for s in (r.transformer, r.t5, r.vae)) and not r.notes
    table = cp.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and f"{rows[-1].video_s:.0f}" in table


def test_stage_prediction_matches_the_public_api_and_a_real_weight_model(rows):
    module, inputs = cp.build_t5(T5, VIDEO)
    compiled = rebel.compile_from_torch(module, inputs, npu=cp.NPU)
    assert compiled.is_meta
    assert compiled.predicted_latency_s() == pytest.approx(rows[0].t5.latency_s)
    with pytest.raises(rebel.RBLNError, match="prediction only"):
        compiled.create_runtime()
    # the same DiT with real (random) weights and inputs predicts the same time and memory
    meta_module, meta_inputs = cp.build_transformer(DIT, VIDEO)
    real = meta_module.to_empty(device="cpu")
    for p in real.parameters():
        torch.nn.init.normal_(p, std=0.02)
    real_inputs = [torch.randn(x.shape, dtype=x.dtype) for x in meta_inputs]
    real_compiled = rebel.compile_from_torch(real, real_inputs, npu=cp.NPU)
    assert not real_compiled.is_meta
    assert real_compiled.predicted_latency_s() == pytest.approx(rows[0].transformer.latency_s)
    assert real_compiled.program.weight_bytes == rows[0].transformer.weights_bytes


def test_liveness_reuses_dead_activations():
    from torch import nn

    with torch.device("meta"):
        model = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(1024, 1024), nn.Tanh())]).half()
    # 64 MiB activations: bigger than the 32 MiB shared SRAM, every one goes through DRAM
    compiled = rebel.compile_from_torch(model, [torch.empty(32768, 1024, dtype=torch.float16, device="meta")],
                                        npu=cp.NPU, fusion=False)
    program = compiled.program
    one = 32768 * 1024 * 2
    # 16 intermediates of 64 MiB each, but at most a kernel's input and output are live at once
    assert 2 * one <= activation_bytes(program) <= 3 * one
    assert compiled.device_memory_bytes() <= program.weight_bytes + 3 * one
