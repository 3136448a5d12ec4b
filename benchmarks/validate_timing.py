"""Check the timing method against real hardware: predict measured H100 op timings.

Each measured op (GEMM, element-wise, norm, attention, host<->device copy) is built as a small
PyTorch module on the meta device, compiled by the real compiler for the H100 spec
(`rebel/npu/specs/nvidia-h100-sxm.toml`) and timed by the same event engine that times the ATOM.
The prediction compared is the device time of the op's kernels (Task DMA + compute), as the
measurement replays only the kernels (CUDA graphs, data already in HBM); copies are predicted
from the host link. Op rows are timed as replays (`EventEngine(replayed=True)`): the measured
loop runs the op 20 times on one input, so an input that fits the L2's replay-resident share is
read from there by the kernels that model their caches (softmax and norms, timed as PyTorch's
block-per-row CUDA kernels). Prints the error per op, per kind, and `MAPE <percent>`. `--norm-fit`
also prints how close any latency + bandwidth model gets to the norm rows when fitted to them.

Records of kind "model" (`h100-models.jsonl`: whole models, CUDA-graph replay of the eager PyTorch
module) are predicted by the same method: the same module (`timing_models.py`) compiled with
`fusion=False`, since eager PyTorch launches one kernel per op, and timed as one device run with
its inputs resident. Ops the library runs as several kernels on the H100 spec (SDPA's math
composite for a mask broadcast along the keys, NCHW convolutions' layout transposes, native eval
batch norm) are timed as those kernels, and views (permutes, eval dropout) as none
(`rebel/compiler/eager_attention.py`, `eager_kernels.py`; plan parts). Prints the error per model and `e2e MAPE <percent>` on its own line. A model
record without `ms_median` is predicted only (printed, not in the MAPE).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from rebel.compiler.compile import compile_module
from rebel.device.events import HDMA
from rebel.npu import load_spec
from rebel.device.engine import EventEngine
from rebel.runtime.timeline import build_steps
from timing_models import build_model  # benchmarks/timing_models.py

# A copy of shared/calibration/h100-ops.jsonl, so a clone checks itself without shared/ beside it.
DATA = Path(__file__).resolve().parent / "data"
DEFAULT_DATA = [DATA / "h100-ops.jsonl", DATA / "h100-models.jsonl"]
SPEC = "NVIDIA-H100-SXM"


class Fn(torch.nn.Module):
    def __init__(self, fn, **params):
        super().__init__()
        self.fn = fn
        for name, p in params.items():
            self.register_parameter(name, torch.nn.Parameter(p, requires_grad=False))

    def forward(self, *xs):
        return self.fn(self, *xs)


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def build(rec: dict):
    """(module, example inputs) reproducing one measured op."""
    kind = rec["kind"]
    if kind == "gemm":
        w = meta(rec["N"], rec["K"])
        return Fn(lambda m, x: F.linear(x, m.w), w=w), [meta(rec["M"], rec["K"])]
    if kind == "eltwise":
        n, op = rec["numel"], rec["op"]
        binary = {"add": torch.add, "mul": torch.mul}
        if op in binary:
            return Fn(lambda m, a, b: binary[op](a, b)), [meta(n), meta(n)]
        unary = {"silu": F.silu, "gelu": F.gelu, "cast_f32": lambda x: x.float()}
        return Fn(lambda m, x: unary[op](x)), [meta(n)]
    if kind == "norm":
        rows, cols, op = rec["rows"], rec["cols"], rec["op"]
        if op == "softmax":
            return Fn(lambda m, x: torch.softmax(x, -1)), [meta(rows, cols)]
        if op == "rmsnorm":
            return Fn(lambda m, x: F.rms_norm(x, (cols,), m.w), w=meta(cols)), [meta(rows, cols)]
        return (Fn(lambda m, x: F.layer_norm(x, (cols,), m.w, m.b), w=meta(cols), b=meta(cols)),
                [meta(rows, cols)])
    if kind == "attention":
        b, h, kvh, sq, skv, d = (rec[k] for k in ("B", "H", "KVH", "S_q", "S_kv", "D"))
        causal = rec["causal"]
        fn = Fn(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                   enable_gqa=True))
        return fn, [meta(b, h, sq, d), meta(b, kvh, skv, d), meta(b, kvh, skv, d)]
    raise ValueError(f"unknown op kind {kind!r}")


def predict_ms(rec: dict, spec) -> float:
    if rec["kind"] in ("h2d", "d2h"):
        # Each copy row says which host memory it measured; rows without the field are pageable
        # (a plain torch tensor), as the runtime assumes for inputs it is not told are pinned.
        return spec.host_link.transfer_s(rec["nbytes"], to_device=rec["kind"] == "h2d",
                                         pinned=bool(rec.get("pinned", False))) * 1e3
    if rec["kind"] == "model":
        module, inputs, dtype = build_model(rec)
        # eager PyTorch: one kernel per op, each writing its result to HBM
        compiled = compile_module(module, inputs, npu=SPEC, device_dtype=dtype, progress=False,
                                  fusion=False)
    else:
        module, inputs = build(rec)
        compiled = compile_module(module, inputs, npu=SPEC, device_dtype="bfloat16", progress=False)
        # the op rows replay 20 calls of the op on the same input back to back
        return device_span_ms(compiled.program, spec, replayed=True)
    return device_span_ms(compiled.program, spec)


def device_span_ms(program, spec, replayed: bool = False) -> float:
    """What a CUDA-graph replay times: the device work of one run, inputs already in HBM
    (and, `replayed`, left in the caches by the same run just before)."""
    engine = EventEngine(spec, device=0, resident_inputs=True, replayed=replayed)
    events = [e for e in engine.run(build_steps(program, spec)).events
              if e.device is not None and e.track != HDMA]
    return (max(e.end_s for e in events) - min(e.start_s for e in events)) * 1e3


def read_records(paths: list[Path]) -> list[dict]:
    """Records of every file, in order; a line that is not a JSON object with a `kind` is an
    error naming its file and line."""
    records = []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"--data {path}: no such file")
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{number}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "kind" not in rec:
                raise SystemExit(f"{path}:{number}: a record must be a JSON object with a 'kind'")
            if rec["kind"] not in ("device", "h2d", "d2h") and rec["kind"] != "model" \
                    and "ms_median" not in rec:
                raise SystemExit(f"{path}:{number}: op record of kind {rec['kind']!r} has no ms_median")
            records.append(rec)
    return records


def norm_fit(records: list[dict]) -> None:
    """How well *any* latency-plus-bandwidth model can fit the norm rows, when every figure is
    fitted to those rows themselves: t = fixed + passes * latency + bytes / bandwidth, passes =
    the op's dependent memory passes (softmax 3, layer/rms norm 2), bandwidth one per op family
    or one for all. If even these in-sample fits miss the 25% target, the rows measure kernel
    choices a hardware model cannot see."""
    rows = [(r["op"], r["rows"] * r["cols"] * 4, r["ms_median"] * 1e3) for r in records
            if r["kind"] == "norm"]  # bf16 in and out: 4 bytes per element
    passes = {"softmax": 3, "rmsnorm": 2, "layernorm": 2}
    grid = [x / 4 for x in range(0, 17)]           # 0..4 us
    rates = [x / 20 for x in range(20, 71)]         # 1.0..3.5 TB/s
    for label, shared in (("one bandwidth for all norms", True), ("softmax / norm bandwidths", False)):
        best = min((statistics.mean(abs(fixed + passes[op] * latency
                                        + b / ((bw_s if op == "softmax" or shared else bw_n) * 1e6)
                                        - t) / t for op, b, t in rows), fixed, latency, bw_s, bw_n)
                   for fixed, latency in itertools.product(grid, grid[:9])
                   for bw_s in rates for bw_n in (rates[:1] if shared else rates))
        mape, fixed, latency, bw_s, bw_n = best
        rate = f"{bw_s:.2f} TB/s" if shared else f"softmax {bw_s:.2f}, norms {bw_n:.2f} TB/s"
        print(f"# norm rows, best in-sample fit ({label}): MAPE {mape * 100:.1f}% with fixed "
              f"{fixed:.2f} us, {latency:.2f} us per pass, {rate}")


def describe(rec: dict) -> str:
    skip = {"kind", "dtype", "ms_median", "ms_min", "ms_max", "tflops", "pinned"}
    text = " ".join(f"{k}={v}" for k, v in rec.items() if k not in skip)
    if "pinned" in rec:
        text += " pinned" if rec["pinned"] else " pageable"
    return text


def describe_model(rec: dict) -> str:
    skip = {"kind", "model", "ms_median", "ms_min", "ms_max", "config"}
    text = rec["model"] + " " + " ".join(f"{k}={v}" for k, v in rec.items() if k not in skip)
    return text + (" (tiny config)" if rec.get("config") else "")


def op_rows(records: list[dict], spec) -> float | None:
    errors: dict[str, list[float]] = defaultdict(list)
    print(f"{'kind':10s} {'op':58s} {'measured ms':>12s} {'predicted ms':>13s} {'error':>8s}")
    for rec in records:
        measured = rec["ms_median"]
        predicted = predict_ms(rec, spec)
        err = (predicted - measured) / measured
        kind = rec["kind"]
        if kind in ("h2d", "d2h"):  # the two host memory paths are reported apart
            kind += "-pinned" if rec.get("pinned") else "-pageable"
        errors[kind].append(abs(err))
        print(f"{rec['kind']:10s} {describe(rec)[:58]:58s} {measured:12.4f} {predicted:13.4f} "
              f"{err * 100:+7.1f}%")
    print()
    print(f"{'kind':12s} {'ops':>4s} {'MAPE':>8s} {'max':>8s}")
    for kind, errs in errors.items():
        print(f"{kind:12s} {len(errs):4d} {statistics.mean(errs) * 100:7.1f}% {max(errs) * 100:7.1f}%")
    copies = [r for r in records if r["kind"] in ("h2d", "d2h")]
    if copies and not any(r.get("pinned") for r in copies):
        print("# no pinned copy rows in the data: the pinned path's figures are unchecked here")
    every = [e for errs in errors.values() for e in errs]
    return statistics.mean(every) * 100 if every else None


def model_rows(records: list[dict], spec) -> float | None:
    print(f"{'model':58s} {'measured ms':>12s} {'predicted ms':>13s} {'error':>8s} {'compile s':>10s}")
    errors = []
    for rec in records:
        start = time.perf_counter()
        predicted = predict_ms(rec, spec)
        compile_s = time.perf_counter() - start
        measured = rec.get("ms_median")
        if measured is None:  # predicted only: no measurement of this model is shared
            print(f"{describe_model(rec)[:58]:58s} {'-':>12s} {predicted:13.4f} {'-':>8s} "
                  f"{compile_s:10.1f}")
            continue
        err = (predicted - measured) / measured
        errors.append(abs(err))
        print(f"{describe_model(rec)[:58]:58s} {measured:12.4f} {predicted:13.4f} {err * 100:+7.1f}% "
              f"{compile_s:10.1f}")
    return statistics.mean(errors) * 100 if errors else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, nargs="+", default=DEFAULT_DATA,
                        help="JSONL files of measured op and/or model timings (the format of "
                             "h100-ops.jsonl and h100-models.jsonl); default: both shared files")
    parser.add_argument("--norm-fit", action="store_true",
                        help="also print the best MAPE any latency + bandwidth model fitted to the "
                             "norm rows themselves can reach (how far the data allows)")
    args = parser.parse_args(argv)
    spec = load_spec(SPEC)
    records = read_records(args.data)
    for name in dict.fromkeys(r["name"] + ": " + r["method"] for r in records if r["kind"] == "device"):
        print(f"# {name}")
    ops = [r for r in records if r["kind"] not in ("device", "model")]
    models = [r for r in records if r["kind"] == "model"]
    mape = op_rows(ops, spec) if ops else None
    if args.norm_fit:
        norm_fit(ops)
    if mape is not None:
        print(f"MAPE {mape:.1f}")
    if models:
        print()
        e2e = model_rows(models, spec)
        if e2e is not None:
            print(f"e2e MAPE {e2e:.1f}")


if __name__ == "__main__":
    main()
