"""Eager rbln overhead: per-op microseconds on rbln vs CPU for small ops, and a small transformer
forward in eager rbln vs eager CPU vs torch.compile(backend="rbln"), side by side.

    PYTHONPATH=src .venv/bin/python benchmarks/eager_overhead.py

Wall time on this machine (the emulation's cost), medians of repeated runs; "added" is rbln - CPU.
The predicted NPU time of the same work is in torch.rbln.explain().
"""
from __future__ import annotations

import statistics
import time

import torch

import torch_rbln  # noqa: F401


def _us(fn, repeat: int = 7, number: int = 200) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return statistics.median(times) * 1e6


def small_ops() -> list[tuple[str, float, float]]:
    rows = []
    for dev in ("cpu", "rbln"):
        a, b = torch.randn(64, 64).to(dev), torch.randn(64, 64).to(dev)
        lin = torch.nn.Linear(64, 64).to(dev)
        ops = {"add": lambda: a + b, "mul": lambda: a * b, "relu": lambda: torch.relu(a),
               "sum": lambda: a.sum(), "mm 64x64": lambda: a @ b, "view+t": lambda: a.view(-1, 32).t(),
               "add_ (in-place)": lambda: a.add_(0.0), "Linear fwd": lambda: lin(a)}
        with torch.no_grad():
            for name, fn in ops.items():
                rows.append((dev, name, _us(fn)))
    cpu = {n: t for d, n, t in rows if d == "cpu"}
    return [(n, cpu[n], t) for d, n, t in rows if d == "rbln"]


def transformer() -> tuple[float, float, float]:
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128,
                                             batch_first=True).eval()
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        cpu = _us(lambda: layer(x), number=20)
        dev_layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128,
                                                     batch_first=True).eval()
        dev_layer.load_state_dict(layer.state_dict())
        dev_layer = dev_layer.to("rbln")
        xd = x.to("rbln")
        eager = _us(lambda: dev_layer(xd), number=20)
        compiled = torch.compile(layer, backend="rbln")
        compiled(x)
        comp = _us(lambda: compiled(x), number=20)
    return cpu, eager, comp


def main() -> None:
    torch.set_num_threads(1)  # 2-core CI boxes: thread wake-ups would dominate small ops
    print(f"{'op (64x64 float32)':<20}{'CPU us':>10}{'rbln us':>10}{'added us':>10}")
    for name, cpu, dev in small_ops():
        print(f"{name:<20}{cpu:>10.1f}{dev:>10.1f}{dev - cpu:>10.1f}")
    cpu, eager, comp = transformer()
    print("\nTransformerEncoderLayer(d=64, 4 heads, ffn 128), batch 2 x 16 tokens, forward:")
    print(f"  eager CPU {cpu:.0f} us | eager rbln {eager:.0f} us | torch.compile(backend='rbln') {comp:.0f} us")


if __name__ == "__main__":
    import logging
    logging.getLogger("torch_rbln").setLevel(logging.ERROR)
    main()
