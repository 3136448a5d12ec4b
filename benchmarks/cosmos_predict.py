"""Full-size Cosmos-1.0-Diffusion-7B-Text2World on ATOM-Max cards, predicted from meta tensors.

The three stages of the text-to-world pipeline are built with the main environment's
transformers/diffusers classes on the meta device (shapes, no weights; nothing is downloaded) at
the published configurations, compiled for prediction only, and timed by the timing model:

- text encoder: the T5-11B encoder (`T5EncoderModel`; d_model 1024, d_ff 65536, 24 layers,
  128 heads x 128, vocab 32128, ReLU FFN), on a 512-token prompt, twice per video (the
  prompt and the negative prompt, as the pipeline encodes them under guidance);
- denoiser: `CosmosTransformer3DModel` at the 7B Text2World config (hidden 4096 = 32 heads x 128,
  28 layers, MLP ratio 4, AdaLN-LoRA 256, patch (1, 2, 2), 16 latent channels, text 1024) on the
  latent of a 704x1280, 121-frame video through the 8x8x8 tokenizer: 16 x 16 x 88 x 160, i.e.
  16 x 44 x 80 = 56,320 tokens; two calls per denoising step (classifier-free guidance);
- video tokenizer decoder: `AutoencoderKLCosmos` (CV8x8x8-1.0 config, diffusers' defaults)
  `post_quant_conv` + `decoder`, once per video.

Run `python benchmarks/cosmos_predict.py` for the table; `full_size_table()` returns its rows.
The builders and the stage compile are `rebel.plan.pipeline`'s: `rbln-plan
examples/configs/cosmos-7b-text2world` (the same constants as a diffusers checkpoint's configs)
plans the same pipeline, and `folder_plan()` here prints it beside the table.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from rebel.npu import load_spec
from rebel.plan.pipeline import (CosmosDenoise, Stage, VAEDecode, build_t5,  # noqa: F401
                                 build_transformer, build_vae_decoder, compile_stage, latent_shape,
                                 meta, plan_pipeline)
from rebel.plan.pipeline import smallest_fit as _smallest_fit

HALF = torch.float16
NPU = "RBLN-CA25"

# Cosmos-1.0-Diffusion-7B-Text2World denoiser (diffusers' conversion config for the 7B models).
DIT_7B = dict(in_channels=16, out_channels=16, num_attention_heads=32, attention_head_dim=128,
              num_layers=28, mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256,
              max_size=(128, 240, 240), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
              concat_padding_mask=True, extra_pos_embed_type="learnable")
# google-t5/t5-11b, encoder only (Cosmos-1.0 conditions on T5-11B encoder states, 1024 wide).
T5_11B = dict(d_model=1024, d_ff=65536, d_kv=128, num_heads=128, num_layers=24, vocab_size=32128,
              feed_forward_proj="relu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128, is_encoder_decoder=False, use_cache=False)
# Cosmos-1.0-Tokenizer-CV8x8x8: diffusers' AutoencoderKLCosmos defaults are this tokenizer.
VAE_CV8x8x8: dict = dict()
VIDEO = dict(height=704, width=1280, frames=121, fps=30, steps=36, prompt_tokens=512, latent_channels=16,
             spatial_compression=8, temporal_compression=8)


# The stage builders, the stage compile and the fit search are rebel.plan.pipeline's (`rbln-plan`
# on a diffusers folder runs the same code: examples/configs/cosmos-7b-text2world holds these
# constants as a checkpoint's configs).
GiB = 2**30


@dataclass
class Row:
    """End to end for one video on `cards` ATOM-Max cards, stages run one after another."""

    cards: int
    dies: int
    transformer: Stage
    t5: Stage
    vae: Stage
    steps: int
    calls_per_step: int
    frames: int
    fps: int
    notes: list[str] = field(default_factory=list)
    text_calls: int = 2  # the prompt and the negative prompt (guidance), as the pipeline encodes them

    @property
    def step_s(self) -> float:
        return self.calls_per_step * self.transformer.latency_s

    @property
    def denoise_s(self) -> float:
        return self.steps * self.step_s

    @property
    def video_s(self) -> float:
        return self.text_calls * self.t5.latency_s + self.denoise_s + self.vae.latency_s

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.video_s

    @property
    def realtime_factor(self) -> float:
        """Video seconds made per second of compute (1.0 is real time)."""
        return (self.frames / self.fps) / self.video_s

    @property
    def videos_per_hour_pipelined(self) -> float:
        """Requests overlapped with each stage on dies of its own (the next request's T5 and the
        previous one's VAE decode during this one's denoising loop): one video leaves per
        slowest stage."""
        return 3600.0 / max(self.text_calls * self.t5.latency_s, self.denoise_s, self.vae.latency_s)

    @property
    def videos_per_hour_sequential(self) -> float:
        return 3600.0 / self.video_s

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("transformer", "t5", "vae")}
        for key in ("transformer", "t5", "vae"):
            s = getattr(self, key)
            d[key] = {**asdict(s), "dram_bytes": s.dram_bytes, "fits": s.fits}
        d.update(step_s=self.step_s, denoise_s=self.denoise_s, video_s=self.video_s,
                 frames_per_s=self.frames_per_s, realtime_factor=self.realtime_factor,
                 videos_per_hour_sequential=self.videos_per_hour_sequential,
                 videos_per_hour_pipelined=self.videos_per_hour_pipelined)
        return d


def full_size_table(cards=(1, 2, 4, 8), dit: dict | None = None, t5: dict | None = None,
                    vae: dict | None = None, video: dict | None = None, npu: str = NPU,
                    single_die_transformer: bool = True) -> list[Row]:
    """One row per card count: the transformer tensor-parallel over all dies of the cards
    (4 per ATOM-Max), T5 and the VAE decoder each on one die (or over the fewest dies they fit
    on). Classifier-free guidance is two batch-1 transformer calls per step, as diffusers'
    `CosmosTextToWorldPipeline` and the vendor's pipeline call it. Defaults are the full-size
    published configs; pass reduced ones to run the same path small. With
    single_die_transformer, the first row is the transformer on one die (TP=1), to show whether
    it fits there (cards=0 in that row)."""
    dit = DIT_7B if dit is None else dit
    t5 = T5_11B if t5 is None else t5
    vae = VAE_CV8x8x8 if vae is None else vae
    video = VIDEO if video is None else video
    dies_per_card = load_spec(npu).dies
    t5_stage, t5_tried = _smallest_fit("T5-11B encoder", lambda: build_t5(t5, video), (1, 2, 4), npu)
    vae_stage, vae_tried = _smallest_fit("VAE decoder", lambda: build_vae_decoder(vae, video), (1, 2, 4), npu)
    layouts = ([(0, 1)] if single_die_transformer else []) + [(n, n * dies_per_card) for n in cards]
    rows = []
    for n, tp in layouts:
        module, inputs = build_transformer(dit, video)
        stage = compile_stage("Cosmos-7B DiT", module, inputs, tp, npu)
        notes = []
        if not stage.fits:
            notes.append(f"transformer does not fit at TP={tp}: {stage.dram_bytes / GiB:.2f} GiB per die "
                         f"> {stage.capacity_bytes / GiB:.2f} GiB usable")
        for s in (*t5_tried, *vae_tried):
            if not s.fits:
                notes.append(f"{s.name} does not fit at TP={s.tp}: {s.dram_bytes / GiB:.2f} GiB per die")
        rows.append(Row(n, max(tp, n * dies_per_card), stage, t5_stage, vae_stage, video["steps"], 2,
                        video["frames"], video["fps"], notes))
    return rows


def _gib(b: int) -> str:
    return f"{b / GiB:5.2f}"


def format_table(rows: list[Row]) -> str:
    head = ("| cards | DiT TP | DiT DRAM/die GiB (w + act) | fits | DiT call s | of which link s | step s "
            "(2 calls) | T5 s (x2) | VAE s | video s (36 steps) | frames/s | x real time | videos/h seq | "
            "videos/h pipelined |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t = r.transformer
        lines.append(
            f"| {r.cards or '1 die'} | {t.tp} | {_gib(t.dram_bytes)} ({_gib(t.weights_bytes).strip()} + "
            f"{_gib(t.activation_bytes).strip()}) | {'yes' if t.fits else 'NO'} | {t.latency_s:.2f} | "
            f"{t.collective_s:.2f} | {r.step_s:.2f} | {r.t5.latency_s:.3f} | {r.vae.latency_s:.2f} | "
            f"{r.video_s:.0f} | {r.frames_per_s:.3f} | {r.realtime_factor:.4f} | "
            f"{r.videos_per_hour_sequential:.2f} | {r.videos_per_hour_pipelined:.2f} |")
    return "\n".join(lines)


def format_stages(rows: list[Row]) -> str:
    r = rows[0]
    out = []
    for s in (r.t5, r.vae):
        out.append(f"{s.name}: TP={s.tp}, DRAM/die {_gib(s.dram_bytes).strip()} GiB "
                   f"(weights {_gib(s.weights_bytes).strip()} + activations {_gib(s.activation_bytes).strip()}), "
                   f"{'fits' if s.fits else 'does NOT fit'} in {_gib(s.capacity_bytes).strip()} GiB; "
                   f"{s.latency_s * 1e3:.1f} ms per call; compile {s.compile_s:.1f} s")
    for row in rows:
        t = row.transformer
        out.append(f"DiT TP={t.tp:2d} ({t.link}): weights {_gib(t.weights_bytes).strip()} + activations "
                   f"{_gib(t.activation_bytes).strip()} GiB/die; compile {t.compile_s:.1f} s" + "".join(f"; {n}" for n in row.notes))
    return "\n".join(out)


def realtime_scan(resolutions=((704, 1280), (352, 640), (176, 320)), tp: int = 32,
                  dit: dict | None = None, vae: dict | None = None, video: dict | None = None,
                  npu: str = NPU) -> list[dict]:
    """What real time would take: at each resolution (121 frames kept), the transformer at `tp`
    dies and the VAE decoder on one die, the most denoising steps whose video still takes no
    longer than it plays (121 frames at 30 fps), T5 included. steps_for_realtime < 1 means no
    step count gets there at that resolution on that many dies."""
    dit = DIT_7B if dit is None else dit
    vae = VAE_CV8x8x8 if vae is None else vae
    base = VIDEO if video is None else video
    out = []
    for height, width in resolutions:
        v = {**base, "height": height, "width": width}
        module, inputs = build_transformer(dit, v)
        call = compile_stage("Cosmos-7B DiT", module, inputs, tp, npu)
        module, inputs = build_vae_decoder(vae, v)
        dec = compile_stage("VAE decoder", module, inputs, 1, npu)
        _, t, h, w = latent_shape(v)
        tokens = t * h * w // math.prod(dit["patch_size"])
        budget = v["frames"] / v["fps"]
        out.append(dict(height=height, width=width, tokens=tokens, tp=tp, call_s=call.latency_s,
                        vae_s=dec.latency_s, budget_s=budget,
                        steps_for_realtime=math.floor((budget - dec.latency_s) / (2 * call.latency_s)),
                        video_s_at_36_steps=36 * 2 * call.latency_s + dec.latency_s))
    return out


def folder_plan(folder: str | None = None, tp: int = 32, npu: str = NPU):
    """`rebel.plan.pipeline.plan_pipeline` on the example checkpoint folder at the table's video."""
    from pathlib import Path

    folder = folder or str(Path(__file__).resolve().parents[1] / "examples" / "configs" /
                           "cosmos-7b-text2world")
    return plan_pipeline(folder, npu, height=VIDEO["height"], width=VIDEO["width"],
                         frames=VIDEO["frames"], steps=VIDEO["steps"],
                         prompt_tokens=VIDEO["prompt_tokens"], tp={"transformer": tp})


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    start = time.perf_counter()
    rows = full_size_table()
    print(format_table(rows))
    print()
    print(format_stages(rows))
    print(f"\nwhole table: {time.perf_counter() - start:.0f} s wall (compiles included)")
    print("\nthe same pipeline through rbln-plan (examples/configs/cosmos-7b-text2world, DiT at TP=32):")
    print(folder_plan(tp=32))
    print("\nreal time (121 frames in 4.03 s) at lower resolutions, DiT on 32 dies, VAE on one "
          "(T5, 0.23 s, not counted):")
    for r in realtime_scan():
        print(f"  {r['height']}x{r['width']}: {r['tokens']} tokens, DiT call {r['call_s']:.3f} s, "
              f"VAE {r['vae_s']:.2f} s, 36-step video {r['video_s_at_36_steps']:.1f} s, "
              f"steps that fit in {r['budget_s']:.2f} s: {r['steps_for_realtime']}")


if __name__ == "__main__":
    main()
