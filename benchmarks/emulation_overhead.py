"""Wall time of `Runtime.run` against plain PyTorch CPU eager on the same model, side by side.

The virtual NPU computes in FP32 and rounds to 16 bits, so the emulation should cost little more
than eager PyTorch: the target is at most 1.1x (issue 11). Prints one row per model and the
ratio. The encoder block is `nn.TransformerEncoderLayer`, which eager runs on its fused fast path
(`_transformer_encoder_layer_fwd`) under inference mode; `emulation_speed.py` has it at one
thread, in worker processes, against other source trees.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import rebel


def mlp(width: int = 4096, depth: int = 4) -> torch.nn.Module:
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*layers)


def encoder_block() -> torch.nn.Module:
    """batch_first MultiheadAttention, LayerNorm and a GELU MLP."""
    return torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True, activation="gelu", dropout=0.0)


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(128, 10)

    def forward(self, x):
        return self.head(self.features(x))


def _time(fn, x, repeats: int, min_s: float = 0.2) -> float:
    """Median of at least `repeats` calls, and of enough for `min_s` seconds: ten calls of a
    2 ms model are too few for a median that holds to a few percent."""
    start = time.perf_counter()
    fn(x)  # warm up
    samples = []
    for _ in range(max(repeats, int(min_s / (time.perf_counter() - start)))):
        start = time.perf_counter()
        fn(x)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(name: str, model: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict:
    model.eval()
    runtime = rebel.Runtime(rebel.compile_from_torch(model, example_inputs=[x]), tensor_type="pt")
    with torch.inference_mode():
        eager = lambda t: model(t)  # noqa: E731
        # Interleave the two so machine noise hits both alike.
        t_eager, t_rbln = [], []
        for _ in range(3):
            t_eager.append(_time(eager, x, repeats))
            t_rbln.append(_time(runtime.run, x, repeats))
    eager_s, rbln_s = min(t_eager), min(t_rbln)
    report = runtime.last_report
    return {"model": name, "eager_ms": eager_s * 1e3, "rbln_ms": rbln_s * 1e3,
            "ratio": rbln_s / eager_s, "predicted_us": report.latency_s * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure("MLP 4096x4, batch 64", mlp(), torch.randn(64, 4096), args.repeats),
            measure("small CNN, 1x3x64x64", SmallCNN(), torch.randn(1, 3, 64, 64), args.repeats),
            measure("encoder block 4x64x256", encoder_block(), torch.randn(4, 64, 256), args.repeats)]
    print(f"{'model':24s} {'eager ms':>10s} {'Runtime.run ms':>15s} {'ratio':>7s} {'predicted NPU us':>17s}")
    for r in rows:
        print(f"{r['model']:24s} {r['eager_ms']:10.3f} {r['rbln_ms']:15.3f} {r['ratio']:6.2f}x "
              f"{r['predicted_us']:17.1f}")
    print(f"max ratio {max(r['ratio'] for r in rows):.2f}x (target <= 1.10x)")


if __name__ == "__main__":
    main()
