"""The predicted NPU time per engine step as Prometheus metrics beside vLLM's own (`/metrics`).

The numbers are made in the worker (the engine-core process, which `vllm serve` spawns), and
`/metrics` is answered by the API-server process from its prometheus_client registry. vLLM itself
moves only its scheduler and iteration stats between the two, and uses prometheus_client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR) only with several API servers: in the default
single-server setup a metric made in the engine core never reaches `/metrics`. So:

- the API-server process (where the platform is configured first) makes a directory, names it in
  VLLM_RBLN_METRICS_DIR (inherited by the engine core it spawns) and registers `NpuTimeCollector`
  (prometheus_client's custom-collector interface) in the default registry;
- each worker keeps its cumulative figures (`StepMetrics`) and after every step replaces its own
  small JSON file in that directory;
- a scrape reads and sums the files: `vllm_rbln:npu_step_seconds` (histogram of predicted NPU
  seconds per step) and `vllm_rbln:npu_seconds_total{phase="prefill"|"decode"}` (counter).

With `--api-server-count` > 1 vLLM serves `/metrics` from its multiprocess collector only, and
these metrics are not in it (the log line still is).
"""
from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ENV = "VLLM_RBLN_METRICS_DIR"
STEP = "vllm_rbln:npu_step_seconds"
PHASES = "vllm_rbln:npu_seconds"
# Histogram bucket bounds in seconds (a 1-2.5-5 ladder over a step's plausible range)
BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1,
           0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class StepMetrics:
    """One worker's cumulative figures since it started."""

    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    steps: int = 0
    step_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def observe(self, prefill_s: float, decode_s: float) -> None:
        step = prefill_s + decode_s
        for i, bound in enumerate(BUCKETS):
            if step <= bound:
                self.bucket_counts[i] += 1
                break
        self.steps += 1
        self.step_s += step
        self.prefill_s += prefill_s
        self.decode_s += decode_s

    def write(self, folder: str | Path) -> None:
        """Replace this process's file atomically (a scrape never reads half a file)."""
        path = Path(folder) / f"worker-{os.getpid()}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self)))
        os.replace(temporary, path)

    @classmethod
    def read_all(cls, folder: str | Path) -> StepMetrics:
        """The sum over every worker's file in `folder`."""
        total = cls()
        for path in sorted(Path(folder).glob("worker-*.json")):
            try:
                one = json.loads(path.read_text())
            except (OSError, ValueError):  # removed between glob and read
                continue
            total.bucket_counts = [a + b for a, b in zip(total.bucket_counts, one["bucket_counts"])]
            for name in ("steps", "step_s", "prefill_s", "decode_s"):
                setattr(total, name, getattr(total, name) + one[name])
        return total


def export(m: StepMetrics) -> None:
    """Write `m` into the directory the API server's /metrics reads, when serving under one
    (VLLM_RBLN_METRICS_DIR set); offline use writes nothing."""
    folder = os.environ.get(ENV)
    if folder is None:
        return
    try:
        m.write(folder)
    except OSError as error:  # the server removed it (shutting down): serving goes on
        from vllm.logger import init_logger
        init_logger("vllm.rbln.metrics").warning(
            "vllm_rbln: cannot write NPU-time metrics to %s: %s", folder, error)


class NpuTimeCollector:
    """prometheus_client custom collector over the workers' files."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def describe(self):
        return []  # names are fixed, but nothing to check at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        m = StepMetrics.read_all(self.folder)
        cumulative, buckets = 0, []
        for bound, count in zip(BUCKETS, m.bucket_counts):
            cumulative += count
            buckets.append((repr(bound), cumulative))
        buckets.append(("+Inf", m.steps))
        yield HistogramMetricFamily(STEP, "Predicted NPU time of one engine step (timing model "
                                    "of the virtual NPU), seconds", buckets=buckets,
                                    sum_value=m.step_s)
        phases = CounterMetricFamily(PHASES, "Predicted NPU seconds by phase", labels=["phase"])
        phases.add_metric(["prefill"], m.prefill_s)
        phases.add_metric(["decode"], m.decode_s)
        yield phases


_installed: str | None = None


def install_collector() -> str:
    """In the process that starts the engine: make the directory, name it for the processes it
    starts, register the collector (once). A process started by multiprocessing with the
    variable set (vLLM's engine core) only writes there. Returns the directory."""
    global _installed
    inherited = os.environ.get(ENV)
    if inherited and multiprocessing.parent_process() is not None:
        return inherited
    if _installed is None:
        from prometheus_client import REGISTRY

        _installed = tempfile.mkdtemp(prefix="vllm_rbln_metrics_")
        atexit.register(shutil.rmtree, _installed, ignore_errors=True)
        REGISTRY.register(NpuTimeCollector(_installed))
    os.environ[ENV] = _installed
    return _installed
