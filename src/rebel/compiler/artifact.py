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
import os
import zipfile
import zlib
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch

from ..errors import ArtifactError, SpecError
from ..ir import TensorSpec, to_torch_dtype
from ..npu.spec import spec_from_dict, spec_to_dict
from .artifact_check import check_context, check_program
from .compile import CompiledProgram
from .program import Program

FORMAT = "rbln-artifact"
# A member may decompress to at most this many times its stored size (plus a slack): refusing zip
# bombs keeps a hostile file from eating memory or hanging the loader. Our own writer stores.
MAX_COMPRESSION_RATIO = 200
CHUNK = 2 ** 20  # members are read in pieces this big, never as one extra whole-member copy
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
        "npu": compiled.program.npu, "spec": _portable_spec(compiled.spec),
        "buckets": len(compiled.buckets), "meta": compiled.meta, "zero_buffers": zeros,
        "context": compiled.context,
        "files": {name: _sha256(blob) for name, blob in blobs.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # one temporary name per process: processes that store the same artifact at once (tensor-
    # parallel workers compiling a replicated graph into one cache) never share a half-written file
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr(MANIFEST, json.dumps(manifest, indent=2))
        for name, blob in blobs.items():
            z.writestr(name, blob)
    tmp.replace(path)  # a crash mid-write never leaves a half-written artifact under `path`
    return path


def load_artifact(path: str | Path) -> CompiledProgram:
    """Read a .rbln file. Anything wrong with it (truncated, corrupted, foreign, rewritten,
    an old version) raises ArtifactError naming the problem; nothing else escapes, and nothing
    in the file is executed: it is parsed as zip, JSON and safetensors only."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"no compiled model at {str(path)!r}")
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            if MANIFEST not in names:
                raise ArtifactError(f"{path} is not an open-rbln artifact (no {MANIFEST})")
            manifest = _json(_read_member(z, MANIFEST, path), path, MANIFEST)
            _check_manifest(manifest, path)
            wanted = [*(_program_file(i) for i in range(manifest.get("buckets", 1))), WEIGHTS]
            missing = set(wanted) - names
            if missing:
                raise ArtifactError(f"{path} is incomplete: missing {', '.join(sorted(missing))}")
            blobs = {name: _read_member(z, name, path) for name in wanted}
    except ArtifactError:
        raise
    except zipfile.BadZipFile as e:
        raise ArtifactError(f"{path} is not a valid .rbln file (truncated or not a zip: {e})") from None
    # zipfile raises NotImplementedError for an unknown compression method, RuntimeError for an
    # encrypted member, zlib.error / ValueError / EOFError for a damaged stream.
    except (zipfile.LargeZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError,
            zlib.error) as e:
        raise ArtifactError(f"cannot read {path} ({type(e).__name__}: {e})") from None
    for name, blob in blobs.items():
        if _sha256(blob) != manifest["files"].get(name):
            raise ArtifactError(f"{path} is corrupted: checksum of {name} does not match the manifest")
    buckets = [_program(blob, path, name, manifest["npu"])
               for name, blob in blobs.items() if name != WEIGHTS]
    meta = manifest.get("meta", False) is True
    if meta and blobs[WEIGHTS]:  # the manifest is not checksummed: a flipped flag must not drop weights
        raise ArtifactError(f"{path}: the manifest says meta (no weights) but the file holds weights")
    if meta:  # shapes only: meta tensors stand in for the weights the programs expect
        weights = {n: torch.empty(s.shape, dtype=to_torch_dtype(s.dtype), device="meta")
                   for p in buckets for n, s in p.weights.items() if n not in p.static_buffers}
    else:
        weights = _load_weights(blobs[WEIGHTS], path)
        weights.update(_zero_buffers(manifest, buckets, path))
    _check_weights(buckets, weights, path)
    program = buckets[0]
    try:
        spec = spec_from_dict(manifest["spec"], where=f"{path} (manifest spec)")
    except (KeyError, TypeError, ValueError, AttributeError, SpecError) as e:
        raise ArtifactError(f"{path} has a malformed hardware spec in its manifest: {e}") from None
    if spec.name != program.npu:
        raise ArtifactError(f"{path}: the manifest spec is {spec.name!r} but the program is for "
                            f"{program.npu!r}")
    context = manifest.get("context")
    check_context(context, buckets, path)
    return CompiledProgram(program, weights, spec, buckets, meta, context)


def _portable_spec(spec) -> dict:
    """The spec as saved: `source` keeps only the file name, so an artifact records no
    absolute path of the machine that compiled it."""
    table = spec_to_dict(spec)
    if isinstance(table.get("source"), str):
        table["source"] = Path(table["source"]).name
    return table


def _read_member(z: zipfile.ZipFile, name: str, path: Path) -> bytearray:
    """A member's bytes, refusing foreign compression methods and zip bombs before
    decompressing anything.

    Read in chunks into one preallocated, writable buffer: the weights are then held once (the
    tensors view this buffer), and writable, so in-place buffer updates are defined behaviour.
    """
    info = z.getinfo(name)
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        # bzip2/lzma/unknown methods: our writer never makes them, and each fails in its own way
        raise ArtifactError(f"{path}: {name} uses zip compression method {info.compress_type}, "
                            "not one an artifact uses (stored or deflated)")
    limit = MAX_COMPRESSION_RATIO * min(info.compress_size, path.stat().st_size) + 2 ** 20
    if info.file_size > limit:
        raise ArtifactError(f"{path}: {name} claims {info.file_size} bytes from "
                            f"{info.compress_size} stored (not an artifact this writer makes)")
    buffer = bytearray(info.file_size)
    filled = 0
    with z.open(info) as member:
        while filled < len(buffer):
            chunk = member.read(min(CHUNK, len(buffer) - filled))
            if not chunk:
                break
            buffer[filled:filled + len(chunk)] = chunk
            filled += len(chunk)
        if filled != len(buffer) or member.read(1):
            raise ArtifactError(f"{path}: {name} is not the size the zip directory says")
    return buffer


def _program(blob: bytes, path: Path, name: str, npu: str) -> Program:
    """Parse and check one program member, so a rewritten one fails here, not in the runtime."""
    d = _json(blob, path, name)
    if not isinstance(d, dict):
        raise ArtifactError(f"{path}: {name} is not a JSON object")
    try:
        program = Program.from_json(d)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        raise ArtifactError(f"{path}: {name}: program is malformed: {type(e).__name__}: {e}"[:300]) \
            from None
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {name}: {e}") from None
    try:
        check_program(program, npu)
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {name}: {e}") from None
    return program


def _zero_buffers(manifest: dict, buckets: list[Program], path: Path) -> dict[str, torch.Tensor]:
    names = manifest.get("zero_buffers", [])
    specs = {n: s for p in buckets for n, s in p.weights.items()}
    if not isinstance(names, list) or any(n not in specs for n in names):
        raise ArtifactError(f"{path} has a malformed manifest (zero_buffers names no program buffer)")
    # One zero broadcast to the buffer's shape: the host never needs these bytes (the runtime
    # makes the device's own zeroed storage), so a KV cache costs no host RAM until placed.
    return {n: torch.zeros((), dtype=to_torch_dtype(specs[n].dtype)).expand(specs[n].shape)
            for n in names}


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
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ArtifactError(f"{path} has a malformed manifest (no file checksums)")
    for key, kind in (("npu", str), ("spec", dict), ("meta", bool), ("zero_buffers", list),
                      ("context", (dict, type(None)))):
        if key in manifest and not isinstance(manifest[key], kind) or key == "npu" and key not in manifest:
            raise ArtifactError(f"{path} has a malformed manifest ({key}={manifest.get(key)!r})"[:300])
    if not all(isinstance(n, str) for n in manifest.get("zero_buffers", [])):
        raise ArtifactError(f"{path} has a malformed manifest (zero_buffers holds a non-name)")
    buckets = manifest.get("buckets", 1)
    if not isinstance(buckets, int) or isinstance(buckets, bool) or not 1 <= buckets <= 4096:
        raise ArtifactError(f"{path} has a malformed manifest (buckets={buckets!r})")


def _json(blob: bytes | bytearray, path: Path, name: str):
    try:
        return json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: {name} is not valid JSON ({e})") from None


# safetensors dtype names -> torch dtypes (the subset a compiled model can hold)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def _load_weights(blob: bytearray, path: Path) -> dict[str, torch.Tensor]:
    """Tensors viewing `blob` in place.

    `safetensors.torch.load` copies every tensor's bytes out of the blob, so loading held the
    weights twice at its peak. Reading the (small, JSON) safetensors header here and making each
    tensor a `torch.frombuffer` view of the one blob keeps them once. The header is checked as
    strictly as safetensors does: known dtypes, whole shapes, offsets inside the data, each
    tensor's size matching its shape, tensors tiling the data without gaps or overlap.
    """
    if not blob:
        return {}
    bad = f"{path}: weights are not valid safetensors"
    if len(blob) < 8:
        raise ArtifactError(f"{bad} (truncated header)")
    header_len = int.from_bytes(blob[:8], "little")
    if header_len > min(len(blob) - 8, 100 * 2 ** 20):
        raise ArtifactError(f"{bad} (header length {header_len} exceeds the data)")
    try:
        header = json.loads(bytes(blob[8:8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{bad} (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{bad} (header is not an object)")
    header.pop("__metadata__", None)
    start = 8 + header_len
    data_len = len(blob) - start
    spans, weights = [], {}
    for name, entry in header.items():
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{bad} (entry {name!r}: {type(e).__name__}: {e})"[:300]) from None
        nbytes = torch.empty((), dtype=dtype).element_size()
        for d in shape:
            nbytes *= d
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_len or end - begin != nbytes:
            raise ArtifactError(f"{bad} (entry {name!r} has inconsistent shape and offsets)"[:300])
        spans.append((begin, end))
        count = nbytes // torch.empty((), dtype=dtype).element_size()
        weights[name] = (torch.frombuffer(blob, dtype=dtype, count=count, offset=start + begin)
                         if count else torch.empty(0, dtype=dtype)).reshape(shape)
    covered = 0
    for begin, end in sorted(spans):
        if begin != covered:
            raise ArtifactError(f"{bad} (tensor data overlaps or leaves gaps)")
        covered = end
    if covered != data_len:
        raise ArtifactError(f"{bad} (trailing bytes after the tensors)")
    return weights


def _check_weights(buckets: list[Program], weights: dict, path: Path) -> None:
    # buckets share weights; static buffers have no stored data (the context registry owns them)
    expected = {n: s for p in buckets for n, s in p.weights.items() if n not in p.static_buffers}
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))
        raise ArtifactError(f"{path}: weights do not match the program (missing {missing[:5]})")
    for name, spec in expected.items():
        if TensorSpec.of(weights[name]) != spec:
            raise ArtifactError(f"{path}: weight {name!r} is {TensorSpec.of(weights[name])}, "
                                f"the program expects {spec}")


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()
