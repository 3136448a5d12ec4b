"""Meta models: modules built on the meta device (shapes, no weights) compile for prediction
only; and the errors users get for inputs and ops the stack cannot handle."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import rebel
from zoo.llm import llama3_8b_config, llama_decode_step


def _meta_mlp():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024))
    return model, [torch.empty(8, 1024, device="meta")]


def test_meta_model_predicts_memory_and_latency_but_refuses_to_run():
    model, inputs = _meta_mlp()
    compiled = rebel.compile_from_torch(model, inputs)
    assert compiled.is_meta
    weights = 2 * (1024 * 4096 * 2 + 4096 + 1024)  # FP16
    assert compiled.program.weight_bytes == weights
    assert compiled.device_memory_bytes() > weights
    assert compiled.predicted_latency_s() > 0
    assert "meta" in repr(compiled)
    with pytest.raises(rebel.RBLNError, match="meta tensors.*prediction only"):
        compiled.create_runtime()


def test_meta_model_matches_the_real_model_prediction():
    model, inputs = _meta_mlp()
    meta = rebel.compile_from_torch(model, inputs)
    torch.random.default_generator.manual_seed(0)
    real_model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024))
    real = rebel.compile_from_torch(real_model, [torch.randn(8, 1024)])
    assert meta.device_memory_bytes() == real.device_memory_bytes()
    assert meta.predicted_latency_s() == pytest.approx(real.predicted_latency_s())


def test_meta_model_saves_loads_and_explains(tmp_path):
    model, inputs = _meta_mlp()
    path = rebel.compile_from_torch(model, inputs).save(tmp_path / "meta.rbln")
    assert path.stat().st_size < 100_000  # no weight data
    loaded = rebel.RBLNCompiledModel.load(path)
    assert loaded.is_meta and loaded.program.weight_bytes > 16 * 2**20
    report = rebel.explain(path)
    assert report.meta and "prediction only" in str(report)
    with pytest.raises(rebel.RBLNError, match="cannot run"):
        rebel.Runtime(path)


def test_tiny_llama_decode_step_runs_and_matches():
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, vocab_size=100)
    torch.random.default_generator.manual_seed(0)
    step, inputs = llama_decode_step(cfg, past=16)
    for name, buf in step.named_buffers():
        buf.normal_()
    with torch.no_grad():
        ref = step(*inputs)
    out = rebel.compile_from_torch(step, inputs).create_runtime().run(*inputs)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 2e-2


@pytest.mark.slow
def test_llama3_8b_on_meta_compiles_for_prediction_in_under_a_minute():
    step, inputs = llama_decode_step(llama3_8b_config(), past=1024, device="meta")
    start = time.perf_counter()
    compiled = rebel.compile_from_torch(step, inputs, npu="RBLN-CA25")
    seconds = time.perf_counter() - start
    assert seconds < 60
    params = 8_030_261_248  # Llama-3-8B
    assert compiled.program.weight_bytes >= 2 * params  # FP16 weights (+ the 1024-token KV cache)
    memory = compiled.device_memory_bytes()
    assert 16e9 < memory < 18e9
    latency = compiled.predicted_latency_s()
    # A decode step streams its weights from DRAM once (the 1 GB embedding table only for the
    # one row it gathers): close to weight bytes / DRAM bandwidth.
    stream = compiled.program.weight_bytes / compiled.compiled.spec.die.memory.dram_bandwidth
    assert 0.8 * stream < latency < 2 * stream
    report = rebel.explain(compiled)
    assert report.meta and report.buckets[0].host_ops == 0
    with pytest.raises(rebel.RBLNError, match="prediction only"):
        compiled.create_runtime()
    print(f"\nLlama-3-8B decode (meta): compile {seconds:.1f} s, device memory "
          f"{memory / 2**30:.2f} GiB, predicted decode latency {latency * 1e3:.2f} ms")


# ---- bad inputs ---------------------------------------------------------------------------------

_lib = torch.library.Library("rbln_test", "DEF")
_lib.define("nohost(Tensor x) -> Tensor")
_lib.impl("nohost", lambda x: torch.empty_like(x), "Meta")


class UsesOpWithoutKernels(nn.Module):
    def forward(self, x):
        return torch.ops.rbln_test.nohost(x * 2) + 1


def test_op_with_no_kernel_and_no_host_path_names_the_op_and_node():
    with pytest.raises(rebel.CompileError, match=r"node nohost.*rbln_test\.nohost\.default.*no device kernel and no host path"):
        rebel.compile_from_torch(UsesOpWithoutKernels(), [torch.randn(4, 4)])


def test_host_fallback_ops_still_run():
    class Atan(nn.Module):
        def forward(self, x):
            return torch.atan(x * 2) + 1

    x = torch.randn(4, 4)
    compiled = rebel.compile_from_torch(Atan(), [x])
    assert rebel.explain(compiled).buckets[0].host_ops == 1
    out = compiled.create_runtime().run(x)
    assert ((out - Atan()(x)).abs().max()).item() < 1e-2
