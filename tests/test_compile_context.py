"""Compile contexts: static-address buffers shared by separately compiled graphs and their
runtimes (a KV cache written by a prefill graph, read by a decode graph), weight sharing, the
vendor's memory queries, reload in a fresh process, and concurrent callers."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import rebel
from rebel.compile_context import CompileContext
from rebel.device.memory import device_memory
from rebel.runtime import device_state

SRC = Path(__file__).resolve().parents[1] / "src"
D, S, CHUNK = 8, 16, 4  # head dim, cache rows, prefill tokens


class Prefill(torch.nn.Module):
    """Writes the keys of a chunk into the cache (in place) at their positions."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x, pos, cache):
        k = self.proj(x)
        cache.index_copy_(0, pos, k)
        return k.sum(-1)


class Decode(torch.nn.Module):
    """Appends one key, then attends over the cache rows up to its position."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, q, pos, cache):
        k = self.proj(q)
        cache[pos] = k  # slice assignment: an in-place index_put on the static buffer
        scores = (k @ cache.T) / math.sqrt(D)
        scores = scores.masked_fill(torch.arange(S) > pos, float("-inf"))
        return torch.softmax(scores, -1) @ cache


class ReadOnly(torch.nn.Module):
    """Only reads the cache (a cross-attention graph): it must not be folded to zeros."""

    def forward(self, q, cache):
        return q @ cache.T


PREFILL_INFO = [("x", [CHUNK, D], "float32"), ("pos", [CHUNK], "int64"), ("kv", [S, D], "float32")]
DECODE_INFO = [("q", [1, D], "float32"), ("pos", [1], "int64"), ("kv", [S, D], "float32")]


def _proj():
    torch.manual_seed(0)
    return torch.nn.Linear(D, D)


def compile_pair(weight_sharing: bool = True, meta: bool = True):
    """Prefill and decode compiled separately in one context, the vendor's way: the cache is an
    example input (a meta tensor) marked static, and input_info names it."""
    proj = _proj()
    context = CompileContext(use_weight_sharing=weight_sharing)
    cache = torch.zeros(S, D, device="meta" if meta else "cpu")
    context.mark_static_address(cache, "kv")
    prefill = rebel.compile_from_torch(
        Prefill(proj), input_info=PREFILL_INFO, compile_context=context,
        example_inputs=[torch.zeros(CHUNK, D), torch.arange(CHUNK), cache])
    decode = rebel.compile_from_torch(
        Decode(proj), input_info=DECODE_INFO, compile_context=context,
        example_inputs=[torch.zeros(1, D), torch.zeros(1, dtype=torch.long), cache])
    return proj, context, prefill, decode


def chunk_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(CHUNK, D, generator=g), torch.arange(CHUNK)


def queries(n: int, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, D, generator=g) for _ in range(n)]


def reference(proj, steps: int = 3):
    """FP32 eager: the same modules on a real cache tensor."""
    cache = torch.zeros(S, D)
    with torch.no_grad():
        first = Prefill(proj)(*chunk_inputs(), cache)
        outs = [Decode(proj)(q, torch.tensor([CHUNK + i]), cache) for i, q in enumerate(queries(steps))]
    return first, outs, cache


def run_pair(prefill_rt, decode_rt, steps: int = 3):
    first = prefill_rt(*chunk_inputs())
    outs = [decode_rt(q, torch.tensor([CHUNK + i])) for i, q in enumerate(queries(steps))]
    return first, outs


@pytest.fixture(autouse=True)
def no_leaks():
    before = device_memory(0).used
    yield
    assert device_memory(0).used == before, "a test left device DRAM allocated"
    assert not device_state.states()


def test_prefill_writes_and_decode_reads_the_shared_cache(tmp_path):
    proj, context, prefill, decode = compile_pair()
    ref_first, ref_outs, _ = reference(proj)
    with rebel.Runtime(prefill) as p, rebel.Runtime(decode) as d:
        first, outs = run_pair(p, d)
    assert torch.allclose(first, ref_first, atol=2e-2, rtol=1e-2)
    for got, want in zip(outs, ref_outs):
        assert torch.allclose(got, want, atol=2e-2, rtol=1e-2)
    assert outs[0].abs().max() > 0.1  # the decode really read what prefill wrote
    assert "kv: float32[16, 8]" in repr(context) and "compiled_graphs=2" in repr(context)


def test_caller_omits_static_inputs_positional_and_keyword():
    _, _, prefill, decode = compile_pair()
    assert [n for n, _ in decode.program.inputs] == ["input_1", "input_2"]
    assert decode.program.static_buffers == {"kv": [S, D]}
    with rebel.Runtime(prefill) as p, rebel.Runtime(decode) as d:
        assert p._index_to_input_name == {0: "x", 1: "pos"}
        assert d._index_to_input_name == {0: "q", 1: "pos"}
        x, pos = chunk_inputs()
        by_name = p(x=x, pos=pos)
        by_position = p(x, pos)
        assert torch.equal(by_name, by_position)
        with pytest.raises(rebel.InputError, match="expected 2 input"):
            d(torch.zeros(1, D), torch.tensor([4]), torch.zeros(S, D))
        with pytest.raises(rebel.InputError, match="unknown input 'kv'"):
            d(torch.zeros(1, D), torch.tensor([4]), kv=torch.zeros(S, D))


def test_meta_static_example_compiles_runnable_and_real_example_behaves_alike():
    _, _, prefill, decode = compile_pair(meta=True)
    assert not prefill.is_meta and not decode.is_meta
    _, _, prefill2, decode2 = compile_pair(meta=False)
    with rebel.Runtime(prefill) as p, rebel.Runtime(decode) as d:
        a = run_pair(p, d)
    with rebel.Runtime(prefill2) as p, rebel.Runtime(decode2) as d:
        b = run_pair(p, d)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_read_only_static_buffer_is_not_folded():
    """The reader is compiled alone first and only reads the cache; folding it would bake the
    compile-time zeros in (the Whisper cross-attention pitfall)."""
    proj = _proj()
    context = CompileContext()
    cache = torch.zeros(S, D, device="meta")
    context.mark_static_address(cache, "cross_kv")
    reader = rebel.compile_from_torch(ReadOnly(), example_inputs=[torch.zeros(1, D), cache],
                                      compile_context=context)
    writer = rebel.compile_from_torch(Prefill(proj), example_inputs=[
        torch.zeros(CHUNK, D), torch.arange(CHUNK), cache], compile_context=context)
    assert "cross_kv" not in reader.compiled.weights  # no stored copy, only the buffer
    assert reader.program.kernels  # the matmul runs on the device
    q = queries(1)[0]
    with rebel.Runtime(reader) as r, rebel.Runtime(writer) as w:
        assert r(q).abs().max() == 0  # the buffer starts as zeros
        w(*chunk_inputs())
        got = r(q)
    cache = torch.zeros(S, D)
    with torch.no_grad():
        Prefill(proj)(*chunk_inputs(), cache)
    assert got.abs().max() > 0.1
    assert torch.allclose(got, q @ cache.T, atol=3e-2, rtol=1e-2)


def test_saved_files_reload_in_a_fresh_process_and_share_the_cache(tmp_path):
    proj, _, prefill, decode = compile_pair()
    prefill.save(tmp_path / "prefill.rbln")
    decode.save(tmp_path / "decode.rbln")
    with rebel.Runtime(prefill) as p, rebel.Runtime(decode) as d:
        first, outs = run_pair(p, d)
    script = f"""
import json, sys, torch, rebel
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_compile_context import run_pair
from rebel.device.memory import device_memory
p = rebel.Runtime(rebel.RBLNCompiledModel({str(tmp_path / 'prefill.rbln')!r}))
d = rebel.Runtime({str(tmp_path / 'decode.rbln')!r})
first, outs = run_pair(p, d)
used = device_memory(0).used
print(json.dumps({{"first": first.tolist(), "outs": [o.tolist() for o in outs],
                  "names": [p._index_to_input_name, d._index_to_input_name], "used": used,
                  "own": p.dram_bytes + d.dram_bytes, "shared": d.context_dram_bytes}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert torch.equal(torch.tensor(got["first"]), first)
    for a, b in zip(got["outs"], outs):
        assert torch.equal(torch.tensor(a), b)
    assert got["names"] == [{"0": "x", "1": "pos"}, {"0": "q", "1": "pos"}]
    assert got["used"] == got["own"] + got["shared"]


def test_weight_sharing_holds_weights_once_plus_the_static_buffer():
    proj, _, prefill, decode = compile_pair(weight_sharing=True)
    _, _, prefill_n, decode_n = compile_pair(weight_sharing=False)
    weights = prefill.program.weight_bytes
    cache = S * D * 2  # fp16 on the device
    activations = [max(rebel.runtime.runtime.activation_bytes(p) for p in m.buckets)
                   for m in (prefill, decode)]
    base = device_memory(0).used
    with rebel.Runtime(prefill) as p, rebel.Runtime(decode) as d:
        shared_used = device_memory(0).used - base
        assert p.context_dram_bytes == weights + cache
    assert shared_used == weights + cache + sum(activations)
    with rebel.Runtime(prefill_n) as p, rebel.Runtime(decode_n) as d:
        plain_used = device_memory(0).used - base
        assert d.context_dram_bytes == cache
    assert plain_used == prefill_n.program.weight_bytes + decode_n.program.weight_bytes + cache + sum(activations)
    assert plain_used - shared_used == decode_n.program.weight_bytes > 0
    # the memory queries count each weight once over the context's models
    total = sum(m.get_alloc_per_chiplet_by_key()["Weight"][0][0] for m in (prefill, decode))
    assert total == weights


def test_shared_weights_stay_one_host_copy_and_unshared_ones_are_packed():
    """Shared weights: both runtimes hold the context's one FP32 tensor (a 16-bit copy per
    runtime would add memory beside it); without sharing, the decode graph's few-row linear holds
    its weight in 16 bits only (packed_linear)."""
    from rebel.device import packed_linear
    _, _, prefill, decode = compile_pair(weight_sharing=True)
    with rebel.Runtime(prefill) as p, rebel.Runtime(decode) as d:
        names = [n for n in d._die_weights[0] if not n.endswith(packed_linear.SUFFIX)]
        assert names and all(d._die_weights[0][n] is p._die_weights[0][n] for n in names)
        assert not any(n.endswith(packed_linear.SUFFIX) for n in d._die_weights[0])
    if packed_linear._form((8, 8), torch.float16, 1, 1):
        _, _, _, decode_n = compile_pair(weight_sharing=False)
        with rebel.Runtime(decode_n) as d:
            held = d._die_weights[0]
            assert any(n.endswith(packed_linear.SUFFIX) and t.dtype == torch.float16 for n, t in held.items())


def test_memory_queries_follow_the_dram_accounting_and_resizes(tmp_path):
    _, _, prefill, decode = compile_pair()
    alloc = prefill.get_alloc_per_chiplet_by_key()
    assert set(alloc) >= {"DramTensor", "Weight", "Activation"}
    assert alloc["DramTensor"] == [[S * D * 2]]
    assert prefill.exp_get_dram_tensor_sizes() == {"kv": [[S * D * 2]]}
    # the vendor's block-count derivation: free DRAM after everything else over bytes per row
    free = device_memory(0).free_bytes
    others = sum(m.get_alloc_per_chiplet_by_key()[k][0][0] for m in (prefill, decode)
                 for k in ("Weight", "Activation"))
    per_row = prefill.exp_get_dram_tensor_sizes()["kv"][0][0] // S
    fits_rows = (free - others) // per_row
    for model in (prefill, decode):
        model.exp_multiply_buffer_size({"kv": 4})
    assert prefill.exp_get_dram_tensor_sizes() == {"kv": [[4 * S * D * 2]]}
    base = device_memory(0).used
    with rebel.Runtime(prefill) as p, rebel.Runtime(decode) as d:
        assert device_memory(0).used - base == p.dram_bytes + d.dram_bytes + p.context_dram_bytes
        assert p.context_dram_bytes == prefill.program.weight_bytes + 4 * S * D * 2
        # index_copy_ addresses rows, so the prefill runs on the grown buffer (as the vendor's
        # paged attention addresses blocks); the decode's mask is compiled for S rows
        first = p(*chunk_inputs())
    assert torch.allclose(first, reference(_proj())[0], atol=2e-2, rtol=1e-2)
    for model in (prefill, decode):
        model.exp_rescale_buffer_size({"kv": (2, 4)})
    assert decode.exp_get_dram_tensor_sizes() == {"kv": [[2 * S * D * 2]]}
    decode.save(tmp_path / "decode.rbln")
    assert rebel.RBLNCompiledModel(tmp_path / "decode.rbln").exp_get_dram_tensor_sizes() == \
        {"kv": [[2 * S * D * 2]]}
    with pytest.raises(rebel.CompileError, match="whole number"):
        decode.exp_rescale_buffer_size({"kv": (1, 3)})
    with pytest.raises(rebel.CompileError, match="no static buffer named"):
        decode.exp_multiply_buffer_size({"past_key_values_0": 2})
    # models of one context that disagree on the size are refused, not silently mixed
    with rebel.Runtime(prefill) as p:
        decode.exp_multiply_buffer_size({"kv": 2})
        with pytest.raises(rebel.RBLNError, match="resize every model of the context alike"):
            rebel.Runtime(decode)
    # a buffer grown past what the device holds fails like the chip would
    prefill.exp_multiply_buffer_size({"kv": fits_rows // (2 * S) + 2})
    with pytest.raises(rebel.DeviceMemoryError):
        rebel.Runtime(prefill)


class Accumulate(torch.nn.Module):
    def forward(self, x, acc):
        acc.add_(x)
        return acc + 0


class Scale(torch.nn.Module):
    def forward(self, acc):
        return acc.sum() * 1


def test_concurrent_runs_are_serialised_per_context():
    """Eight threads each add into one static accumulator 25 times, through two runtimes of the
    context; a lost or torn update would show in the total."""
    context = CompileContext()
    acc = torch.zeros(4, device="meta")
    context.mark_static_address(acc)
    add = rebel.compile_from_torch(Accumulate(), example_inputs=[torch.zeros(4), acc],
                                   compile_context=context)
    read = rebel.compile_from_torch(Scale(), example_inputs=[acc], compile_context=context)
    with rebel.Runtime(add) as a1, rebel.Runtime(add) as a2, rebel.Runtime(read) as r:
        seen = []

        def work(rt):
            for _ in range(25):
                rt(torch.ones(4))
                seen.append(float(r()))

        threads = [threading.Thread(target=work, args=(a1 if i % 2 else a2,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert float(r()) == 8 * 25 * 4
        assert all(v % 4 == 0 for v in seen)  # never a half-applied update


def test_concurrent_decodes_equal_serial_ones():
    proj, _, prefill, decode = compile_pair()
    qs = queries(12, seed=5)
    with rebel.Runtime(prefill) as p, rebel.Runtime(decode) as d:
        p(*chunk_inputs())
        serial = [d(q, torch.tensor([CHUNK])) for q in qs]
        got = [None] * len(qs)

        def work(i):
            got[i] = d(qs[i], torch.tensor([CHUNK]))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(qs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(torch.equal(a, b) for a, b in zip(serial, got))


def test_runtimes_on_another_device_get_their_own_buffers():
    if rebel.device_count() < 2:
        pytest.skip("needs two virtual devices")
    proj, _, prefill, decode = compile_pair()
    q = queries(1)[0]
    with rebel.Runtime(prefill, device=0) as p, rebel.Runtime(decode, device=1) as d1, \
            rebel.Runtime(decode, device=0) as d0:
        p(*chunk_inputs())
        on_1 = d1(q, torch.tensor([CHUNK]))  # device 1's cache is still zeros
        on_0 = d0(q, torch.tensor([CHUNK]))  # device 0's holds the prefill's rows
        assert device_memory(1).used == d1.dram_bytes + d1.context_dram_bytes
    with torch.no_grad():
        fresh = Decode(proj)(q, torch.tensor([CHUNK]), torch.zeros(S, D))
    assert torch.allclose(on_1, fresh, atol=2e-2, rtol=1e-2)
    assert not torch.allclose(on_0, fresh, atol=5e-2)


def test_bad_context_use_is_refused():
    context = CompileContext()
    t = torch.zeros(2)
    context.mark_static_address(t, "a")
    with pytest.raises(rebel.CompileError, match="already marked"):
        context.mark_static_address(torch.zeros(2), "a")
    with pytest.raises(rebel.CompileError, match="CompileContext"):
        rebel.compile_from_torch(ReadOnly(), example_inputs=[torch.zeros(1, D), torch.zeros(S, D)],
                                 compile_context=object())
    with pytest.raises(rebel.CompileError, match="use_weight_sharing"):
        CompileContext(use_weight_sharing="yes")


def test_mutated_context_artifacts_load_and_run_or_raise_artifact_error(tmp_path):
    """The artifact fuzzer's mutations applied to a model with a static buffer and a
    weight-sharing context record: the new manifest and program fields are checked on load."""
    from test_artifact_fuzz import mutate  # tests/ is on the path under pytest

    import random
    _, _, prefill, _ = compile_pair()
    path = prefill.save(tmp_path / "prefill.rbln")
    data = path.read_bytes()
    with rebel.Runtime(prefill) as p:
        expected = p(*chunk_inputs())
    rng = random.Random(3)
    escapes, refused = [], 0
    for case in range(150):
        blob, resealed = mutate(data, rng)
        path.write_bytes(blob)
        try:
            with rebel.Runtime(path) as rt:
                y = rt(*chunk_inputs())
        except rebel.ArtifactError:
            refused += 1
        except rebel.DeviceMemoryError:
            if not resealed:  # only a rewritten (resealed) buffer size may ask for too much
                escapes.append(f"case {case}: DeviceMemoryError without a rewrite")
        except Exception as e:  # noqa: BLE001 - what the test is looking for
            escapes.append(f"case {case}: {type(e).__name__}: {e}"[:300])
        else:
            if not resealed and not torch.equal(y, expected):
                escapes.append(f"case {case}: loaded but output differs")
    assert not escapes, "\n".join(escapes)
    assert refused > 50
