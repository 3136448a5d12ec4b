"""The .rbln artifact: the seam between compiler and runtime.

A zip holding `manifest.json` (format name, version, checksums), `program.json` and
`weights.safetensors`. Loading parses JSON and safetensors only, so it never runs code from the
file; every way a file can be wrong ends in an ArtifactError that says which way.
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
from ..ir import TensorSpec
from ..npu.spec import spec_from_dict, spec_to_dict
from .compile import CompiledProgram
from .program import Program

FORMAT = "rbln-artifact"
FORMAT_VERSION = 1
MANIFEST, PROGRAM, WEIGHTS = "manifest.json", "program.json", "weights.safetensors"


def save_artifact(compiled: CompiledProgram, path: str | Path) -> Path:
    path = Path(path)
    program = json.dumps(compiled.program.to_json(), separators=(",", ":")).encode()
    weights = safetensors.torch.save(compiled.weights) if compiled.weights else b""
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "producer": "open-rbln",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "npu": compiled.program.npu, "spec": spec_to_dict(compiled.spec),
        "files": {PROGRAM: _sha256(program), WEIGHTS: _sha256(weights)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(MANIFEST, json.dumps(manifest, indent=2))
        z.writestr(PROGRAM, program)
        z.writestr(WEIGHTS, weights)
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
            missing = {PROGRAM, WEIGHTS} - names
            if missing:
                raise ArtifactError(f"{path} is incomplete: missing {', '.join(sorted(missing))}")
            blobs = {name: z.read(name) for name in (PROGRAM, WEIGHTS)}
    except zipfile.BadZipFile as e:
        raise ArtifactError(f"{path} is not a valid .rbln file (truncated or not a zip: {e})") from None
    except (zipfile.LargeZipFile, OSError, EOFError) as e:
        raise ArtifactError(f"cannot read {path}: {e}") from None
    for name, blob in blobs.items():
        if _sha256(blob) != manifest["files"].get(name):
            raise ArtifactError(f"{path} is corrupted: checksum of {name} does not match the manifest")
    program = Program.from_json(_json(blobs[PROGRAM], path, PROGRAM))
    weights = _load_weights(blobs[WEIGHTS], path)
    _check_weights(program, weights, path)
    try:
        spec = spec_from_dict(manifest["spec"], where=f"{path} (manifest spec)")
    except (KeyError, SpecError) as e:
        raise ArtifactError(f"{path} has a malformed hardware spec in its manifest: {e}") from None
    return CompiledProgram(program, weights, spec)


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


def _check_weights(program: Program, weights: dict, path: Path) -> None:
    if set(weights) != set(program.weights):
        missing = sorted(set(program.weights) - set(weights))
        raise ArtifactError(f"{path}: weights do not match the program (missing {missing[:5]})")
    for name, spec in program.weights.items():
        if TensorSpec.of(weights[name]) != spec:
            raise ArtifactError(f"{path}: weight {name!r} is {TensorSpec.of(weights[name])}, "
                                f"the program expects {spec}")


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()
