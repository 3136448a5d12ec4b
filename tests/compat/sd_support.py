"""Tiny random-weight Stable Diffusion components and pipeline (no downloads), shared by
test_diffusers.py and benchmarks/pipelines.py."""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def tiny_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16).eval()


def tiny_unet(sample_size=8):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8).eval()


def tiny_clip_tokenizer(folder: Path):
    """A CLIP BPE tokenizer over single letters (ids < 60), written as vocab.json/merges.txt."""
    from transformers import CLIPTokenizer
    folder.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"),
                         model_max_length=16)


def fp32_pipeline(tokenizer_folder: Path):
    """A 16x16 text-to-image pipeline: CLIP text encoder (2 layers x 32), UNet (32/64 channels,
    one cross-attention level), VAE (16/32 channels), DDIM; no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, projection_dim=32)).eval()
    return StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tiny_clip_tokenizer(tokenizer_folder),
        unet=tiny_unet(sample_size=8), scheduler=DDIMScheduler(num_train_timesteps=100),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# vendor compile options matching fp32_pipeline (16x16 images, guidance folded into UNet batch 2)
RBLN_OPTIONS = dict(rbln_img_height=16, rbln_img_width=16, rbln_guidance_scale=5.0)


def call_kwargs(steps: int = 2, **overrides) -> dict:
    """One call: two DDIM steps with guidance 5 from fixed latents."""
    kwargs = dict(prompt="a cat", num_inference_steps=steps, guidance_scale=5.0, height=16,
                  width=16, latents=torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)),
                  output_type="latent")
    kwargs.update(overrides)
    return kwargs
