"""The model zoo: real architectures from transformers/diffusers configs (random weights, nothing
downloaded) compile, run on the virtual NPU and match FP32 PyTorch on the CPU.

Tolerance: max |device - reference| / max |reference| <= 2e-2. FP16 has an 11-bit significand
(relative step 2^-11 ~ 4.9e-4 per rounding); kernels round once per output and errors compound
over the ~2 layers of these models; measured errors are 3e-4 .. 2.5e-3, so 2e-2 catches wrong
kernels (errors of order 1) with margin for 16-bit rounding. Each model's number of host
fallbacks is asserted, so an op that leaves the device shows up here.
"""
from __future__ import annotations

import pytest
import torch

import rebel
from zoo.models import ZOO

REL_TOL = 2e-2


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def test_zoo_covers_the_issue_families():
    names = {z.name for z in ZOO}
    assert len(ZOO) >= 20
    assert {"bert", "roberta", "distilbert", "vit", "clip_text", "clip_vision", "whisper_encoder",
            "wav2vec2", "gpt2", "llama", "qwen2", "mistral", "t5_encoder", "resnet",
            "unet2d_condition", "vae_decoder", "dit"} <= names
    assert names & {"swin", "convnext"} and names & {"phi", "gemma"}


@pytest.mark.parametrize("entry", [pytest.param(z, id=z.name, marks=[pytest.mark.slow] if z.slow else [])
                                   for z in ZOO])
def test_zoo_model_compiles_runs_and_matches(entry):
    torch.random.default_generator.manual_seed(0)
    model, inputs = entry.build()
    model.eval()
    with torch.no_grad():
        ref = model(*inputs)
    compiled = rebel.compile_from_torch(model, inputs)
    report = rebel.explain(compiled)
    assert report.buckets[0].host_ops == entry.host_fallbacks, report
    if entry.host_fallbacks == 0:
        assert report.buckets[0].round_trips == 1  # one launch: nothing comes back to the host
    out = compiled.create_runtime().run(*inputs)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = relative_error(out, ref)
    assert err <= REL_TOL, f"{entry.name}: relative error {err:.3e} > {REL_TOL}"
