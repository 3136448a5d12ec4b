"""rebel.plan.pipeline and rbln-plan on diffusers pipeline folders: a folder written from the
Cosmos benchmark's reduced configs plans to the benchmark's own figures (one implementation),
totals are the stages' calls x call times, guidance doubles the UNet's batch (Stable
Diffusion) or its calls (Cosmos), a stage's time equals compiling its module directly, and bad
folders or shapes are clear errors."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import rebel
from rebel.cli.plan import main
from rebel.errors import PlanError
from rebel.plan.pipeline import build_unet, plan_pipeline, read_pipeline

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import cosmos_predict as cp  # noqa: E402
from test_cosmos_predict import DIT, T5, VAE, VIDEO  # noqa: E402  (the reduced Cosmos configs)


def write_folder(root: Path, index: dict, components: dict) -> Path:
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps(index))
    for name, config in components.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(config))
    return root


COSMOS_INDEX = {"_class_name": "CosmosTextToWorldPipeline", "safety_checker": [None, None],
                "scheduler": ["diffusers", "EDMEulerScheduler"],
                "text_encoder": ["transformers", "T5EncoderModel"],
                "tokenizer": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "CosmosTransformer3DModel"],
                "vae": ["diffusers", "AutoencoderKLCosmos"]}


@pytest.fixture(scope="module")
def cosmos(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("p") / "cosmos", COSMOS_INDEX, {
        "text_encoder": {"model_type": "t5", **T5},
        "transformer": {"_class_name": "CosmosTransformer3DModel", **DIT},
        "vae": {"_class_name": "AutoencoderKLCosmos", **VAE}})


SD_INDEX = {"_class_name": "StableDiffusionPipeline", "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
CLIP = {"model_type": "clip_text_model", "hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 16,
        "vocab_size": 100, "projection_dim": 32}
UNET = {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
        "layers_per_block": 1, "sample_size": 16, "norm_num_groups": 8, "attention_head_dim": 4,
        "in_channels": 4, "out_channels": 4}
SD_VAE = {"_class_name": "AutoencoderKL", "block_out_channels": [16, 32],
          "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
          "latent_channels": 4, "norm_num_groups": 8, "layers_per_block": 1}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("p") / "sd", SD_INDEX,
                        {"text_encoder": CLIP, "unet": UNET, "vae": SD_VAE})


def test_cosmos_folder_plans_to_the_benchmark_table(cosmos):
    rows = cp.full_size_table(cards=(1,), dit=DIT, t5=T5, vae=VAE, video=VIDEO,
                              single_die_transformer=False)
    plan = plan_pipeline(cosmos, height=VIDEO["height"], width=VIDEO["width"],
                         frames=VIDEO["frames"], steps=VIDEO["steps"],
                         prompt_tokens=VIDEO["prompt_tokens"], tp={"transformer": 4})
    text, dit, vae = plan.stages
    assert (text.calls, dit.calls, vae.calls) == (2, 2 * VIDEO["steps"], 1)  # guidance: 2 calls
    assert dit.batch == 1 and dit.stage.tp == 4 and text.stage.tp == 1 == vae.stage.tp
    row = rows[0]
    assert dit.stage.latency_s == pytest.approx(row.transformer.latency_s, rel=1e-9)
    assert text.stage.latency_s == pytest.approx(row.t5.latency_s, rel=1e-9)
    assert vae.stage.latency_s == pytest.approx(row.vae.latency_s, rel=1e-9)
    assert plan.total_s == pytest.approx(row.video_s, rel=1e-9)
    assert plan.total_s == pytest.approx(sum(s.calls * s.stage.latency_s for s in plan.stages))
    assert plan.dominant.component == max(plan.stages, key=lambda s: s.total_s).component
    assert plan.dies == 6 and plan.cards == 2 and plan.fits
    assert set(plan.host_components) == {"scheduler", "tokenizer"}


def test_example_cosmos_folder_holds_the_benchmark_constants():
    index, comps, host = read_pipeline(ROOT / "examples" / "configs" / "cosmos-7b-text2world")
    by = {c.name: c for c in comps}
    assert index["_class_name"] == "CosmosTextToWorldPipeline"
    dit = {k: v for k, v in by["transformer"].config.items() if not k.startswith("_")}
    assert dit == {k: list(v) if isinstance(v, tuple) else v for k, v in cp.DIT_7B.items()}
    t5 = {k: v for k, v in by["text_encoder"].config.items() if k not in ("model_type", "architectures")}
    assert t5 == cp.T5_11B
    assert [c.role for c in comps] == ["text_encoder", "denoiser", "vae"]


def test_guidance_doubles_the_unet_batch_and_the_prompts(sd):
    on = plan_pipeline(sd, steps=4)
    off = plan_pipeline(sd, steps=4, guidance=False)
    assert (on.height, on.width, on.frames) == (32, 32, 1)  # sample_size 16 x the VAE's 2x
    text, unet, vae = on.stages
    assert (text.calls, unet.calls, unet.batch, vae.calls) == (2, 4, 2, 1)
    assert (off.stages[0].calls, off.stages[1].calls, off.stages[1].batch) == (1, 4, 1)
    assert unet.stage.latency_s > off.stages[1].stage.latency_s
    for p in (on, off):
        assert p.total_s == pytest.approx(sum(s.calls * s.stage.latency_s for s in p.stages))
        assert p.joules_per_output == pytest.approx(p.watts * p.total_s)
    two = plan_pipeline(sd, steps=4, batch=2)
    assert two.stages[1].batch == 4 and two.stages[2].calls == 2


def test_a_stage_equals_compiling_its_module_directly(sd):
    plan = plan_pipeline(sd, height=64, width=48, steps=2)
    module, inputs = build_unet(UNET, dict(height=64, width=48, frames=1, latent_channels=4,
                                           spatial_compression=2, temporal_compression=1,
                                           prompt_tokens=16), batch=2)
    assert tuple(inputs[0].shape) == (2, 4, 32, 24)
    compiled = rebel.compile_from_torch(module, inputs, npu="RBLN-CA25")
    assert plan.stages[1].stage.latency_s == pytest.approx(compiled.predicted_latency_s(), rel=1e-9)
    assert plan.stages[1].stage.weights_bytes == compiled.program.weight_bytes


def test_cli_json_and_table(sd, capsys):
    assert main([str(sd), "--steps", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "pipeline" and out["fits"]
    assert [s["component"] for s in out["stages"]] == ["text_encoder", "unet", "vae"]
    assert out["total_s"] == pytest.approx(sum(s["calls"] * s["call_s"] for s in out["stages"]))
    assert out["dominant"] in {"text_encoder", "unet", "vae"}
    assert main([str(sd), "--steps", "3", "--no-guidance"]) == 0
    text = capsys.readouterr().out
    assert "dominates" in text and "UNet2DConditionModel" in text


@pytest.mark.parametrize("change, args, message", [
    ({"unet": ["diffusers", "FancyNet"]}, [], "FancyNet"),
    ({"vae": None}, [], "no VAE"),
    ({}, ["--frames", "9"], "makes images"),
    ({}, ["--height", "33"], "multiples of the VAE's 2x"),
    ({"text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModel"]},
     [], "text_encoder_2/config.json"),
])
def test_bad_folders_and_shapes(tmp_path, capsys, change, args, message):
    index = {**SD_INDEX, **{k: v for k, v in change.items() if v is not None}}
    index = {k: v for k, v in index.items() if change.get(k, 0) is not None}
    components = {"text_encoder": CLIP, "unet": UNET, "vae": SD_VAE}
    folder = write_folder(tmp_path / "bad", index, {k: v for k, v in components.items() if k in index})
    assert main([str(folder), *args]) == 2
    assert message in capsys.readouterr().err


def test_cosmos_frames_follow_the_causal_tokenizer(cosmos):
    with pytest.raises(PlanError, match="1 \\+ a multiple of 8"):
        plan_pipeline(cosmos, frames=20, height=256, width=512, prompt_tokens=16)
