"""The .rbln artifact: it round-trips into a fresh process, loading never unpickles, and every
way a file can be wrong ends in an ArtifactError that says which way."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import rebel
from rebel.compiler.artifact import FORMAT_VERSION
from rebel.runtime import RBLNCompiledModel

from seed_models import Foo  # tests/seed_models.py

SRC = Path(__file__).resolve().parents[1] / "src"
MEMBERS = {"manifest.json", "program.json", "weights.safetensors"}


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    return rebel.compile_from_torch(Foo(), example_inputs=[torch.randn(16, 16)])


@pytest.fixture
def artifact(compiled, tmp_path) -> Path:
    return compiled.save(tmp_path / "model.rbln")


def read_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def write_members(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    return path


def with_manifest(members: dict[str, bytes], **changes) -> dict[str, bytes]:
    manifest = json.loads(members["manifest.json"])
    manifest.update(changes)
    return {**members, "manifest.json": json.dumps(manifest).encode()}


def with_program(members: dict[str, bytes], program: bytes) -> dict[str, bytes]:
    """Replace program.json and update its checksum, so only the program itself is wrong."""
    manifest = json.loads(members["manifest.json"])
    manifest["files"]["program.json"] = hashlib.sha256(program).hexdigest()
    return {**members, "program.json": program, "manifest.json": json.dumps(manifest).encode()}


def artifact_error(path) -> str:
    with pytest.raises(rebel.ArtifactError) as info:
        rebel.Runtime(path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400 + len(str(path))
    return message


# --- round trip --------------------------------------------------------------------------------

def test_artifact_layout(artifact, compiled):
    members = read_members(artifact)
    assert set(members) == MEMBERS
    manifest = json.loads(members["manifest.json"])
    assert manifest["format"] == "rbln-artifact" and manifest["version"] == FORMAT_VERSION
    assert manifest["npu"] == "RBLN-CA25"
    for name in ("program.json", "weights.safetensors"):
        assert manifest["files"][name] == hashlib.sha256(members[name]).hexdigest()
    program = json.loads(members["program.json"])
    assert program["npu"] == "RBLN-CA25" and program["device_dtype"] == "float16"
    # safetensors: 8-byte little-endian header length, then a JSON header; no pickle anywhere.
    weights = members["weights.safetensors"]
    (header_len,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8:8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    assert len(header) - ("__metadata__" in header) == len(compiled.program.weights)
    assert not list(artifact.parent.glob("*.tmp"))  # written atomically


def test_load_in_process_matches(artifact, compiled):
    x = torch.randn(16, 16)
    expected = rebel.Runtime(compiled).run(x)
    loaded = RBLNCompiledModel.load(artifact)
    assert loaded.program.to_json() == compiled.program.to_json()
    assert set(loaded.compiled.weights) == set(compiled.compiled.weights)
    for name, w in compiled.compiled.weights.items():
        assert torch.equal(loaded.compiled.weights[name], w)
    assert torch.equal(rebel.Runtime(artifact).run(x), expected)


def test_load_never_unpickles(artifact, compiled, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("loading an artifact must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    x = torch.randn(16, 16)
    runtime = rebel.Runtime(str(artifact))
    assert torch.equal(runtime.run(x), rebel.Runtime(compiled).run(x))


def test_fresh_process_round_trip(artifact, compiled, tmp_path):
    x = torch.randn(16, 16)
    torch.save(x, tmp_path / "x.pt")
    expected = rebel.Runtime(compiled).run(x)
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import torch
        import rebel
        folder = sys.argv[1]
        x = torch.load(folder + "/x.pt", weights_only=True)
        runtime = rebel.Runtime(folder + "/model.rbln", tensor_type="pt")
        y = runtime.run(x)
        assert y.dtype == torch.float32, y.dtype
        np.save(folder + "/y.npy", y.numpy())
        np.save(folder + "/y_np.npy", rebel.Runtime(folder + "/model.rbln", tensor_type="np").run(x.numpy()))
        print(runtime.last_report.latency_s)
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBLN_")}
    env["PYTHONPATH"] = str(SRC)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    y = np.load(tmp_path / "y.npy", allow_pickle=False)
    assert y.dtype == np.float32 and y.shape == (16, 16)
    np.testing.assert_array_equal(y, expected.numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "y_np.npy", allow_pickle=False), y)
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(compiled.predicted_latency_s())


# --- bad artifacts -------------------------------------------------------------------------------

def test_nonexistent_path(tmp_path):
    path = tmp_path / "missing.rbln"
    message = artifact_error(path)
    assert "no compiled model" in message and "missing.rbln" in message
    with pytest.raises(rebel.ArtifactError, match="no compiled model"):
        RBLNCompiledModel.load(path)


def test_directory_is_not_an_artifact(tmp_path):
    assert "no compiled model" in artifact_error(tmp_path)


def test_truncated_file(artifact):
    data = artifact.read_bytes()
    artifact.write_bytes(data[:len(data) // 2])
    message = artifact_error(artifact)
    assert "truncated or not a zip" in message and str(artifact) in message


def test_empty_file(tmp_path):
    path = tmp_path / "empty.rbln"
    path.write_bytes(b"")
    assert "truncated or not a zip" in artifact_error(path)


@pytest.mark.parametrize("member", ["program.json", "weights.safetensors"])
def test_flipped_byte_fails_checksum(artifact, member):
    members = read_members(artifact)
    blob = bytearray(members[member])
    i = len(blob) // 2
    blob[i] ^= 0x01
    members[member] = bytes(blob)  # the old manifest still holds the old checksum
    write_members(artifact, members)
    message = artifact_error(artifact)
    assert "corrupted" in message and f"checksum of {member}" in message


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.rbln"
    path.write_bytes(random.Random(0).randbytes(4096))
    assert "not a valid .rbln file" in artifact_error(path)


def test_zip_without_manifest(tmp_path):
    path = write_members(tmp_path / "other.rbln", {"hello.txt": b"hi"})
    message = artifact_error(path)
    assert "not an open-rbln artifact" in message and "manifest.json" in message


def test_manifest_of_another_format(artifact):
    write_members(artifact, with_manifest(read_members(artifact), format="onnx-model"))
    message = artifact_error(artifact)
    assert "not an open-rbln artifact" in message and "onnx-model" in message


def test_manifest_not_json(artifact):
    write_members(artifact, {**read_members(artifact), "manifest.json": b"{not json"})
    assert "manifest.json is not valid JSON" in artifact_error(artifact)


def test_manifest_not_an_object(artifact):
    write_members(artifact, {**read_members(artifact), "manifest.json": b"[1, 2]"})
    assert "not an open-rbln artifact" in artifact_error(artifact)


def test_incompatible_format_version(artifact):
    write_members(artifact, with_manifest(read_members(artifact), version=999))
    message = artifact_error(artifact)
    assert "version 999" in message and f"reads version {FORMAT_VERSION}" in message


def test_missing_member(artifact):
    members = read_members(artifact)
    del members["weights.safetensors"]
    write_members(artifact, members)
    message = artifact_error(artifact)
    assert "incomplete" in message and "weights.safetensors" in message


def test_malformed_program_json(artifact):
    write_members(artifact, with_program(read_members(artifact), b'{"version": 1, "npu": '))
    assert "program.json is not valid JSON" in artifact_error(artifact)


def test_program_missing_keys(artifact):
    write_members(artifact, with_program(read_members(artifact), b'{"version": 1, "npu": "RBLN-CA25"}'))
    message = artifact_error(artifact)
    assert "program is malformed" in message and "KeyError" in message


def test_program_version_mismatch(artifact):
    members = read_members(artifact)
    program = json.loads(members["program.json"])
    program["version"] = 999
    write_members(artifact, with_program(members, json.dumps(program).encode()))
    assert "program format version 999" in artifact_error(artifact)


def test_program_naming_a_non_aten_target_is_refused(artifact):
    """An artifact cannot make the runtime call arbitrary Python (e.g. builtins.eval)."""
    members = read_members(artifact)
    program = json.loads(members["program.json"])
    host = next(s for s in program["segments"] if s["kind"] == "host")
    host["ops"][0]["target"] = "builtins.eval.default"
    write_members(artifact, with_program(members, json.dumps(program).encode()))
    message = artifact_error(artifact)
    assert "builtins.eval.default" in message and "ATen" in message


def test_weights_not_matching_program(artifact):
    members = read_members(artifact)
    program = json.loads(members["program.json"])
    name = next(iter(program["weights"]))
    program["weights"][name]["shape"] = [3, 3]
    write_members(artifact, with_program(members, json.dumps(program).encode()))
    message = artifact_error(artifact)
    assert repr(name) in message and "[3, 3]" in message


def test_artifact_for_a_custom_spec_file_loads(tmp_path, monkeypatch):
    from rebel.npu import reset_machine

    spec = tmp_path / "lab.toml"
    spec.write_text('base = "RBLN-CA12"\nname = "LAB-1"\n')
    monkeypatch.setenv("RBLN_VIRTUAL_NPU", str(spec))
    reset_machine()
    model = torch.nn.Linear(16, 16)
    compiled = rebel.compile_from_torch(model, example_inputs=[torch.randn(4, 16)], npu=str(spec))
    x = torch.randn(4, 16)
    expected = rebel.Runtime(compiled).run(x)
    path = compiled.save(tmp_path / "lab.rbln")
    assert torch.equal(rebel.Runtime(path).run(x), expected)
    assert rebel.RBLNCompiledModel.load(path).compiled.spec.name == "LAB-1"


def test_artifact_records_no_absolute_path(artifact):
    """An artifact is shipped to other machines: it must not carry the compiling one's paths."""
    for name, blob in read_members(artifact).items():
        if name.endswith(".json"):
            text = blob.decode()
            assert str(SRC) not in text and str(Path.home()) not in text and "/work/" not in text, name
    manifest = json.loads(read_members(artifact)["manifest.json"])
    assert "/" not in manifest["spec"]["source"]


def test_unknown_zip_compression_method(artifact):
    """zipfile raises NotImplementedError for methods it lacks; the loader must say ArtifactError."""
    raw = bytearray(artifact.read_bytes())
    i = raw.index(b"PK\x01\x02")  # first central directory entry: method at offset 10
    raw[i + 10:i + 12] = (99).to_bytes(2, "little")
    artifact.write_bytes(bytes(raw))
    assert "compression method 99" in artifact_error(artifact)


def test_meta_flag_flipped_on_a_real_model(artifact):
    write_members(artifact, with_manifest(read_members(artifact), meta=True))
    assert "meta" in artifact_error(artifact)


def test_program_referring_to_an_undefined_value(artifact):
    members = read_members(artifact)
    program = json.loads(members["program.json"])
    device = next(s for s in program["segments"] if s["kind"] == "device")
    device["copy_in"] = ["no_such_value"]
    write_members(artifact, with_program(members, json.dumps(program).encode()))
    message = artifact_error(artifact)
    assert "copy_in" in message and "no_such_value" in message


def test_loading_holds_the_weights_once(tmp_path):
    """The loader reads the weights member into one buffer that the tensors view: its peak
    Python allocation is about the weights' size, not twice it (safetensors.torch.load copies)."""
    import tracemalloc

    from rebel.compiler.artifact import load_artifact

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2048, 1024), torch.nn.Linear(1024, 1024))
    path = rebel.compile_from_torch(model, example_inputs=[torch.randn(2, 2048)]).save(tmp_path / "m.rbln")
    tracemalloc.start()
    try:
        loaded = load_artifact(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    weight_bytes = sum(w.numel() * w.element_size() for w in loaded.weights.values())
    assert weight_bytes > 5 * 2**20
    assert peak < weight_bytes + 3 * 2**20, (peak, weight_bytes)  # the old loader: 2x weights
    w = next(iter(loaded.weights.values()))
    w.add_(0)  # writable: in-place buffer updates on loaded weights are defined behaviour
