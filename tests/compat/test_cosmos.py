"""The vendor's Cosmos text-to-world pipeline (optimum-rbln 0.12.0's RBLNCosmosTextToWorldPipeline,
unmodified) on our rebel, end to end, against diffusers' own CosmosTextToWorldPipeline in FP32.

Compiled through the vendor's classes by `RBLNCosmosTextToWorldPipeline.from_pretrained(folder,
export=True, rbln_config=...)`: the T5 text encoder (RBLNT5EncoderModel), the diffusion
transformer (RBLNCosmosTransformer3DModel) and the video tokenizer's decoder
(RBLNAutoencoderKLCosmos; text-to-world needs no encoder). diffusers' pipeline call runs on the
host: the EDM Euler scheduler, classifier-free guidance (two transformer calls per step), and the
vendor's own host-side embeddings (patchify, RoPE, timestep) around the compiled transformer.

Substitutions, because nothing may be downloaded:
- Tiny random-weight components with Cosmos-1.0-7B-Text2World's structure (cosmos_support.py):
  T5 2 layers x 32, DiT 2 layers, 2 heads x 16, learnable position embedding, padding-mask channel;
  a 4x4x4 video tokenizer; a 9-frame 32x32 video (3 x 8 x 8 latents); a word-level T5 tokenizer
  built in memory.
- The guardrail: the vendor's RBLNCosmosSafetyChecker needs the `cosmos_guardrail` package and hub
  checkpoints (Qwen3Guard, RetinaFace). A tiny local one takes its place as the pipeline's
  `safety_checker`: a word blocklist on the prompt (host, as cosmos_guardrail's Blocklist) and a
  small video classifier compiled by our rebel (cosmos_support.RBLNTinyGuardrail, a subclass of
  the vendor's checker so that the pipeline saves and reloads it).
- torchvision is absent from the vendor environment (its PyPI builds do not import beside the
  pinned torch); the one function the vendor's Cosmos module takes from it (a nearest resize of
  the padding mask) comes from tests/compat/shims/torchvision while that module is imported.

Tolerance (16-bit device arithmetic, FP32 reference): compat_support's cosine >= 0.999 and max
abs error <= 2e-2 x max(1, max |FP32|), on the final latents (output_type="latent") and on the
decoded video; the compiled pipeline saved and reloaded in a fresh process gives bit-identical
latents to the in-process run.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cosmos_support as cs
from compat_support import assert_close, assert_host_fallbacks

PIPE = "RBLNCosmosTextToWorldPipeline"


def test_tiny_guardrail_on_the_npu(tmp_path):
    """The guardrail alone: compiled classifier logits match FP32, verdicts follow the blocklist
    and the threshold, and a saved guardrail loads back to the same logits."""
    fp32, strict = cs.TinyGuardrail(), cs.TinyGuardrail(bias=-8.0)
    rbln, rbln_strict = cs.RBLNTinyGuardrail.from_model(fp32), cs.RBLNTinyGuardrail.from_model(strict)
    assert_host_fallbacks_graph(rbln)
    g = np.random.default_rng(0)
    video = g.integers(0, 256, (cs.NUM_FRAMES, cs.HEIGHT, cs.WIDTH, 3), dtype=np.uint8)

    assert rbln.check_text_safety("a robot arm picks up a red cube")
    assert not rbln.check_text_safety("a robot arm picks up a Weapon.")
    out = rbln.check_video_safety(video)
    assert out is video and not rbln.last_video_blocked
    fp32.check_video_safety(video)
    assert_close(rbln.last_video_logits, fp32.last_video_logits, "guardrail logits")

    blocked = rbln_strict.check_video_safety(video)
    assert rbln_strict.last_video_blocked and blocked.shape == video.shape and not blocked.any()
    strict.check_video_safety(video)
    assert strict.last_video_blocked
    assert_close(rbln_strict.last_video_logits, strict.last_video_logits, "strict guardrail logits")

    rbln.save_pretrained(tmp_path / "g")
    again = cs.RBLNTinyGuardrail.from_pretrained(tmp_path, subfolder="g")
    again.check_video_safety(video)
    assert torch.equal(again.last_video_logits, rbln.last_video_logits)
    with pytest.raises(ValueError, match="compiled for frames"):
        again.check_video_safety(video[:4])
    with pytest.raises(FileNotFoundError, match="no saved tiny guardrail"):
        cs.RBLNTinyGuardrail.from_pretrained(tmp_path / "missing")


def assert_host_fallbacks_graph(guardrail: "cs.RBLNTinyGuardrail") -> None:
    import rebel
    assert sum(b.host_ops for b in rebel.explain(guardrail.compiled).buckets) == 0


@pytest.fixture(scope="module")
def cosmos(tmp_path_factory):
    """The FP32 diffusers pipeline, its folder, and the vendor pipeline compiled from that folder
    (runtimes created: it also runs in this process) and saved to another folder."""
    import optimum.rbln
    tmp = tmp_path_factory.mktemp("cosmos")
    guardrail = cs.TinyGuardrail()
    pipe = cs.fp32_pipeline(guardrail=guardrail)
    pipe.save_pretrained(tmp / "hf")  # the guardrail is not a diffusers component: not saved
    compiled = getattr(optimum.rbln, PIPE).from_pretrained(
        str(tmp / "hf"), export=True, safety_checker=cs.RBLNTinyGuardrail.from_model(guardrail),
        rbln_config={"height": cs.HEIGHT, "width": cs.WIDTH, "num_frames": cs.NUM_FRAMES,
                     "max_seq_len": cs.MAX_SEQ_LEN})
    compiled.save_pretrained(tmp / "rbln")
    return pipe, compiled, tmp / "rbln"


@pytest.mark.slow
def test_cosmos_text_to_world_pipeline(cosmos, reloader):
    pipe, compiled, folder = cosmos
    counts = assert_host_fallbacks(folder, graphs=4)
    assert set(counts) == {"text_encoder/compiled_model.rbln", "transformer/compiled_model.rbln",
                           "vae/decoder.rbln", "safety_checker/classifier.rbln"}, counts

    # final latents: the NPU pipeline in this process against diffusers FP32, same seed and prompt
    with torch.no_grad():
        want = pipe(**cs.call_kwargs()).frames
    got = compiled(**cs.call_kwargs()).frames
    assert got.shape == (1, 4, 3, 8, 8)
    assert_close(got, want, "cosmos final latents")

    # the decoded video through the compiled VAE decoder and the compiled guardrail
    with torch.no_grad():
        want_video = pipe(**cs.call_kwargs(output_type="pt")).frames
    got_video = compiled(**cs.call_kwargs(output_type="pt")).frames
    assert got_video.shape == (1, cs.NUM_FRAMES, 3, cs.HEIGHT, cs.WIDTH)
    assert got_video.std() > 0.01, "the decoded video is flat: the comparison would prove little"
    assert_close(got_video, want_video, "cosmos video")
    assert not compiled.safety_checker.last_video_blocked
    assert_close(compiled.safety_checker.last_video_logits, pipe.safety_checker.last_video_logits,
                 "guardrail logits on the decoded video")

    # the guardrail's blocklist stops the vendor pipeline before any device work
    runs = compiled.text_encoder.model[0].runs
    with pytest.raises(ValueError, match="unsafe text"):
        compiled(**cs.call_kwargs(prompt="a robot arm holds a weapon"))
    assert compiled.text_encoder.model[0].runs == runs

    # saved, reloaded in a fresh process (the guardrail class registered by cosmos_support):
    # the same latents, bit for bit
    call = cs.call_kwargs()
    del call["generator"]
    reloaded = reloader.run(PIPE, folder, generator_seed=0, imports=["cosmos_support"], **call)
    assert torch.equal(reloaded["frames"], got), (
        f"reloaded latents differ from the in-process run by up to "
        f"{(reloaded['frames'] - got).abs().max().item():.3g}")


def test_torchvision_stand_in():
    """The stand-in resizes as torchvision does for tensors (nearest: the source pixel at
    floor(i * in / out)), and it left sys.modules once the vendor modules were imported, so no
    other library can mistake it for torchvision."""
    import importlib.util
    import sys
    import optimum.rbln.diffusers.models.transformers.transformer_cosmos as vendor
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("a real torchvision is installed: the stand-in is not used")
    assert "torchvision" not in sys.modules
    resize, mode = vendor.transforms.functional.resize, vendor.transforms.InterpolationMode
    mask = torch.arange(2 * 6 * 8, dtype=torch.float32).reshape(1, 2, 6, 8)
    got = resize(mask, [3, 2], interpolation=mode.NEAREST)
    rows, cols = torch.tensor([0, 2, 4]), torch.tensor([0, 4])
    assert torch.equal(got, mask[..., rows[:, None], cols[None, :]])
    assert resize(mask, 3, interpolation=mode.NEAREST).shape == (1, 2, 3, 4)  # smaller edge -> 3
    smooth = resize(mask, [3, 4], interpolation=mode.BILINEAR, antialias=False)
    assert torch.allclose(smooth, torch.nn.functional.interpolate(
        mask, size=(3, 4), mode="bilinear", align_corners=False))
    with pytest.raises(TypeError, match="tensors only"):
        resize(mask.numpy(), [3, 2])


@pytest.mark.slow
def test_two_cosmos_requests_orchestrated_across_dies(cosmos, tmp_path):
    """The saved pipeline reloaded with its text encoder, transformer and VAE decoder on three
    dies: two requests recorded by rebel.runtime.Orchestrator give the same videos as a plain call,
    the orchestrated prediction beats running them one after the other, and the trace shows
    request 2's text encoding beside request 1's denoising and request 1's decode beside
    request 2's denoising."""
    import optimum.rbln
    from rebel.profiler import read_trace
    from rebel.runtime import Orchestrator

    _, _, folder = cosmos
    placed = getattr(optimum.rbln, PIPE).from_pretrained(
        str(folder), export=False,
        rbln_config={"text_encoder": {"device": 0}, "transformer": {"device": 1},
                     "vae": {"device": 2}})
    plain = placed(**cs.call_kwargs(output_type="pt")).frames

    orch = Orchestrator(host_gap_s=20e-6)  # fixed host gaps: the prediction does not depend on this machine's load
    assert {"text_encoder", "transformer", "vae"} <= set(orch.label(placed))
    for name in ("r1", "r2"):
        with orch.request(name):
            assert torch.equal(placed(**cs.call_kwargs(output_type="pt")).frames, plain)
    stages = [r.stage for r in orch.requests[0].runs]
    assert stages[:2] == ["text_encoder"] * 2 and stages.count("transformer") == 4, stages  # CFG: 2 x 2 steps
    assert stages.index("vae") > max(i for i, s in enumerate(stages) if s == "transformer")

    plan = orch.schedule()
    plan.check()
    assert {0, 1, 2} <= set(plan.dies)
    print(plan.report())
    assert plan.orchestrated_s < plan.sequential_s, plan.report()

    slices = [s for s in read_trace(plan.write_trace(tmp_path / "cosmos.pb")) if s.category == "stage"]

    def overlaps(a, b):
        return any(x.start_ns < y.end_ns and y.start_ns < x.end_ns for x in a for y in b)

    named = lambda n: [s for s in slices if s.name == n]  # noqa: E731
    assert len(named("r1/transformer")) == 4 and len(named("r2/transformer")) == 4
    assert overlaps(named("r2/text_encoder"), named("r1/transformer"))
    assert overlaps(named("r1/vae"), named("r2/transformer"))
