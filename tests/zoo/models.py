"""The model zoo: small random-weight models built from transformers/diffusers configs.

Nothing is downloaded: every model comes from a config class with random weights, sized for CI
(hidden 32-64, 1-2 layers, short sequences). Each entry says how many ops are expected to run on
the host, so a change that moves an op off the device shows up as a test failure.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ZooModel:
    name: str
    family: str            # encoder, decoder, encoder-decoder, vision, diffusion
    build: Callable[[], tuple[torch.nn.Module, list[torch.Tensor]]]
    host_fallbacks: int = 0  # host ops expected after compilation (regressions show)
    slow: bool = False


class Select(torch.nn.Module):
    """Runs a model and returns plain tensors (HF ModelOutput objects are not artifact data)."""

    def __init__(self, model: torch.nn.Module, pick: Callable, names: tuple[str, ...] = (),
                 **call_kwargs):
        super().__init__()
        self.model = model
        self.pick = pick
        self.names = names  # keyword names for the inputs (positional when empty)
        self.call_kwargs = call_kwargs

    def forward(self, *args):
        if self.names:
            return self.pick(self.model(**dict(zip(self.names, args)), **self.call_kwargs))
        return self.pick(self.model(*args, **self.call_kwargs))


def _hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _logits(out):
    return out.logits


def _sample(out):
    return out.sample


def _ids(batch: int = 1, seq: int = 8, vocab: int = 100, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _mask(batch: int = 1, seq: int = 8, pad: int = 2) -> torch.Tensor:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[:, seq - pad:] = 0  # right padding: exercises the attention mask path
    return mask


def _rand(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _text_cfg(**kw) -> dict:
    base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64)
    base.update(kw)
    return base


def _decoder_cfg(**kw) -> dict:
    base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                use_cache=False)
    base.update(kw)
    return base


# ---- encoders -----------------------------------------------------------------------------------

def bert():
    from transformers import BertConfig, BertModel
    return Select(BertModel(BertConfig(**_text_cfg())), _hidden), [_ids(), _mask()]


def roberta():
    from transformers import RobertaConfig, RobertaModel
    return Select(RobertaModel(RobertaConfig(**_text_cfg())), _hidden), [_ids(), _mask()]


def distilbert():
    from transformers import DistilBertConfig, DistilBertModel
    cfg = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                           max_position_embeddings=64)
    return Select(DistilBertModel(cfg), _hidden), [_ids(), _mask()]


def vit():
    from transformers import ViTConfig, ViTModel
    cfg = ViTConfig(**_text_cfg(), image_size=32, patch_size=8)
    return Select(ViTModel(cfg), _hidden), [_rand(1, 3, 32, 32)]


def swin():
    from transformers import SwinConfig, SwinModel
    cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                     window_size=4)
    return Select(SwinModel(cfg), _hidden), [_rand(1, 3, 32, 32)]


def convnext():
    from transformers import ConvNextConfig, ConvNextModel
    cfg = ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=32)
    return Select(ConvNextModel(cfg), _hidden), [_rand(1, 3, 32, 32)]


def clip_text():
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(**_text_cfg(), projection_dim=32)
    return Select(CLIPTextModel(cfg), _hidden), [_ids()]


def clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, image_size=32, patch_size=8, projection_dim=32)
    return Select(CLIPVisionModel(cfg), _hidden), [_rand(1, 3, 32, 32)]


def whisper_encoder():
    from transformers import WhisperConfig, WhisperModel
    cfg = WhisperConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16,
                        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1)
    return Select(WhisperModel(cfg).encoder, _hidden), [_rand(1, 16, 32)]


def wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                         conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, do_stable_layer_norm=False)
    return Select(Wav2Vec2Model(cfg), _hidden), [_rand(1, 400)]


# ---- decoders -----------------------------------------------------------------------------------

def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False)
    return Select(GPT2LMHeadModel(cfg), _logits), [_ids()]


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return Select(LlamaForCausalLM(LlamaConfig(**_decoder_cfg())), _logits), [_ids()]


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Select(Qwen2ForCausalLM(Qwen2Config(**_decoder_cfg())), _logits), [_ids()]


def mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return Select(MistralForCausalLM(MistralConfig(**_decoder_cfg(sliding_window=4))), _logits), [_ids()]


def phi():
    from transformers import PhiConfig, PhiForCausalLM
    return Select(PhiForCausalLM(PhiConfig(**_decoder_cfg())), _logits), [_ids()]


def gemma():
    from transformers import GemmaConfig, GemmaForCausalLM
    cfg = GemmaConfig(**_decoder_cfg(head_dim=8))
    return Select(GemmaForCausalLM(cfg), _logits), [_ids()]


# ---- encoder-decoder ----------------------------------------------------------------------------

def t5_encoder():
    from transformers import T5Config, T5EncoderModel
    cfg = T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                   use_cache=False)
    return Select(T5EncoderModel(cfg), _hidden), [_ids()]


def t5():
    from transformers import T5Config, T5Model
    cfg = T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                   use_cache=False)
    return (Select(T5Model(cfg), _hidden, ("input_ids", "decoder_input_ids")),
            [_ids(), _ids(seq=4, seed=1)])


def bart():
    from transformers import BartConfig, BartModel
    cfg = BartConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, max_position_embeddings=64, use_cache=False)
    return (Select(BartModel(cfg), _hidden, ("input_ids", "decoder_input_ids")),
            [_ids(), _ids(seq=4, seed=1)])


# ---- vision CNNs --------------------------------------------------------------------------------

def resnet():
    from transformers import ResNetConfig, ResNetModel
    cfg = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    return Select(ResNetModel(cfg), _hidden), [_rand(1, 3, 32, 32)]


# ---- diffusion ----------------------------------------------------------------------------------

def unet2d_condition():
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)
    return (Select(unet, _sample, return_dict=True),
            [_rand(1, 4, 8, 8), torch.tensor([10.0]), _rand(1, 4, 32, seed=1)])


class VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


def vae_decoder():
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    return VaeDecoder(vae), [_rand(1, 4, 8, 8)]


def dit():
    from diffusers import DiTTransformer2DModel
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                  num_embeds_ada_norm=10, norm_num_groups=8)
    return (Select(model, _sample),
            [_rand(1, 4, 8, 8), torch.tensor([3]), torch.tensor([1])])


ZOO: list[ZooModel] = [
    ZooModel("bert", "encoder", bert),
    ZooModel("roberta", "encoder", roberta),
    ZooModel("distilbert", "encoder", distilbert),
    ZooModel("vit", "encoder", vit),
    ZooModel("swin", "encoder", swin),
    ZooModel("convnext", "encoder", convnext),
    ZooModel("clip_text", "encoder", clip_text),
    ZooModel("clip_vision", "encoder", clip_vision),
    ZooModel("whisper_encoder", "encoder", whisper_encoder),
    ZooModel("wav2vec2", "encoder", wav2vec2),
    ZooModel("gpt2", "decoder", gpt2),
    ZooModel("llama", "decoder", llama),
    ZooModel("qwen2", "decoder", qwen2),
    ZooModel("mistral", "decoder", mistral),
    ZooModel("phi", "decoder", phi),
    ZooModel("gemma", "decoder", gemma),
    ZooModel("t5_encoder", "encoder-decoder", t5_encoder),
    ZooModel("t5", "encoder-decoder", t5),
    ZooModel("bart", "encoder-decoder", bart),
    ZooModel("resnet", "vision", resnet),
    ZooModel("unet2d_condition", "diffusion", unet2d_condition),
    ZooModel("vae_decoder", "diffusion", vae_decoder),
    ZooModel("dit", "diffusion", dit),
]
