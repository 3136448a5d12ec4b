"""The on-disk cache of compiled graphs, so a second process does not recompile.

An entry is a `.rbln` artifact (the same format `RBLNCompiledModel.save` writes) named by a key
that covers everything the compiled program depends on: the graph's code, the input shapes and
dtypes, the weights (layout and content: an artifact carries its weights, so two models with the
same layout but different values must not share an entry), the NPU spec file's text, the compile
options and the open-rbln version. Entries are written atomically by the artifact writer, so a
process killed mid-write never leaves a half entry under the final name.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

import rebel
from rebel.compiler.artifact import load_artifact
from rebel.errors import ArtifactError
from rebel.npu import current_machine, load_spec

ENV_CACHE_DIR = "TORCH_RBLN_CACHE_DIR"


def cache_dir(option) -> Path | None:
    """The cache folder: options={"cache_dir": ...}, else $TORCH_RBLN_CACHE_DIR, else none."""
    folder = option if option is not None else os.environ.get(ENV_CACHE_DIR)
    return Path(folder).expanduser() if folder else None


def graph_key(code: str, inputs: list[torch.Tensor], constants: list[torch.Tensor], npu: str | None,
              options: dict) -> str:
    h = hashlib.sha256()
    h.update(f"open-rbln {rebel.__version__} torch {torch.__version__}\n".encode())
    h.update(code.encode())
    for t in inputs:
        h.update(f"in {tuple(t.shape)} {t.dtype}\n".encode())
    for t in constants:
        h.update(f"w {tuple(t.shape)} {t.stride()} {t.dtype}\n".encode())
        data = t.detach().cpu().contiguous()
        h.update(memoryview(data.view(torch.uint8).reshape(-1).numpy()) if data.numel() else b"")
    spec = load_spec(npu) if npu else current_machine().spec
    h.update(Path(spec.source).read_bytes() if spec.source and Path(spec.source).is_file()
             else spec.name.encode())
    h.update(repr(sorted(options.items())).encode())
    return h.hexdigest()[:40]


def load(folder: Path, key: str) -> rebel.RBLNCompiledModel | None:
    path = folder / f"{key}.rbln"
    if not path.is_file():
        return None
    try:
        return rebel.RBLNCompiledModel(load_artifact(path))
    except ArtifactError:
        return None  # a foreign or stale entry is recompiled and overwritten, never trusted


def store(folder: Path, key: str, compiled: rebel.RBLNCompiledModel) -> Path:
    return compiled.save(folder / f"{key}.rbln")
