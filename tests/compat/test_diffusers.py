"""Vendor diffusers classes and the Stable Diffusion pipeline: compile, save, reload in a fresh
process, run, and match the FP32 diffusers model (tiny random-weight components, no downloads)."""
from __future__ import annotations

import pytest
import torch

import optimum.rbln
import sd_support
from compat_support import assert_close, assert_host_fallbacks
from sd_support import tiny_unet as _unet, tiny_vae as _vae


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _compile(cls, src, out, **rbln):
    compiled = getattr(optimum.rbln, cls).from_pretrained(src, export=True, **rbln)
    compiled.save_pretrained(out)
    del compiled


def test_autoencoder_kl(tmp_path, reloader):
    vae = _vae()
    vae.save_pretrained(tmp_path / "hf")
    _compile("RBLNAutoencoderKL", tmp_path / "hf", tmp_path / "rbln", rbln_create_runtimes=False,
             rbln_sample_size=(16, 16), rbln_uses_encoder=True)
    assert_host_fallbacks(tmp_path / "rbln", graphs=2)  # encoder.rbln and decoder.rbln
    z, x = _rand(1, 4, 8, 8), _rand(1, 3, 16, 16, seed=1)
    got = reloader.run("RBLNAutoencoderKL", tmp_path / "rbln", z, method="decode")
    got_enc = reloader.run("RBLNAutoencoderKL", tmp_path / "rbln", x, method="encode",
                           pick=["latent_dist.mean", "latent_dist.std"])
    with torch.no_grad():
        want = vae.decode(z).sample
        posterior = vae.encode(x).latent_dist
    assert_close(got["sample"], want, "vae.decode sample")
    assert_close(got_enc["latent_dist.mean"], posterior.mean, "vae.encode mean")
    assert_close(got_enc["latent_dist.std"], posterior.std, "vae.encode std")


def test_unet_2d_condition(tmp_path, reloader):
    unet = _unet()
    unet.save_pretrained(tmp_path / "hf")
    _compile("RBLNUNet2DConditionModel", tmp_path / "hf", tmp_path / "rbln",
             rbln_create_runtimes=False, rbln_max_seq_len=16, rbln_batch_size=2)
    assert_host_fallbacks(tmp_path / "rbln", graphs=1)
    sample, text = _rand(2, 4, 8, 8), _rand(2, 16, 32, seed=1)
    t = torch.tensor(10.0)
    got = reloader.run("RBLNUNet2DConditionModel", tmp_path / "rbln", sample, t, text)
    with torch.no_grad():
        want = unet(sample, t, text).sample
    assert_close(got["sample"], want, "unet sample")


def test_stable_diffusion_pipeline(tmp_path, reloader):
    """A whole text-to-image pipeline: CLIP text encoder, UNet (batch 2 for classifier-free
    guidance) and VAE decoder, two DDIM steps from fixed latents, against diffusers FP32: the
    final latents (output_type="latent") in this process and after a reload in a fresh process
    (bit-identical), and the decoded images of the reloaded pipeline."""
    pipe = sd_support.fp32_pipeline(tmp_path / "tok")
    pipe.save_pretrained(tmp_path / "hf")
    compiled = optimum.rbln.RBLNStableDiffusionPipeline.from_pretrained(
        tmp_path / "hf", export=True, **sd_support.RBLN_OPTIONS)
    compiled.save_pretrained(tmp_path / "rbln")
    counts = assert_host_fallbacks(tmp_path / "rbln")
    assert {name.split("/")[0] for name in counts} >= {"text_encoder", "unet", "vae"}, counts

    call = sd_support.call_kwargs()
    del call["output_type"]
    with torch.no_grad():
        want_latents = pipe(**call, output_type="latent").images
        want = pipe(**call, output_type="pt").images
    got_latents = compiled(**call, output_type="latent").images
    del compiled
    assert_close(got_latents, want_latents, "pipeline final latents")
    reloaded = reloader.run("RBLNStableDiffusionPipeline", tmp_path / "rbln", **call,
                            output_type="latent")
    assert torch.equal(reloaded["images"], got_latents), (
        f"reloaded latents differ from the in-process run by up to "
        f"{(reloaded['images'] - got_latents).abs().max().item():.3g}")
    got = reloader.run("RBLNStableDiffusionPipeline", tmp_path / "rbln", **call, output_type="pt")
    assert_close(got["images"], want, "pipeline images")


def test_controlnet(tmp_path, reloader):
    from diffusers import ControlNetModel
    torch.manual_seed(0)
    controlnet = ControlNetModel(
        in_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8, conditioning_embedding_out_channels=(8, 16)).eval()
    # ControlNet's "zero convolutions" start at 0 (its outputs would be all 0): give them weights
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                     controlnet.controlnet_cond_embedding.conv_out]:
            torch.nn.init.normal_(conv.weight, std=0.2)
            torch.nn.init.normal_(conv.bias, std=0.2)
    controlnet.save_pretrained(tmp_path / "hf")
    _compile("RBLNControlNetModel", tmp_path / "hf", tmp_path / "rbln", rbln_create_runtimes=False,
             rbln_unet_sample_size=(8, 8), rbln_vae_sample_size=(16, 16), rbln_max_seq_len=16)
    assert_host_fallbacks(tmp_path / "rbln", graphs=1)
    sample, text, cond = _rand(1, 4, 8, 8), _rand(1, 16, 32, seed=1), _rand(1, 3, 16, 16, seed=2)
    t = torch.tensor(10.0)
    got = reloader.run("RBLNControlNetModel", tmp_path / "rbln", sample, t, text, cond, 0.8)
    with torch.no_grad():
        want = controlnet(sample, t, text, cond, conditioning_scale=0.8)
    assert_close(got["mid_block_res_sample"], want.mid_block_res_sample, "controlnet mid block")
    # The vendor wraps the list of down-block residuals in a 1-tuple (its _prepare_output slices
    # (downs, mid)[:-1]), so they arrive as down_block_res_samples[0][i]
    downs = sorted(k for k in got if k.startswith("down_block_res_samples."))
    assert len(downs) == len(want.down_block_res_samples), downs
    for i, res in enumerate(want.down_block_res_samples):
        assert_close(got[f"down_block_res_samples.0.{i}"], res, f"controlnet down block {i}")
