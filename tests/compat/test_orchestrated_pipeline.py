"""The vendor's RBLNStableDiffusionPipeline, unmodified, with its submodules on three dies and two
requests recorded by rebel.runtime.Orchestrator: outputs unchanged, the orchestrated prediction
faster than the sequential one, and the trace showing request 2's text encoding beside request
1's denoising."""
from __future__ import annotations

import torch

import optimum.rbln
import sd_support as sd
from test_diffusers import _compile, _rand


def test_two_requests_overlap_on_three_dies(tmp_path):
    from rebel.profiler import read_trace
    from rebel.runtime import Orchestrator

    sd.fp32_pipeline(tmp_path / "tok").save_pretrained(tmp_path / "hf")
    _compile("RBLNStableDiffusionPipeline", tmp_path / "hf", tmp_path / "rbln",
             rbln_create_runtimes=False, **sd.RBLN_OPTIONS)
    rbln = optimum.rbln.RBLNStableDiffusionPipeline.from_pretrained(
        tmp_path / "rbln", export=False,
        rbln_config={"text_encoder": {"device": 0}, "unet": {"device": 1}, "vae": {"device": 2}})
    call = dict(prompt="a cat", num_inference_steps=3, guidance_scale=5.0, height=16, width=16,
                output_type="pt")
    plain = rbln(**call, latents=_rand(1, 4, 8, 8, seed=3)).images

    orch = Orchestrator(host_gap_s=20e-6)
    assert set(orch.label(rbln)) == {"text_encoder", "unet", "vae"}
    for name in ("r1", "r2"):
        with orch.request(name):
            assert torch.equal(rbln(**call, latents=_rand(1, 4, 8, 8, seed=3)).images, plain)
    stages = [r.stage for r in orch.requests[0].runs]
    assert stages == ["text_encoder"] * 2 + ["unet"] * 3 + ["vae"], stages  # CFG: two prompts
    plan = orch.schedule()
    plan.check()
    assert plan.dies == [0, 1, 2] and plan.orchestrated_s < 0.9 * plan.sequential_s  # 1.17x: the UNet dominates

    slices = [s for s in read_trace(plan.write_trace(tmp_path / "sd.pb")) if s.category == "stage"]
    enc2 = [s for s in slices if s.name == "r2/text_encoder"]
    unet1 = [s for s in slices if s.name == "r1/unet"]
    assert {s.group.split(" ·")[0] for s in enc2} == {"NPU 0"} and len(unet1) == 3
    assert any(e.start_ns < u.end_ns and u.start_ns < e.end_ns for e in enc2 for u in unet1)
