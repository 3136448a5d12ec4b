"""Capacity plans for diffusers pipelines: a checkpoint folder's stages, each on meta tensors.

A diffusers checkpoint is a folder: `model_index.json` names each component's library and class
(`"transformer": ["diffusers", "CosmosTransformer3DModel"]`) and each component's subfolder holds
its `config.json`. A plan reads them, builds every stage with its library's own class on the
meta device (shapes, no weights; nothing is downloaded), compiles each for prediction only, and
times one call of each at the requested output (height, width, frames) by the event engine:

- text encoder(s) (`T5EncoderModel`, `CLIPTextModel`, `CLIPTextModelWithProjection`): one call
  per prompt, and one more for the negative prompt under classifier-free guidance (as the
  diffusers pipelines encode them);
- the denoiser (`UNet2DConditionModel`, `CosmosTransformer3DModel`) on the latent the VAE's
  compression makes of the output, once per step; guidance doubles its batch (Stable Diffusion
  concatenates the two halves) or, for the Cosmos pipelines, makes two calls per step, as
  diffusers' `CosmosTextToWorldPipeline` does;
- the VAE decoder (`AutoencoderKL`, `AutoencoderKLCosmos`): `post_quant_conv` + `decoder`, once.

Tokenizers, schedulers and safety checkers run on the host and are not compiled (the plan lists
them). Each stage goes on the fewest dies (a power of two) its weights and activations fit, or
on the tensor-parallel size asked for; the total per image or video is the sum of the stages'
calls run one after another, and the stage with the largest share dominates.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import CompileError, PlanError
from ..npu import load_spec
from ..npu.spec import GiB, ProductSpec
from .model import DTYPES, read_json
from .predict import Breakdown

TEXT_ENCODERS = ("T5EncoderModel", "CLIPTextModel", "CLIPTextModelWithProjection")
DENOISERS = ("UNet2DConditionModel", "CosmosTransformer3DModel")
VAES = ("AutoencoderKL", "AutoencoderKLCosmos")
HOST_SIDE = ("scheduler", "tokenizer", "tokenizer_2", "tokenizer_3", "safety_checker",
             "feature_extractor", "image_encoder", "image_processor")
# pipelines that run the conditional and unconditional halves as two denoiser calls
GUIDED_BY_CALLS = ("CosmosTextToWorldPipeline", "CosmosVideoToWorldPipeline")


def meta(*shape, dtype=torch.float16):
    return torch.empty(*shape, dtype=dtype, device="meta")


# ---- stage modules ----------------------------------------------------------------------------

class CosmosDenoise(torch.nn.Module):
    """One denoiser call, as `CosmosTransformer3DModel.forward` runs it, from the latent with the
    padding-mask channel already appended (the pipeline's mask is all zeros; its nearest resize
    and concat are a host-side copy of one plane, and torchvision, which diffusers uses for the
    resize, is not in the main environment). Rotary and learnable positional embeddings and the
    timestep embedding are computed in the graph, as diffusers does, from the shapes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, latent_with_mask, timestep, text):
        m = self.model
        _, _, frames, height, width = latent_with_mask.shape
        p_t, p_h, p_w = m.config.patch_size
        rope = m.rope(latent_with_mask)
        pos = m.learnable_pos_embed(latent_with_mask)
        h = m.patch_embed(latent_with_mask).flatten(1, 3)
        temb, embedded = m.time_embed(h, timestep)
        for block in m.transformer_blocks:
            h = block(h, text, embedded, temb, rope, pos, None, None)
        h = m.proj_out(m.norm_out(h, embedded, temb))
        h = h.unflatten(2, (p_h, p_w, p_t, -1)).unflatten(1, (frames // p_t, height // p_h, width // p_w))
        h = h.permute(0, 7, 1, 6, 2, 4, 3, 5)  # diffusers' unpatchify order
        return h.flatten(6, 7).flatten(4, 5).flatten(2, 3)


class UNetDenoise(torch.nn.Module):
    """One `UNet2DConditionModel` call: noisy latent, timestep, text states -> predicted noise."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, text):
        return self.unet(sample, timestep, text, return_dict=False)[0]


class VAEDecode(torch.nn.Module):
    """The VAE's decode: post-quant conv (when the VAE has one), then the decoder (for
    `AutoencoderKLCosmos` its last step is the inverse Haar wavelet patcher back to pixels)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        post = getattr(self.vae, "post_quant_conv", None)
        return self.vae.decoder(post(z) if post is not None else z)


def latent_shape(video: dict) -> tuple[int, int, int, int]:
    """(C, T, H, W) of the latent a causal video tokenizer makes of the video: the first frame
    coded alone, then `temporal_compression` frames per latent frame."""
    t = (video["frames"] - 1) // video["temporal_compression"] + 1
    return (video["latent_channels"], t, video["height"] // video["spatial_compression"],
            video["width"] // video["spatial_compression"])


class _QuietDiffusers:
    """diffusers warns on `.to(float16)` that no module asks to stay FP32: noise for a plan."""

    def __enter__(self):
        from diffusers.utils import logging

        self.level = logging.get_verbosity()
        logging.set_verbosity_error()

    def __exit__(self, *exc):
        from diffusers.utils import logging

        logging.set_verbosity(self.level)


def build_transformer(config: dict, video: dict, batch: int = 1, dtype=torch.float16):
    """`CosmosTransformer3DModel` for `config` on meta and its inputs for one call on `video`."""
    from diffusers import CosmosTransformer3DModel

    with torch.device("meta"), _QuietDiffusers():
        model = CosmosTransformer3DModel(**_init_args(config)).to(dtype).eval()
    c, t, h, w = latent_shape(video)
    mask = 1 if model.config.concat_padding_mask else 0
    return CosmosDenoise(model), [meta(batch, c + mask, t, h, w, dtype=dtype),
                                  meta(batch, dtype=dtype),
                                  meta(batch, video["prompt_tokens"], model.config.text_embed_dim,
                                       dtype=dtype)]


def build_unet(config: dict, image: dict, batch: int = 1, dtype=torch.float16):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"), _QuietDiffusers():
        unet = UNet2DConditionModel(**_init_args(config)).to(dtype).eval()
    c, _, h, w = latent_shape({**image, "frames": 1, "temporal_compression": 1})
    text = unet.config.cross_attention_dim
    return UNetDenoise(unet), [meta(batch, c, h, w, dtype=dtype), meta(batch, dtype=dtype),
                               meta(batch, image["prompt_tokens"], text, dtype=dtype)]


def build_text_encoder(class_name: str, config: dict, tokens: int, batch: int = 1,
                       dtype=torch.float16):
    """transformers' `class_name` for a component config on meta, and its token-id input."""
    import transformers
    from transformers import AutoConfig

    values = {k: v for k, v in config.items() if not k.startswith("_") and k not in (
        "model_type", "architectures", "transformers_version", "torch_dtype", "dtype")}
    model_type = config.get("model_type") or {"T5EncoderModel": "t5"}.get(class_name)
    if model_type is None:
        raise PlanError(f"text encoder {class_name}: its config.json has no model_type")
    try:
        hf = AutoConfig.for_model(model_type, **values)
    except (TypeError, ValueError, KeyError) as e:
        raise PlanError(f"transformers rejects the {class_name} config: {e}") from None
    if model_type == "t5":
        hf.is_encoder_decoder, hf.use_cache = False, False
    with torch.device("meta"):
        model = getattr(transformers, class_name)(hf).to(dtype).eval()
    return model, [meta(batch, tokens, dtype=torch.long)]


def build_t5(config: dict, video: dict, dtype=torch.float16):
    """The T5 encoder (transformers' `T5EncoderModel`) on a prompt of video["prompt_tokens"]."""
    return build_text_encoder("T5EncoderModel", {"model_type": "t5", **config},
                              video["prompt_tokens"], dtype=dtype)


def build_vae_decoder(config: dict, video: dict, class_name: str = "AutoencoderKLCosmos",
                      dtype=torch.float16):
    import diffusers

    with torch.device("meta"), _QuietDiffusers():
        vae = getattr(diffusers, class_name)(**_init_args(config)).to(dtype).eval()
    c, t, h, w = latent_shape(video)
    shape = (1, c, t, h, w) if class_name == "AutoencoderKLCosmos" else (1, c, h, w)
    return VAEDecode(vae), [meta(*shape, dtype=dtype)]


def _init_args(config: dict) -> dict:
    """A diffusers config.json as constructor keywords (its `_class_name`, `_diffusers_version`
    and similar bookkeeping keys dropped; lists where the constructor takes tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
            if not k.startswith("_")}


# ---- one stage --------------------------------------------------------------------------------

@dataclass
class Stage:
    """One stage compiled at one tensor-parallel size: its DRAM per die and one call's time."""

    name: str
    tp: int
    weights_bytes: int       # per die (its slices of split weights, all of the others)
    activation_bytes: int    # per die, buffers reused once dead (runtime.activation_bytes)
    capacity_bytes: int      # usable DRAM of one die (its DRAM less the firmware reservation)
    latency_s: float         # one call, host copies included
    collective_s: float      # of which: all-reduce/all-gather on the link
    link: str                # the link the collectives take
    compile_s: float
    breakdown: Breakdown = field(default_factory=Breakdown)

    @property
    def dram_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.dram_bytes <= self.capacity_bytes

    @property
    def bottleneck(self) -> str:
        return self.breakdown.bottleneck


def compile_stage(name: str, module, inputs, tp: int = 1, npu: str | ProductSpec = "RBLN-CA25") -> Stage:
    """Compile `module` on meta inputs at `tp` dies and predict one call from die 0 (a group of
    more dies than a card has collectives over the card-to-card link)."""
    from ..compiler.compile import compile_module
    from ..device.engine import EventEngine
    from ..device.events import LINK
    from ..runtime.runtime import activation_bytes
    from ..runtime.timeline import build_steps, die_group
    from .predict import _breakdown

    spec = npu if isinstance(npu, ProductSpec) else load_spec(npu)
    start = time.perf_counter()
    try:
        compiled = compile_module(module, inputs, npu=spec.source or spec.name,
                                  tensor_parallel_size=tp, progress=False)
    except CompileError as e:
        raise PlanError(f"{name}: the compiler cannot lower it: {e}") from e
    compile_s = time.perf_counter() - start
    if not compiled.meta:
        raise PlanError(f"{name}: expected a meta (prediction-only) compile")
    program = compiled.program
    group, link = die_group(program, spec)
    steps = build_steps(program, spec)
    timeline = EventEngine(spec, group[0], group=group, link=link).run(steps)
    collective = sum(e.dur_s for e in timeline.events if e.device == 0 and e.track == LINK)
    breakdown, _ = _breakdown(program, steps, timeline.events, spec)
    return Stage(name, tp, program.weight_bytes, activation_bytes(program),
                 spec.die.memory.dram_usable_bytes, timeline.latency_s, collective,
                 link.name if tp > 1 else "-", compile_s, breakdown)


def smallest_fit(name: str, build, sizes, npu) -> tuple[Stage, list[Stage]]:
    """The stage at the first size of `sizes` whose DRAM per die fits, and every size tried."""
    tried = []
    for tp in sizes:
        module, inputs = build()
        stage = compile_stage(name, module, inputs, tp, npu)
        tried.append(stage)
        if stage.fits:
            return stage, tried
    return tried[-1], tried


# ---- the pipeline folder ----------------------------------------------------------------------

@dataclass(frozen=True)
class Component:
    name: str            # the subfolder, e.g. "transformer"
    library: str         # "diffusers" or "transformers"
    class_name: str
    config: dict
    role: str            # "text_encoder", "denoiser", "vae"


def is_pipeline(path) -> bool:
    p = Path(path)
    return (p / "model_index.json").is_file() or (p.name == "model_index.json" and p.is_file())


def read_pipeline(path) -> tuple[dict, list[Component], list[str]]:
    """(model_index, compiled components in run order, host-side component names)."""
    p = Path(path)
    folder = p.parent if p.name == "model_index.json" else p
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise PlanError(f"no diffusers pipeline at {str(path)!r} (a folder holding model_index.json)")
    index = read_json(index_file, "JSON file")
    comps, host = [], []
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        if len(entry) != 2 or entry[0] is None or entry[1] is None:
            continue  # an absent optional component: [null, null]
        library, cls = entry
        role = ("text_encoder" if cls in TEXT_ENCODERS else "denoiser" if cls in DENOISERS
                else "vae" if cls in VAES else None)
        if role is None:
            if name in HOST_SIDE or name.startswith(HOST_SIDE):
                host.append(name)
                continue
            raise PlanError(f"{index_file}: component {name!r} is {library}.{cls}, which the planner "
                            f"does not build; text encoders: {', '.join(TEXT_ENCODERS)}; denoisers: "
                            f"{', '.join(DENOISERS)}; VAEs: {', '.join(VAES)}")
        cfg_file = folder / name / "config.json"
        if not cfg_file.is_file():
            raise PlanError(f"{folder}: component {name!r} ({cls}) has no {name}/config.json")
        config = read_json(cfg_file, "JSON file")
        comps.append(Component(name, library, cls, config, role))
    roles = [c.role for c in comps]
    if roles.count("denoiser") != 1:
        raise PlanError(f"{index_file}: a pipeline needs exactly one denoiser "
                        f"({', '.join(DENOISERS)}), found {roles.count('denoiser')}")
    if roles.count("vae") > 1:
        raise PlanError(f"{index_file}: more than one VAE")
    order = {"text_encoder": 0, "denoiser": 1, "vae": 2}
    comps.sort(key=lambda c: order[c.role])
    return index, comps, host


# ---- plans ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StagePlan:
    component: str
    class_name: str
    role: str
    calls: int                # per image / video
    batch: int                # rows per call
    stage: Stage
    tried: tuple[Stage, ...]  # every TP compiled to find where it fits

    @property
    def total_s(self) -> float:
        return self.calls * self.stage.latency_s

    @property
    def dies(self) -> int:
        return self.stage.tp

    def to_dict(self, spec_dies: int) -> dict:
        s = self.stage
        return {"component": self.component, "class": self.class_name, "role": self.role,
                "calls": self.calls, "batch": self.batch, "call_s": s.latency_s,
                "total_s": self.total_s, "tp": s.tp, "dies": s.tp,
                "cards": math.ceil(s.tp / spec_dies), "weights_bytes": s.weights_bytes,
                "activation_bytes": s.activation_bytes, "dram_bytes": s.dram_bytes,
                "capacity_bytes": s.capacity_bytes, "fits": s.fits, "collective_s": s.collective_s,
                "link": s.link, "compile_s": s.compile_s, "breakdown": s.breakdown.as_dict(),
                "bottleneck": s.bottleneck,
                "tried": [{"tp": t.tp, "dram_bytes": t.dram_bytes, "fits": t.fits} for t in self.tried]}


@dataclass(frozen=True)
class PipelinePlan:
    pipeline: str            # model_index's _class_name
    model: str
    hardware: str
    height: int
    width: int
    frames: int
    steps: int
    guidance: bool
    batch: int               # images / videos per prompt
    stages: tuple[StagePlan, ...]
    host_components: tuple[str, ...]
    dies_per_card: int
    power_w: float
    notes: tuple[str, ...] = ()

    @property
    def total_s(self) -> float:
        """One prompt's images / video: every stage's calls, one after another."""
        return sum(s.total_s for s in self.stages)

    @property
    def dominant(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total_s)

    @property
    def fits(self) -> bool:
        return all(s.stage.fits for s in self.stages)

    @property
    def dies(self) -> int:
        """Dies when every stage has dies of its own (pipelined); sequential runs need the most
        any one stage needs."""
        return sum(s.dies for s in self.stages)

    @property
    def cards(self) -> int:
        return math.ceil(self.dies / self.dies_per_card)

    @property
    def watts(self) -> float:
        return self.cards * self.power_w

    @property
    def outputs_per_s(self) -> float:
        return self.batch / self.total_s

    @property
    def outputs_per_s_pipelined(self) -> float:
        """Each stage on dies of its own, prompts overlapped: one batch leaves per slowest stage."""
        return self.batch / max(s.total_s for s in self.stages)

    @property
    def joules_per_output(self) -> float:
        return self.watts * self.total_s / self.batch

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("stages",)}
        d.update(kind="pipeline", stages=[s.to_dict(self.dies_per_card) for s in self.stages],
                 total_s=self.total_s, dominant=self.dominant.component,
                 dominant_share=self.dominant.total_s / self.total_s, fits=self.fits,
                 dies=self.dies, cards=self.cards, watts=self.watts,
                 outputs_per_s=self.outputs_per_s,
                 outputs_per_s_pipelined=self.outputs_per_s_pipelined,
                 joules_per_output=self.joules_per_output)
        return d

    def __repr__(self) -> str:
        what = f"{self.frames}-frame video" if self.frames > 1 else "image"
        lines = [f"PipelinePlan({self.model}: {self.pipeline}, {self.height}x{self.width} {what}, "
                 f"{self.steps} steps, guidance {'on' if self.guidance else 'off'}, {self.hardware})"]
        for s in self.stages:
            st = s.stage
            lines.append(f"  {s.component:<14} {s.class_name:<26} TP={st.tp:<2} {s.calls:>3} x "
                         f"{st.latency_s * 1e3:10.2f} ms = {s.total_s:8.3f} s, "
                         f"{st.dram_bytes / GiB:6.2f} GiB/die {'fits' if st.fits else 'DOES NOT FIT'}"
                         f" (bound by {st.bottleneck})")
        lines.append(f"  total {self.total_s:.3f} s per {what} ({self.dominant.component} "
                     f"{self.dominant.total_s / self.total_s:.0%}); {self.dies} dies, {self.cards} "
                     f"card(s), {self.joules_per_output:.0f} J per {what}")
        return "\n".join(lines)


def plan_pipeline(path, hardware: str | ProductSpec = "RBLN-CA25", *, height: int | None = None,
                  width: int | None = None, frames: int | None = None, steps: int | None = None,
                  guidance: bool = True, batch: int = 1, prompt_tokens: int | None = None,
                  dtype: str = "float16", tp: dict | int | None = None,
                  max_dies: int | None = None) -> PipelinePlan:
    """Plan one prompt through the pipeline folder at `path`.

    height / width / frames / steps default to the pipeline's usual output (the Cosmos
    text-to-world pipelines: 704x1280, 121 frames, 36 steps; image pipelines: the UNet's
    `sample_size` x the VAE's factor, 50 steps). tp: one TP size for the denoiser, or a dict
    component -> TP; a stage without one goes on the fewest dies (a power of two up to
    `max_dies`, default 8 cards' worth) it fits."""
    index, comps, host = read_pipeline(path)
    spec = hardware if isinstance(hardware, ProductSpec) else load_spec(hardware)
    if spec.power_w is None:
        raise PlanError(f"{spec.source} gives no power_w for {spec.name}; the plan's watts need it")
    if dtype not in DTYPES:
        raise PlanError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    pipeline_class = str(index.get("_class_name", "pipeline"))
    denoiser = next(c for c in comps if c.role == "denoiser")
    vae = next((c for c in comps if c.role == "vae"), None)
    video = denoiser.class_name == "CosmosTransformer3DModel"
    if vae is not None and vae.class_name == "AutoencoderKLCosmos":
        vc = vae.config
        spatial = int(vc.get("spatial_compression_ratio", 8))
        temporal = int(vc.get("temporal_compression_ratio", 8))
        channels = int(vc.get("latent_channels", 16))
    elif vae is not None:
        spatial = 2 ** (len(vae.config.get("block_out_channels", (1, 1, 1, 1))) - 1)
        temporal, channels = 1, int(vae.config.get("latent_channels", 4))
    else:
        raise PlanError(f"{path}: the pipeline has no VAE ({', '.join(VAES)}) to size the latent")
    if video:
        height, width = height or 704, width or 1280
        frames, steps = frames or 121, steps or 36
    else:
        size = denoiser.config.get("sample_size", 64)
        size = size[0] if isinstance(size, list) else size
        height, width = height or size * spatial, width or size * spatial
        steps = steps or 50
        if frames not in (None, 1):
            raise PlanError(f"{pipeline_class} makes images; --frames {frames} needs a video pipeline")
        frames = 1
    for name, v in (("height", height), ("width", width), ("frames", frames), ("steps", steps),
                    ("batch", batch)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlanError(f"{name} must be a positive integer, got {v!r}")
    if height % spatial or width % spatial:
        raise PlanError(f"height and width must be multiples of the VAE's {spatial}x compression, "
                        f"got {height}x{width}")
    if video and (frames - 1) % temporal:
        raise PlanError(f"frames must be 1 + a multiple of {temporal} (the causal tokenizer codes "
                        f"the first frame alone, then {temporal} per latent frame), got {frames}")
    if not isinstance(tp, dict):
        tp = {denoiser.name: tp} if tp is not None else {}
    max_dies = max_dies or 8 * spec.dies
    sizes = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= max_dies]
    shape = dict(height=height, width=width, frames=frames, latent_channels=channels,
                 spatial_compression=spatial, temporal_compression=temporal)
    by_calls = pipeline_class in GUIDED_BY_CALLS
    halves = 2 if guidance else 1
    stages, notes = [], []
    text_tokens = None
    for comp in comps:
        if comp.role == "text_encoder":
            tokens = prompt_tokens or (512 if comp.class_name == "T5EncoderModel" else
                                       int(comp.config.get("max_position_embeddings", 77)))
            text_tokens = text_tokens or tokens
            build = (lambda c=comp, n=tokens: build_text_encoder(c.class_name, c.config, n, batch,
                                                                 torch_dtype))
            calls, rows = halves, batch  # the prompt, and the negative prompt under guidance
        elif comp.role == "denoiser":
            if text_tokens is None:
                raise PlanError(f"{path}: the denoiser needs a text encoder's states; none found")
            rows = batch if by_calls else batch * halves
            calls = steps * (halves if by_calls else 1)
            sh = {**shape, "prompt_tokens": text_tokens}
            if video:
                build = (lambda c=comp, s=sh, r=rows: build_transformer(c.config, s, r, torch_dtype))
            else:
                build = (lambda c=comp, s=sh, r=rows: build_unet(c.config, s, r, torch_dtype))
        else:
            rows, calls = 1, batch  # the decoder once per image / video
            build = (lambda c=comp: build_vae_decoder(c.config, shape, c.class_name, torch_dtype))
        want = tp.get(comp.name)
        label = f"{comp.name} ({comp.class_name})"
        if want is not None:
            if isinstance(want, bool) or not isinstance(want, int) or want < 1:
                raise PlanError(f"{comp.name}: TP must be a positive integer, got {want!r}")
            module, inputs = build()
            stage = compile_stage(label, module, inputs, want, spec)
            tried = [stage]
        else:
            stage, tried = smallest_fit(label, build, sizes, spec)
        if not stage.fits:
            notes.append(f"{comp.name} does not fit at TP={stage.tp}: {stage.dram_bytes / GiB:.2f} "
                         f"GiB per die > {stage.capacity_bytes / GiB:.2f} GiB usable")
        stages.append(StagePlan(comp.name, comp.class_name, comp.role, calls, rows, stage,
                                tuple(tried)))
    name = Path(path).name if Path(path).name != "model_index.json" else Path(path).parent.name
    return PipelinePlan(pipeline_class, name, spec.name, height, width, frames, steps, guidance,
                        batch, tuple(stages), tuple(host), spec.dies, spec.power_w, tuple(notes))
