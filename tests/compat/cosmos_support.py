"""Tiny Cosmos text-to-world pipelines (random weights, no downloads) and a tiny local guardrail.

Used by tests/compat/test_cosmos.py, the reload worker (a request's "imports") and
benchmarks/pipelines.py. Importing this module also makes the vendor's Cosmos classes importable
where the environment has no torchvision (see shims/torchvision).

Why a tiny guardrail: diffusers' `CosmosTextToWorldPipeline` refuses to run without a safety
checker, and the vendor's `RBLNCosmosSafetyChecker` needs the `cosmos_guardrail` package plus hub
checkpoints (Qwen3Guard, RetinaFace, SigLIP). The pipeline only asks its safety checker for
`.to(device)`, `check_text_safety(prompt) -> bool` (before encoding the prompt) and
`check_video_safety(frames uint8 [T, H, W, C]) -> frames` (after the VAE decode, not at all for
`output_type="latent"`). `TinyGuardrail` answers those in FP32 eager torch (the reference pipeline's
checker); `RBLNTinyGuardrail` is the same guardrail with its video classifier compiled by our
`rebel` and run by a `rebel.Runtime`. It subclasses the vendor's `RBLNCosmosSafetyChecker` so that
diffusers saves it (optimum-rbln registers that class as a loadable pipeline component) and the
vendor's pipeline reloads it from the folder's model_index.json (`register()` below makes the
class findable by name in `optimum.rbln`, where diffusers and the vendor look components up).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

import numpy as np

_SHIM = Path(__file__).resolve().with_name("shims") / "torchvision" / "__init__.py"
_VENDOR_TORCHVISION_USERS = ("optimum.rbln.diffusers.models.transformers.transformer_cosmos",
                             "optimum.rbln.diffusers.models.controlnets.controlnet_cosmos")


def import_vendor_cosmos() -> None:
    """Import the vendor modules that need torchvision, with the shim standing in for it only
    while their module bodies run (then it leaves sys.modules again). On the path it would fool
    transformers' availability probe (`find_spec`), which then imports torchvision.transforms.v2."""
    if importlib.util.find_spec("torchvision") is not None:
        return  # a real torchvision: nothing to stand in for
    # everything else those modules import comes first, so the window holds only their bodies
    import diffusers.models.transformers.transformer_cosmos  # noqa: F401
    import optimum.rbln.diffusers.configurations  # noqa: F401
    import optimum.rbln.modeling  # noqa: F401
    import optimum.rbln.modeling_rope_utils  # noqa: F401
    spec = importlib.util.spec_from_file_location("torchvision", _SHIM,
                                                  submodule_search_locations=[str(_SHIM.parent)])
    shim = importlib.util.module_from_spec(spec)
    sys.modules["torchvision"] = shim
    try:
        spec.loader.exec_module(shim)
        for name in _VENDOR_TORCHVISION_USERS:
            importlib.import_module(name)
        # diffusers' own Cosmos transformer imports torchvision only where it is installed, and
        # with concat_padding_mask (Cosmos-1.0's setting) calls the same resize: the FP32
        # reference needs the same stand-in
        reference = sys.modules["diffusers.models.transformers.transformer_cosmos"]
        if not hasattr(reference, "transforms"):
            reference.transforms = shim.transforms
    finally:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]


import_vendor_cosmos()

# The tiny video: 9 frames of 32 x 32 (3 latent frames of 8 x 8 with the 4x4x4 tokenizer below)
HEIGHT, WIDTH, NUM_FRAMES, MAX_SEQ_LEN = 32, 32, 9, 16
WORDS = ("a robot arm picks up a red cube from the table and the camera moves slowly "
         "left right over city street at night with rain cars people walking").split()
BLOCKED = ("gore", "weapon")  # the tiny guardrail's text blocklist


# --- components ----------------------------------------------------------------------------

def tiny_t5_tokenizer():
    """A T5 (Unigram) tokenizer over a few dozen whole words, built in memory."""
    from transformers import T5TokenizerFast
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -1.0) for w in dict.fromkeys(WORDS + list(BLOCKED))]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=MAX_SEQ_LEN)


def tiny_components(seed: int = 0) -> dict:
    """text_encoder, tokenizer, transformer, vae and scheduler of a tiny Cosmos-1.0 text-to-world
    model: the 7B's structure (learnable position embedding, padding-mask channel, RoPE scale
    (2, 1, 1), patch (1, 2, 2), adaLN-LoRA) at hidden 32, 2 layers, 2 heads x 16."""
    from diffusers import AutoencoderKLCosmos, CosmosTransformer3DModel, EDMEulerScheduler
    from transformers import T5Config, T5EncoderModel
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    torch.manual_seed(seed + 1)
    transformer = CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        mlp_ratio=2.0, text_embed_dim=32, adaln_lora_dim=4, max_size=(4, 32, 32),
        patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=True,
        extra_pos_embed_type="learnable").eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLCosmos(
        in_channels=3, out_channels=3, latent_channels=4, encoder_block_out_channels=(8, 8, 8, 8),
        decode_block_out_channels=(8, 8, 8, 8), attention_resolutions=(8,), resolution=64,
        num_layers=1, patch_size=4, patch_type="haar", scaling_factor=1.0,
        spatial_compression_ratio=4, temporal_compression_ratio=4).eval()
    scheduler = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5,
                                  sigma_schedule="karras", num_train_timesteps=1000,
                                  prediction_type="epsilon", rho=7.0, final_sigmas_type="sigma_min")
    return dict(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                scheduler=scheduler)


def fp32_pipeline(seed: int = 0, guardrail: "TinyGuardrail | None" = None):
    """diffusers' own CosmosTextToWorldPipeline over the tiny components, FP32 on the CPU."""
    from diffusers import CosmosTextToWorldPipeline
    return CosmosTextToWorldPipeline(**tiny_components(seed),
                                     safety_checker=guardrail or TinyGuardrail())


def call_kwargs(seed: int = 0, **overrides) -> dict:
    """One pipeline call: prompt, two Euler steps with classifier-free guidance, seeded noise."""
    kwargs = dict(prompt="a robot arm picks up a red cube",
                  negative_prompt="city street at night with rain", height=HEIGHT, width=WIDTH,
                  num_frames=NUM_FRAMES, num_inference_steps=2, guidance_scale=3.0, fps=30,
                  max_sequence_length=MAX_SEQ_LEN, generator=torch.Generator().manual_seed(seed),
                  output_type="latent")
    kwargs.update(overrides)
    return kwargs


# --- the tiny guardrail --------------------------------------------------------------------

class TinyVideoSafetyNet(torch.nn.Module):
    """Frames [T, 3, H, W] in [0, 1] -> logits [T, 2] (safe, unsafe): one strided convolution,
    a spatial mean and a linear head; random weights, the head biased by `bias` logits towards
    "safe" (or towards "unsafe", to test blocking)."""

    def __init__(self, seed: int = 0, bias: float = 4.0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
        self.head = torch.nn.Linear(8, 2)
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor([bias / 2, -bias / 2]))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(frames * 2.0 - 1.0))
        return self.head(x.mean(dim=(2, 3)))


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """The pipeline's uint8 video [T, H, W, C] as the classifier's input [T, C, H, W] in [0, 1]."""
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"check_video_safety expects uint8 frames [T, H, W, 3], got "
                         f"{getattr(frames, 'shape', type(frames).__name__)}")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0


class _GuardrailLogic:
    """Shared verdicts: a word blocklist on the prompt (host, as cosmos_guardrail's Blocklist
    runs), and the classifier's per-frame P(unsafe) against `threshold` on the video. A blocked
    video comes back black (all zeros), the same shape, so the pipeline still returns one."""

    blocklist: tuple[str, ...]
    threshold: float

    # diffusers asks the pipeline's first nn.Module component for these (the guardrail may be it)
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def check_text_safety(self, prompt: str) -> bool:
        words = {w.strip(".,;:!?\"'").lower() for w in str(prompt).split()}
        return not words & set(self.blocklist)

    def video_logits(self, frames: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_video_safety(self, frames: np.ndarray) -> np.ndarray:
        logits = self.video_logits(frames_to_tensor(frames)).float()
        self.last_video_logits = logits
        unsafe = torch.softmax(logits, dim=-1)[:, 1]
        self.last_video_blocked = bool((unsafe > self.threshold).any())
        return np.zeros_like(frames) if self.last_video_blocked else frames


class TinyGuardrail(_GuardrailLogic, torch.nn.Module):
    """The FP32 guardrail: the reference pipeline's safety checker, and what gets compiled."""

    def __init__(self, seed: int = 0, bias: float = 4.0, blocklist=BLOCKED, threshold: float = 0.5):
        super().__init__()
        self.net = TinyVideoSafetyNet(seed, bias).eval()
        self.blocklist, self.threshold = tuple(blocklist), float(threshold)

    def video_logits(self, frames: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net(frames)


def _vendor_checker_base():
    from optimum.rbln.diffusers.pipelines.cosmos.cosmos_guardrail import RBLNCosmosSafetyChecker
    return RBLNCosmosSafetyChecker


class RBLNTinyGuardrail(_GuardrailLogic, _vendor_checker_base()):
    """The tiny guardrail with its classifier compiled for the NPU (frames [T, 3, H, W], the
    compiled video's shape). Saved as `blocklist.json` + `classifier.rbln` in its subfolder."""

    CONFIG, GRAPH = "guardrail.json", "classifier.rbln"

    def __init__(self, compiled, blocklist, threshold: float, frames_shape, device: int = 0):
        import rebel
        torch.nn.Module.__init__(self)  # the vendor base's __init__ needs cosmos_guardrail
        self.compiled = compiled
        self.blocklist, self.threshold = tuple(blocklist), float(threshold)
        self.frames_shape = tuple(int(d) for d in frames_shape)
        self.runtime = rebel.Runtime(compiled, tensor_type="pt", device=device)

    @classmethod
    def from_model(cls, guardrail: TinyGuardrail, num_frames: int = NUM_FRAMES,
                   height: int = HEIGHT, width: int = WIDTH, device: int = 0) -> "RBLNTinyGuardrail":
        import rebel
        shape = [num_frames, 3, height, width]
        compiled = rebel.compile_from_torch(guardrail.net, input_info=[("frames", shape, "float32")])
        return cls(compiled, guardrail.blocklist, guardrail.threshold, shape, device)

    def video_logits(self, frames: torch.Tensor) -> torch.Tensor:
        if tuple(frames.shape) != self.frames_shape:
            raise ValueError(f"the guardrail's classifier was compiled for frames "
                             f"{list(self.frames_shape)}, got {list(frames.shape)}")
        return self.runtime(frames.contiguous())

    def save_pretrained(self, save_dir, **_):
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        self.compiled.save(save_dir / self.GRAPH)
        (save_dir / self.CONFIG).write_text(json.dumps(
            {"blocklist": list(self.blocklist), "threshold": self.threshold,
             "frames_shape": list(self.frames_shape)}, indent=1))

    @classmethod
    def from_pretrained(cls, model_id, subfolder: str | None = None, export: bool = False,
                        rbln_config=None, **_):
        """Load a saved guardrail (what the vendor pipeline calls on reload: `model_id` is the
        pipeline folder, `subfolder` "safety_checker"; `rbln_config` may name a device)."""
        import rebel
        if export:
            raise ValueError("RBLNTinyGuardrail compiles with from_model(TinyGuardrail(...))")
        folder = Path(model_id) / subfolder if subfolder else Path(model_id)
        if not (folder / cls.CONFIG).is_file():
            raise FileNotFoundError(f"no saved tiny guardrail in {folder} ({cls.CONFIG} missing)")
        meta = json.loads((folder / cls.CONFIG).read_text())
        device = rbln_config.get("device") if isinstance(rbln_config, dict) else None
        return cls(rebel.RBLNCompiledModel(folder / cls.GRAPH), meta["blocklist"], meta["threshold"],
                   meta["frames_shape"], device=device if isinstance(device, int) else 0)


def register() -> None:
    """Make RBLNTinyGuardrail findable by name in `optimum.rbln`: diffusers checks a passed
    component against `getattr(library, class_name)` of the model_index entry, and the vendor's
    reload resolves that entry with `getattr(optimum.rbln, class_name)`."""
    import optimum.rbln
    setattr(optimum.rbln, RBLNTinyGuardrail.__name__, RBLNTinyGuardrail)


register()
