"""Mutation fuzzing of a saved .rbln: every mutated file either loads to a model that runs, or
fails with an ArtifactError. Nothing else may escape (no NotImplementedError from zipfile, no
KeyError from the runtime), and nothing may hang.

Two kinds of mutation: damage (bytes flipped, truncation, foreign compression) must give the
original output if it loads at all, since the checksums should catch any change that matters.
Rewrites that also fix up the manifest's checksums ("resealed") make a different, possibly
nonsensical model: it must be refused with an ArtifactError or load and run, and its output may
differ (a rewritten weight is a different model).

Seeded, so a failure is reproducible by its case index."""
from __future__ import annotations

import hashlib
import io
import json
import random
import zipfile

import pytest
import torch

import rebel

from seed_models import Foo  # tests/seed_models.py

CASES = 500


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    torch.manual_seed(0)
    compiled = rebel.compile_from_torch(Foo(), example_inputs=[torch.randn(16, 16)])
    x = torch.randn(16, 16)
    path = compiled.save(tmp_path_factory.mktemp("fuzz") / "model.rbln")
    return path.read_bytes(), x, rebel.Runtime(compiled).run(x)


def _members(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return {name: z.read(name) for name in z.namelist()}


def _zip(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    return out.getvalue()


def _rechecksum(members: dict[str, bytes]) -> dict[str, bytes]:
    """Make the manifest's checksums match again, so the mutation reaches the parsers."""
    try:
        manifest = json.loads(members["manifest.json"])
        manifest["files"] = {n: hashlib.sha256(b).hexdigest() for n, b in members.items()
                             if n != "manifest.json"}
    except Exception:
        return members
    return {**members, "manifest.json": json.dumps(manifest).encode()}


def _mutate_json(value, rng: random.Random):
    """Replace one randomly chosen node of a JSON tree with a value of a wrong or odd kind."""
    odd = [None, True, -1, 0, 10**12, 1.5, "", "x", [], {}, [1, "a"], {"shape": "x"}]
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        if rng.random() < 0.2:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: _mutate_json(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        return [*value[:i], _mutate_json(value[i], rng), *value[i + 1:]]
    return rng.choice(odd)


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, bool]:
    """A mutated copy of `data`, and whether its checksums were fixed up (resealed)."""
    kind = rng.randrange(8)
    if kind == 0:  # flip a few bits anywhere in the file
        blob = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        return bytes(blob), False
    if kind == 1:  # truncate
        return data[:rng.randrange(len(data))], False
    members = _members(data)
    name = rng.choice(sorted(members))
    if kind == 2:  # a member replaced by random bytes
        members[name] = rng.randbytes(rng.randint(0, 256))
        resealed = rng.random() < 0.5
        return _zip(_rechecksum(members) if resealed else members), resealed
    if kind == 3:  # a JSON member with one node of a wrong kind, checksums fixed up
        name = rng.choice([n for n in sorted(members) if n.endswith(".json")])
        members[name] = json.dumps(_mutate_json(json.loads(members[name]), rng)).encode()
        return _zip(members if name == "manifest.json" else _rechecksum(members)), True
    if kind == 4:  # flip a bit inside a member's content, checksums fixed up
        blob = bytearray(members[name])
        if blob:
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        members[name] = bytes(blob)
        return _zip(_rechecksum(members)), True
    if kind == 6:  # the safetensors header (JSON) with one node of a wrong kind, resealed
        blob = members["weights.safetensors"]
        n = int.from_bytes(blob[:8], "little")
        header = json.dumps(_mutate_json(json.loads(blob[8:8 + n]), rng)).encode()
        members["weights.safetensors"] = len(header).to_bytes(8, "little") + header + blob[8 + n:]
        return _zip(_rechecksum(members)), True
    if kind == 5:  # deflated instead of stored: still a valid artifact
        return _zip(members, compression=zipfile.ZIP_DEFLATED), False
    # a compression method zipfile cannot read (e.g. 99, AES), in the central directory
    raw = bytearray(_zip(members))
    for i in range(len(raw) - 4):
        if raw[i:i + 4] == b"PK\x01\x02" and rng.random() < 0.5:
            raw[i + 10:i + 12] = rng.choice([99, 14, 93, 12]).to_bytes(2, "little")
    return bytes(raw), False


def test_mutated_artifacts_load_and_match_or_raise_artifact_error(original, tmp_path):
    data, x, expected = original
    rng = random.Random(11)
    outcomes = {"loaded": 0, "ArtifactError": 0}
    escapes = []
    for case in range(CASES):
        path = tmp_path / f"case{case}.rbln"
        blob, resealed = mutate(data, rng)
        path.write_bytes(blob)
        try:
            y = rebel.Runtime(path).run(x)
        except rebel.ArtifactError as e:
            assert str(e) and "\n" not in str(e), (case, str(e))
            outcomes["ArtifactError"] += 1
        except Exception as e:  # noqa: BLE001 - what the test is looking for
            escapes.append(f"case {case}: {type(e).__name__}: {e}"[:300])
        else:
            if not resealed and not torch.equal(y, expected):
                escapes.append(f"case {case}: loaded but output differs")
            outcomes["loaded"] += 1
        path.unlink()
    assert not escapes, "\n".join(escapes)
    assert outcomes["ArtifactError"] > CASES // 2, outcomes
