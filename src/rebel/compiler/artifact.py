"""The .rbln artifact: the seam between compiler and runtime.

A zip holding `manifest.json` (format name, version, checksums), `program.json` and
`weights.safetensors`. Loading parses JSON and safetensors only, so it never runs code from the
file; every way a file can be wrong ends in an ArtifactError that says which way.

Version 2 adds shape buckets (`program.1.json`, ... beside `program.json`, counted by the
manifest's "buckets") and meta models (manifest "meta": true and no weight data: the programs'
weight specs say how much device DRAM the weights would need).
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch

from ..errors import ArtifactError, SpecError
from ..ir import TensorSpec, to_torch_dtype
from ..npu.spec import spec_from_dict, spec_to_dict
from .compile import CompiledProgram
from .program import Program

FORMAT = "rbln-artifact"
FORMAT_VERSION = 2
MANIFEST, PROGRAM, WEIGHTS = "manifest.json", "program.json", "weights.safetensors"


def save_artifact(compiled: CompiledProgram, path: str | Path) -> Path:
    path = Path(path)
    blobs = {_program_file(i): json.dumps(p.to_json(), separators=(",", ":")).encode()
             for i, p in enumerate(compiled.buckets)}
    # Persistent buffers that start as zeros (KV caches) are not stored: they can be gigabytes.
    zeros = sorted({n for p in compiled.buckets for n in p.mutable_buffers
                    if n in compiled.weights and not compiled.meta and not compiled.weights[n].any()})
    stored = {n: t for n, t in compiled.weights.items() if n not in zeros}
    blobs[WEIGHTS] = safetensors.torch.save(stored) if stored and not compiled.meta else b""
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "producer": "open-rbln",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "npu": compiled.program.npu, "spec": spec_to_dict(compiled.spec),
        "buckets": len(compiled.buckets), "meta": compiled.meta, "zero_buffers": zeros,
        "files": {name: _sha256(blob) for name, blob in blobs.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(MANIFEST, json.dumps(manifest, indent=2))
        for name, blob in blobs.items():
            z.writestr(name, blob)
    tmp.replace(path)  # a crash mid-write never leaves a half-written artifact under `path`
    return path


def load_artifact(path: str | Path) -> CompiledProgram:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no compiled model at {str(path)!r}")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if MANIFEST not in names:
                raise ArtifactError(f"{path} is not an open-rbln artifact (no {MANIFEST})")
            manifest = _json(z.read(MANIFEST), path, MANIFEST)
            _check_manifest(manifest, path)
            wanted = [*(_program_file(i) for i in range(manifest.get("buckets", 1))), WEIGHTS]
            missing = set(wanted) - names
            if missing:
                raise ArtifactError(f"{path} is incomplete: missing {', '.join(sorted(missing))}")
            blobs = {name: z.read(name) for name in wanted}
    except zipfile.BadZipFile as e:
        raise ArtifactError(f"{path} is not a valid .rbln file (truncated or not a zip: {e})") from None
    except (zipfile.LargeZipFile, OSError, EOFError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from None
    for name, blob in blobs.items():
        if _sha256(blob) != manifest["files"].get(name):
            raise ArtifactError(f"{path} is corrupted: checksum of {name} does not match the manifest")
    buckets = [Program.from_json(_json(blob, path, name))
               for name, blob in blobs.items() if name != WEIGHTS]
    meta = manifest.get("meta", False) is True
    if meta:  # shapes only: meta tensors stand in for the weights the programs expect
        weights = {n: torch.empty(s.shape, dtype=to_torch_dtype(s.dtype), device="meta")
                   for p in buckets for n, s in p.weights.items()}
    else:
        weights = _load_weights(blobs[WEIGHTS], path)
        weights.update(_zero_buffers(manifest, buckets, path))
    _check_weights(buckets, weights, path)
    program = buckets[0]
    try:
        spec = spec_from_dict(manifest["spec"], where=f"{path} (manifest spec)")
    except (KeyError, SpecError) as e:
        raise ArtifactError(f"{path} has a malformed hardware spec in its manifest: {e}") from None
    return CompiledProgram(program, weights, spec, buckets, meta)


def _zero_buffers(manifest: dict, buckets: list[Program], path: Path) -> dict[str, torch.Tensor]:
    names = manifest.get("zero_buffers", [])
    specs = {n: s for p in buckets for n, s in p.weights.items()}
    if not isinstance(names, list) or any(n not in specs for n in names):
        raise ArtifactError(f"{path} has a malformed manifest (zero_buffers names no program buffer)")
    return {n: torch.zeros(specs[n].shape, dtype=to_torch_dtype(specs[n].dtype)) for n in names}


def _program_file(bucket: int) -> str:
    return PROGRAM if bucket == 0 else f"program.{bucket}.json"


def _check_manifest(manifest: dict, path: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an open-rbln artifact (format "
                            f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format version {version!r}; this open-rbln reads "
                            f"version {FORMAT_VERSION}. Recompile the model with this version.")
    if not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path} has a malformed manifest (no file checksums)")
    buckets = manifest.get("buckets", 1)
    if not isinstance(buckets, int) or isinstance(buckets, bool) or not 1 <= buckets <= 4096:
        raise ArtifactError(f"{path} has a malformed manifest (buckets={buckets!r})")


def _json(blob: bytes, path: Path, name: str):
    try:
        return json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: {name} is not valid JSON ({e})") from None


def _load_weights(blob: bytes, path: Path) -> dict[str, torch.Tensor]:
    if not blob:
        return {}
    try:
        return safetensors.torch.load(blob)
    except Exception as e:  # safetensors raises its own error types
        raise ArtifactError(f"{path}: weights are not valid safetensors ({e})") from None


def _check_weights(buckets: list[Program], weights: dict, path: Path) -> None:
    expected = {n: s for p in buckets for n, s in p.weights.items()}  # buckets share weights
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))
        raise ArtifactError(f"{path}: weights do not match the program (missing {missing[:5]})")
    for name, spec in expected.items():
        if TensorSpec.of(weights[name]) != spec:
            raise ArtifactError(f"{path}: weight {name!r} is {TensorSpec.of(weights[name])}, "
                                f"the program expects {spec}")


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()
