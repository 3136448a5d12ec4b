"""The vendor compatibility suite: the vendor's optimum-rbln 0.12.0, unmodified, over our rebel.

Run it in the vendor environment (`make compat`, then `.venv-vendor/bin/python -m pytest
tests/compat`); the main suite does not collect this folder (pyproject's norecursedirs). Nothing
is downloaded: HF_HUB_OFFLINE is set before transformers is imported, and every model is built
from a config with random weights.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _environment_problem() -> str | None:
    """Why this is not the vendor environment, or None when it is."""
    try:
        import optimum.rbln
        import rebel
        import torch_rbln  # noqa: F401
    except ImportError as e:
        return f"cannot import {e.name}"
    vendor = Path(optimum.rbln.__file__).resolve()
    if REPO / "src" in vendor.parents:
        return f"optimum.rbln is this repository's ({vendor}), not the vendor's"
    if getattr(optimum.rbln, "__version__", None) != "0.12.0":
        return f"optimum.rbln is {getattr(optimum.rbln, '__version__', '?')}, not the vendor's 0.12.0"
    for module in (rebel, sys.modules["torch_rbln"]):
        if REPO / "src" not in Path(module.__file__).resolve().parents:
            return f"{module.__name__} is not this repository's ({module.__file__})"
    return None


_PROBLEM = _environment_problem()
if _PROBLEM:
    raise pytest.UsageError(f"tests/compat runs in the vendor environment: {_PROBLEM}. Build it "
                            f"with `make compat` and run `.venv-vendor/bin/python -m pytest tests/compat`")


class Reloader:
    """Talks to reload_worker.py: a process that only ever loads saved folders (export=False)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.count = 0
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("reload_worker.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def run(self, cls: str, folder: Path, *args, method: str = "__call__", pick=None,
            load_kwargs=None, generator_seed: int | None = None, imports=(),
            **kwargs) -> dict[str, torch.Tensor]:
        """Reload `folder` as `cls` in the worker, call it (or its `method`) on the inputs, return
        its output tensors by key path (e.g. "logits", "last_hidden_state", "0"), or the
        attributes named in `pick`. generator_seed: pass `generator=torch.Generator()` seeded so.
        imports: modules of tests/compat the worker imports first (classes the folder names)."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.count += 1
        inputs, outputs = self.tmp / f"in{self.count}.pt", self.tmp / f"out{self.count}.pt"
        payload = {"args": list(args), "kwargs": kwargs}
        if generator_seed is not None:
            payload["generator_seed"] = generator_seed
        torch.save(payload, inputs)
        request = {"cls": cls, "folder": str(folder), "inputs": str(inputs), "outputs": str(outputs),
                   "method": method, "pick": pick or [], "load_kwargs": load_kwargs or {},
                   "imports": list(imports)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"the reload worker died (exit {code}) on {cls} {folder}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise ReloadError(reply["error"], reply.get("traceback", ""))
        return torch.load(outputs, weights_only=False)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class ReloadError(RuntimeError):
    """The reloaded model raised in the worker; the message is the worker's exception."""

    def __init__(self, message: str, tb: str):
        super().__init__(message)
        self.traceback = tb

    def __str__(self) -> str:
        return f"{self.args[0]}\n--- in the reload worker ---\n{self.traceback}"


@pytest.fixture(scope="session")
def reloader(tmp_path_factory):
    r = Reloader(tmp_path_factory.mktemp("reload"))
    yield r
    r.close()
