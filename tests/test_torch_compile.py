"""torch.compile(backend="rbln"): registration, the seed example, HF models, options, disk cache."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import torch_rbln
from torch_rbln import stats

# 16-bit tolerance: device kernels round every result to FP16.
ATOL, RTOL = 3e-2, 3e-2


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    stats.reset()
    yield
    torch._dynamo.reset()


def test_backend_is_registered_by_entry_point():
    assert "rbln" in torch._dynamo.list_backends()
    from importlib.metadata import entry_points
    assert "rbln" in entry_points(group="torch_dynamo_backends").names


def test_seed_example_as_written():
    @torch.compile(backend="rbln")
    class Foo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(16, 16)
            self.gelu = torch.nn.GELU()

        def forward(self, x):
            x = self.linear(x)
            return self.gelu(x)

    model = Foo()
    x = torch.randn(16, 16)
    output = model(x)
    with torch.no_grad():
        ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, model.linear.weight, model.linear.bias))
    torch.testing.assert_close(output, ref, atol=ATOL, rtol=RTOL)
    rec = stats.current()
    assert len(rec.graph_compiles) == 1 and rec.graph_runs == 1 and rec.device_time_s > 0
    model(x)
    assert len(stats.current().graph_compiles) == 1  # same shape: no recompile


def test_graph_break_runs_rest_in_python():
    def f(x):
        y = torch.relu(x) * 2
        print("graph break")  # Dynamo splits the function here
        return y + 1

    compiled = torch.compile(f, backend="rbln")
    x = torch.randn(8, 8)
    torch.testing.assert_close(compiled(x), f(x), atol=ATOL, rtol=RTOL)
    assert len(stats.current().graph_compiles) == 2


def test_new_shapes_recompile_bounded_and_reported():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    compiled = torch.compile(model, backend="rbln", options={"max_shapes": 2})
    with torch.no_grad():
        for n in (2, 3, 4, 5, 6):
            x = torch.randn(n, 8)
            torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=RTOL)
    rec = stats.current()
    # shape 2 (static graph), then Dynamo's dynamic graph compiles 3 and 4 and stops at max_shapes
    assert len(rec.graph_compiles) == 3
    assert rec.graph_fallback_runs == 2
    assert "new input shape" in torch_rbln.explain()


def test_options_are_validated():
    f = torch.compile(lambda x: x + 1, backend="rbln", options={"bogus": 1})
    with pytest.raises(Exception, match="unknown option"):
        f(torch.ones(2))


def test_compile_only_mode_fills_the_cache(tmp_path):
    model = torch.nn.Linear(4, 4).eval()
    compiled = torch.compile(model, backend="rbln",
                             options={"mode": "compile_only", "cache_dir": str(tmp_path)})
    with torch.no_grad():
        x = torch.randn(2, 4)
        torch.testing.assert_close(compiled(x), model(x))  # ran on the host, exactly
    assert len(list(tmp_path.glob("*.rbln"))) == 1
    assert stats.current().graph_runs == 0


def test_options_reach_the_compiler(monkeypatch):
    import rebel
    seen = {}
    real = rebel.compile_from_torch

    def spy(module, inputs, **kwargs):
        seen.update(kwargs)
        return real(module, inputs, **{**kwargs, "tensor_parallel_size": 1})

    monkeypatch.setattr(rebel, "compile_from_torch", spy)
    compiled = torch.compile(torch.nn.Linear(4, 4).eval(), backend="rbln",
                             options={"tensor_parallel_size": 2, "npu": "RBLN-CA25",
                                      "device_dtype": "bfloat16"})
    with torch.no_grad():
        compiled(torch.randn(2, 4))
    assert seen == {"npu": "RBLN-CA25", "tensor_parallel_size": 2, "device_dtype": "bfloat16"}


def test_works_on_rbln_tensors():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        ref = model(x)
        compiled = torch.compile(model.to("rbln"), backend="rbln")
        out = compiled(x.to("rbln"))
    assert out.device.type == "rbln"
    torch.testing.assert_close(out.cpu(), ref, atol=ATOL, rtol=RTOL)


_CACHE_SCRIPT = textwrap.dedent("""
    import sys, torch, torch_rbln
    from torch_rbln import stats
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).eval()
    compiled = torch.compile(model, backend="rbln", options={"cache_dir": sys.argv[1]})
    with torch.no_grad():
        x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
        out = compiled(x)
        err = (out - model(x)).abs().max().item()
    r = stats.current()
    print(f"compiles={len(r.graph_compiles)} hits={r.graph_cache_hits} err={err:.4f}")
""")


@pytest.mark.slow
def test_second_process_hits_disk_cache(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_CACHE_SCRIPT)
    cache = tmp_path / "cache"
    first = subprocess.run([sys.executable, str(script), str(cache)], capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1]
    second = subprocess.run([sys.executable, str(script), str(cache)], capture_output=True, text=True,
                            check=True).stdout.strip().splitlines()[-1]
    assert first.startswith("compiles=1 hits=0"), first
    assert second.startswith("compiles=0 hits=1"), second  # no recompilation
    assert float(second.split("err=")[1]) < ATOL


def _hf():
    return pytest.importorskip("transformers")


@pytest.mark.slow
def test_bert_matches_cpu():
    transformers = _hf()
    config = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 512, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out = torch.compile(model, backend="rbln")(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
    assert stats.current().graph_runs >= 1 and stats.current().graph_fallback_runs == 0


@pytest.mark.slow
def test_small_llama_matches_cpu():
    transformers = _hf()
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        out = torch.compile(model, backend="rbln")(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
    assert stats.current().graph_runs >= 1 and stats.current().graph_fallback_runs == 0


def test_parameter_data_reads_compile():
    """`self.weight.data` inside forward (vLLM's RMSNorm does it) is the parameter itself: the
    graph compiles for the device instead of falling back to the host."""
    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(8) + 0.5)

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight.data

    model = Norm().eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        out = torch.compile(model, backend="rbln")(x)
    torch.testing.assert_close(out, model(x).detach(), atol=ATOL, rtol=RTOL)
    rec = stats.current()
    assert rec.graph_runs == 1 and rec.graph_fallback_runs == 0


def test_device_option_places_cpu_graphs_on_a_die(monkeypatch):
    """options={"device": i}: a tensor-parallel worker's CPU-tensor graphs run on rbln:i."""
    import rebel
    devices = []
    real = rebel.Runtime

    def spy(compiled, **kwargs):
        devices.append(kwargs.get("device"))
        return real(compiled, **kwargs)

    monkeypatch.setattr(rebel, "Runtime", spy)
    compiled = torch.compile(torch.nn.Linear(4, 4).eval(), backend="rbln", options={"device": 2})
    with torch.no_grad():
        compiled(torch.randn(2, 4))
    assert devices == [2]
