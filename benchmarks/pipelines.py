"""Diffusion pipelines on the virtual NPU: the vendor's RBLN pipelines (optimum-rbln 0.12.0 over our
rebel) against diffusers' FP32 CPU pipelines, side by side in one run, for the tiny Cosmos
text-to-world and the tiny Stable Diffusion pipelines of tests/compat (random weights, nothing
downloaded).

For each pipeline it prints
- wall time of one whole call (best of --repeat, and the first call, which pays lazy imports
  and cold caches) on this machine: diffusers FP32 on the CPU, and
  the RBLN pipeline, whose compiled submodules run on the emulated NPU (emulation is not the
  chip: this is what a CI box or laptop pays, not a prediction);
- per stage (text encoder, transformer/UNet, VAE decoder, the Cosmos guardrail's classifier):
  runs per call, the predicted device time per run and per call from each runtime's RunReport
  (`latency_s`, host launch to host wake-up on the modelled chip) and the emulation's wall time;
  the denoiser's row also gives the predicted time per denoising step;
- how far the final latents (output_type="latent") are from FP32.

Run in the vendor environment (`make compat` builds it):
    .venv-vendor/bin/python benchmarks/pipelines.py [--steps N] [--repeat N] [--only cosmos|sd] [--full]

--full: also print the full-size Cosmos-1.0-7B-Text2World prediction of benchmarks/cosmos_predict.py
(meta weights, 1-8 ATOM-Max cards; about two minutes of compiling).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "compat"))

import torch  # noqa: E402

STAGES = (("text_encoder", "text encoder"), ("transformer", "transformer"), ("unet", "UNet"),
          ("vae", "VAE decoder"), ("safety_checker", "guardrail classifier"))


def _best(fn, repeat: int):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


class StageMeter:
    """Records every run of the rebel Runtimes behind a pipeline's submodules: the run's
    RunReport (predicted on the modelled NPU) and the emulation's measured wall time."""

    def __init__(self, pipe):
        import rebel
        self.runs: dict[str, list] = {}
        for attr, label in STAGES:
            component = getattr(pipe, attr, None)
            if component is None:
                continue
            runtimes = [m for m in getattr(component, "model", None) or [] if isinstance(m, rebel.Runtime)]
            if isinstance(getattr(component, "runtime", None), rebel.Runtime):
                runtimes.append(component.runtime)  # the tiny guardrail's classifier
            for runtime in runtimes:
                self._wrap(runtime, label)
            if runtimes:
                self.runs[label] = []

    def _wrap(self, runtime, label: str) -> None:
        run = runtime.run  # the bound method; __call__ and forward both go through .run

        def recorded(*args, **kwargs):
            out = run(*args, **kwargs)
            self.runs[label].append(runtime.thread_last_report)
            return out
        runtime.run = recorded

    def reset(self) -> None:
        for reports in self.runs.values():
            reports.clear()


def _error(got: torch.Tensor, want: torch.Tensor) -> str:
    got, want = got.float().flatten(), want.float().flatten()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=0).item()
    return (f"max abs {(got - want).abs().max().item():.2e} (FP32 max |x| {want.abs().max().item():.2f}), "
            f"cosine {cos:.6f}")


def measure(name: str, fp32, rbln, call: dict, steps: int, repeat: int, result_attr: str,
            denoiser_calls_per_step: int, compile_s: float) -> None:
    """Time both pipelines on the same call, break the RBLN one down by stage, print it."""
    meter = StageMeter(rbln)
    with torch.no_grad():
        fp32_first, out = _best(lambda: fp32(**call(output_type="latent")), 1)
        want_latents = getattr(out, result_attr)
    # the first call pays any lazy imports and cold caches
    rbln_first, out = _best(lambda: rbln(**call(output_type="latent")), 1)
    got_latents = getattr(out, result_attr)
    with torch.no_grad():
        fp32_s, _ = _best(lambda: fp32(**call(output_type="pt")), repeat)

    def one_rbln_call():
        meter.reset()
        return rbln(**call(output_type="pt"))
    rbln_s, _ = _best(one_rbln_call, repeat)  # the meter keeps the last call's runs

    print(f"\n== {name}: {steps} steps ==")
    print(f"compile (vendor from_pretrained export=True, all submodules): {compile_s:.1f} s")
    print(f"final latents vs FP32: {_error(got_latents, want_latents)}")
    head = f"{'one pipeline call':<38}{'wall s':>9}{'vs FP32':>9}{'first call s':>14}"
    print(head + "\n" + "-" * len(head))
    print(f"{'diffusers FP32, CPU':<38}{fp32_s:>9.3f}{'1.0x':>9}{fp32_first:>14.3f}")
    print(f"{'RBLN pipeline, emulated NPU':<38}{rbln_s:>9.3f}{rbln_s / fp32_s:>8.1f}x{rbln_first:>14.3f}")

    head = (f"{'stage':<22}{'runs':>5}{'pred ms/run':>13}{'pred ms/call':>14}{'emul ms/run':>13}"
            f"{'pred ms/step':>14}")
    print("\n" + head + "\n" + "-" * len(head))
    predicted = emulated = 0.0
    for label, reports in meter.runs.items():
        if not reports:
            print(f"{label:<22}{0:>5}  (not run by this call)")
            continue
        pred = sum(r.latency_s for r in reports)
        wall = sum(r.wall_time_s for r in reports)
        predicted, emulated = predicted + pred, emulated + wall
        per_step = ""
        if label in ("transformer", "UNet"):
            per_step = f"{pred / len(reports) * denoiser_calls_per_step * 1e3:>14.3f}"
        print(f"{label:<22}{len(reports):>5}{pred / len(reports) * 1e3:>13.3f}{pred * 1e3:>14.3f}"
              f"{wall / len(reports) * 1e3:>13.1f}{per_step}")
    print("-" * len(head))
    print(f"{'all compiled stages':<22}{sum(map(len, meter.runs.values())):>5}{'':>13}"
          f"{predicted * 1e3:>14.3f}{'':>13}")
    print(f"predicted NPU time per call {predicted * 1e3:.3f} ms (stages in sequence; the host's "
          f"scheduler and glue are not modelled); emulating those stages took {emulated:.2f} s of the "
          f"{rbln_s:.2f} s wall, the host side (diffusers, vendor embeddings, guardrail blocklist) "
          f"{max(rbln_s - emulated, 0.0):.2f} s")


def bench_cosmos(tmp: Path, steps: int, repeat: int) -> None:
    import optimum.rbln

    import cosmos_support as cs
    guardrail = cs.TinyGuardrail()
    fp32 = cs.fp32_pipeline(guardrail=guardrail)
    fp32.save_pretrained(tmp / "cosmos-hf")
    start = time.perf_counter()
    rbln = optimum.rbln.RBLNCosmosTextToWorldPipeline.from_pretrained(
        str(tmp / "cosmos-hf"), export=True, safety_checker=cs.RBLNTinyGuardrail.from_model(guardrail),
        rbln_config={"height": cs.HEIGHT, "width": cs.WIDTH, "num_frames": cs.NUM_FRAMES,
                     "max_seq_len": cs.MAX_SEQ_LEN})
    compile_s = time.perf_counter() - start
    measure(f"tiny Cosmos text-to-world ({cs.NUM_FRAMES} frames {cs.HEIGHT}x{cs.WIDTH}, T5 + DiT + "
            f"video VAE decoder + guardrail; guidance as 2 transformer runs per step)",
            fp32, rbln, lambda **o: cs.call_kwargs(num_inference_steps=steps, **o), steps, repeat,
            "frames", denoiser_calls_per_step=2, compile_s=compile_s)


def bench_sd(tmp: Path, steps: int, repeat: int) -> None:
    import optimum.rbln

    import sd_support
    fp32 = sd_support.fp32_pipeline(tmp / "sd-tok")
    fp32.save_pretrained(tmp / "sd-hf")
    start = time.perf_counter()
    rbln = optimum.rbln.RBLNStableDiffusionPipeline.from_pretrained(
        str(tmp / "sd-hf"), export=True, **sd_support.RBLN_OPTIONS)
    compile_s = time.perf_counter() - start
    measure("tiny Stable Diffusion (16x16, CLIP + UNet + VAE decoder; guidance as UNet batch 2)",
            fp32, rbln, lambda **o: sd_support.call_kwargs(steps=steps, **o), steps, repeat,
            "images", denoiser_calls_per_step=1, compile_s=compile_s)


def full_size() -> None:
    """--full: the full-size Cosmos-1.0-7B-Text2World prediction (benchmarks/cosmos_predict.py,
    meta weights, a few minutes of compiling)."""
    print("\n== full-size Cosmos-1.0-7B-Text2World (benchmarks/cosmos_predict.py) ==")
    sys.path.insert(0, str(HERE))
    import cosmos_predict
    cosmos_predict.main([])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per call (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per pipeline, best kept")
    parser.add_argument("--only", choices=("cosmos", "sd"), help="one pipeline only")
    parser.add_argument("--full", action="store_true", help="also the full-size Cosmos prediction")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rbln-pipelines-") as tmp:
        if args.only in (None, "cosmos"):
            bench_cosmos(Path(tmp), args.steps, args.repeat)
        if args.only in (None, "sd"):
            bench_sd(Path(tmp), args.steps, args.repeat)
    if args.full:
        full_size()


if __name__ == "__main__":
    main()
