"""The eager "rbln" device: tensors, views, in-place ops, autograd, save/load, memory, devices,
fallbacks, explain() and the profiler."""
from __future__ import annotations

import copy
import io
import logging
import subprocess
import sys

import pytest
import torch

import torch_rbln  # noqa: F401  (registers the device when autoload is off)
from torch_rbln import _dispatch, stats

ATOL = RTOL = 2e-2  # values on the device are rounded to FP16


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("TORCH_RBLN_DISABLE_FALLBACK", raising=False)
    stats.reset()
    _dispatch.reset_logged()
    torch.rbln.set_device(0)
    yield
    torch.rbln.set_device(0)
    torch.rbln.set_device_dtype(torch.float16)


def test_factories_copies_and_printing():
    x = torch.ones(4, device="rbln")
    assert x.device == torch.device("rbln", 0) and x.is_rbln
    assert "device='rbln:0'" in repr(x)
    y = torch.randn(3, 4)
    assert torch.equal(y.to("rbln").cpu(), y.half().float())  # float32 on the device is FP16-rounded
    assert torch.equal(y.rbln().to(torch.float16).cpu(), y.half())
    assert torch.arange(5, device="rbln").cpu().tolist() == [0, 1, 2, 3, 4]


def test_views_and_in_place_ops_alias_device_memory():
    x = torch.arange(12.0, device="rbln").reshape(3, 4)
    row = x[1]
    row.mul_(10)
    x.t()[0].add_(1)  # a strided view written in place
    ref = torch.arange(12.0).reshape(3, 4)
    ref[1] *= 10
    ref.t()[0] += 1
    assert torch.equal(x.cpu(), ref)
    assert x.t().is_contiguous() is False and x.view(-1).shape == (12,)
    out = torch.empty(0, device="rbln")
    torch.add(x, x, out=out)
    assert out.shape == (3, 4) and torch.equal(out.cpu(), 2 * ref)


def test_module_forward_matches_cpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32),
                                torch.nn.Linear(32, 4), torch.nn.Softmax(-1))
    x = torch.randn(8, 16)
    ref = model(x)
    out = copy.deepcopy(model).to("rbln")(x.to("rbln"))
    assert out.device.type == "rbln"
    torch.testing.assert_close(out.cpu(), ref, atol=ATOL, rtol=RTOL)


def test_autograd():
    a = torch.randn(4, 5)
    x = a.clone().to("rbln").requires_grad_()
    (x.sin() * x).sum().backward()
    ref = a.clone().requires_grad_()
    (ref.sin() * ref).sum().backward()
    assert x.grad.device.type == "rbln"
    torch.testing.assert_close(x.grad.cpu(), ref.grad, atol=ATOL, rtol=RTOL)


def test_training_step_mlp_adamw_matches_cpu():
    # BF16 keeps FP32's range: AdamW's second moments and eps underflow in FP16.
    torch.rbln.set_device_dtype(torch.bfloat16)
    torch.manual_seed(0)
    cpu = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    dev = copy.deepcopy(cpu).to("rbln")
    cpu_opt = torch.optim.AdamW(cpu.parameters(), lr=1e-2)
    dev_opt = torch.optim.AdamW(dev.parameters(), lr=1e-2)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for model, opt, d in ((cpu, cpu_opt, "cpu"), (dev, dev_opt, "rbln")):
        for _ in range(2):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x.to(d)), y.to(d))
            loss.backward()
            opt.step()
    for p, q in zip(dev.parameters(), cpu.parameters()):
        assert p.device.type == "rbln"
        torch.testing.assert_close(p.detach().cpu(), q.detach(), atol=2e-2, rtol=2e-2)


def test_save_load_and_deepcopy():
    x = torch.randn(3, 3).to("rbln")
    buf = io.BytesIO()
    torch.save({"x": x, "sd": torch.nn.Linear(3, 2).to("rbln").state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    assert loaded["x"].device.type == "rbln" and torch.equal(loaded["x"].cpu(), x.cpu())
    assert loaded["sd"]["weight"].device.type == "rbln"
    buf.seek(0)
    assert torch.load(buf, map_location="cpu")["x"].device.type == "cpu"
    y = copy.deepcopy(x)
    assert y.device.type == "rbln" and torch.equal(y.cpu(), x.cpu())


def test_memory_accounting():
    dev = 1
    base = torch.rbln.memory_allocated(dev)
    torch.rbln.reset_peak_memory_stats(dev)
    x = torch.empty(1024, 1024, device=f"rbln:{dev}")  # 4 MiB
    assert torch.rbln.memory_allocated(dev) == base + 4 * 2**20
    y = x + 1  # a kernel result is accounted too
    assert torch.rbln.memory_allocated(dev) == base + 8 * 2**20
    free, total = torch.rbln.mem_get_info(dev)
    assert total == torch.rbln.get_device_properties(dev).total_memory and free <= total - 8 * 2**20
    del x, y
    torch.rbln.empty_cache()
    assert torch.rbln.memory_allocated(dev) == base
    assert torch.rbln.max_memory_allocated(dev) >= base + 8 * 2**20
    stats_ = torch.rbln.memory_stats(dev)
    assert stats_["allocated_bytes.all.current"] == base
    with pytest.raises(torch.OutOfMemoryError, match="out of device DRAM"):
        torch.empty(total // 2 + 1, dtype=torch.int16, device=f"rbln:{dev}")


def test_multi_device_placement():
    assert torch.rbln.device_count() == 4  # one RBLN-CA25 card
    assert torch.rbln.get_device_properties(2).die == 2
    a = torch.ones(3, device="rbln:2")
    assert (a * 2).device == torch.device("rbln", 2)
    with torch.rbln.device(3):
        assert torch.rbln.current_device() == 3
        assert torch.zeros(1, device="rbln").device.index == 3
    assert torch.rbln.current_device() == 0
    torch.rbln.set_device(1)
    assert torch.empty(2, device="rbln").device.index == 1
    b = a.to("rbln:3")
    assert b.device.index == 3 and torch.equal(b.cpu(), a.cpu())
    with pytest.raises(RuntimeError, match="same device"):
        a + b
    c = torch.ones(2, device="rbln:1", requires_grad=True)
    (c * 3).sum().backward()
    assert c.grad.device.index == 1
    with pytest.raises(Exception, match="does not exist"):
        torch.rbln.set_device(4)
    torch.rbln.synchronize()


def test_fallback_logged_once_and_disabled(monkeypatch, caplog):
    x = torch.rand(8, device="rbln")
    with caplog.at_level(logging.WARNING, logger="torch_rbln"):
        y = torch.atan(x)
        torch.atan(x)
    assert y.device.type == "rbln"
    torch.testing.assert_close(y.cpu(), torch.atan(x.cpu()), atol=ATOL, rtol=RTOL)
    assert sum("aten.atan" in r.message for r in caplog.records) == 1
    assert sum(n for k, n in stats.current().fallbacks.items() if k.startswith("aten.atan.")) == 2
    monkeypatch.setenv("TORCH_RBLN_DISABLE_FALLBACK", "1")
    with pytest.raises(_dispatch.FallbackError, match="atan"):
        torch.atan(x)
    repr(x)  # printing is host-side work and still allowed
    assert torch.equal((x + 1).cpu(), (x.cpu() + 1).half().float())  # device ops still run


def test_explain_reports_fallbacks_compiles_copies_and_time():
    torch.rbln.reset()
    x = torch.randn(16, 16).to("rbln")
    for _ in range(3):
        y = torch.mm(x, x) + 1
    torch.atan(y).cpu()
    text = torch.rbln.explain()
    rec = stats.current()
    assert rec.device_ops["aten.mm.out"] + rec.device_ops.get("aten.mm.default", 0) == 3
    assert sum(rec.kernel_compiles.values()) < sum(rec.device_ops.values())  # kernels are cached
    assert rec.copies_to_device >= 2 and rec.copies_to_host >= 2  # upload, .cpu(), fallback
    assert rec.device_time_s > 0
    assert "aten.atan" in text and "predicted device time" in text and "host<->device copies" in text


def test_profiler_trace_has_eager_and_compiled_work(tmp_path):
    from rebel.profiler import read_trace
    model = torch.nn.Linear(8, 8).eval()
    compiled = torch.compile(model, backend="rbln")
    path = tmp_path / "eager.pb"
    with torch.no_grad(), torch.rbln.profile(path) as prof:
        x = torch.randn(4, 8).to("rbln")
        y = torch.relu(x) * 2
        torch.atan(y)
        compiled(torch.randn(4, 8))
    slices = read_trace(prof.path)
    tracks = {s.track for s in slices}
    assert {"Host", "Neural Engine Clusters", "External HDMA"} <= tracks
    names = {s.name for s in slices}
    assert "relu" in names and "atan" in names
    assert any(s.args.get("graph") for s in slices)  # the compiled graph's runtime events
    assert any(s.flow_ids for s in slices) and any(s.terminating_flow_ids for s in slices)


def test_autoload_respects_env_switch():
    code = ("import torch; print(hasattr(torch, 'rbln')); import torch_rbln; "
            "print(torch.ones(1, device='rbln').device)")
    env = {"TORCH_DEVICE_BACKEND_AUTOLOAD": "0", "PATH": "/usr/bin:/bin"}
    import os
    env.update({k: v for k, v in os.environ.items() if k in ("PYTHONPATH", "HOME", "TORCH_EXTENSIONS_DIR")})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "rbln:0"]
    env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "1"
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.ones(1, device='rbln').device)"],
                         capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "rbln:0"


@pytest.mark.parametrize("fmt", [torch.float16, torch.bfloat16])
def test_shim_rounding_matches_aten_conversion(fmt):
    torch.manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (10_003,), dtype=torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 65504, 65520,
                            5.96e-8, 2.98e-8, -1e-7, 3e38])
    x = torch.cat([torch.randn(4099) * 1e-6, torch.randn(4099) * 7e4, bits, special])
    for t in (x, x[:7], x[::3]):
        ref = t.to(fmt).float()
        got = t.clone()
        _dispatch._shim.round_(got, fmt is torch.bfloat16)
        nan = ref.isnan()  # NaN payloads differ between ATen's own scalar and vector paths
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int32), ref[~nan].view(torch.int32))


def test_direct_hot_ops_match_cpu_and_are_counted():
    torch.manual_seed(0)
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    da, db = a.to("rbln"), b.to("rbln")
    a16, b16 = a.half().float(), b.half().float()
    stats.reset()
    for fn in (lambda x, y: x + y, lambda x, y: x * y, lambda x, y: x @ y, lambda x, y: x.relu().sum(0),
               lambda x, y: torch.addmm(y, x, y), lambda x, y: torch.where(x > 0, x, y)):
        assert torch.equal(fn(da, db).cpu(), fn(a16, b16).half().float())
    out = da.clone().add_(db, alpha=2)
    assert torch.equal(out.cpu(), a16.add(b16, alpha=2).half().float())
    ops = stats.current().device_ops
    assert ops["aten.add.Tensor"] == 1 and ops["aten.mm.default"] == 1 and ops["aten.add_.Tensor"] == 1
    assert stats.current().device_time_s > 0


def test_eager_tensors_and_runtimes_share_device_dram():
    import rebel
    from rebel.device.memory import device_memory

    memory = device_memory(3)
    free_before = torch.rbln.mem_get_info(3)[0]
    big = torch.empty(256, 1024, 1024, device="rbln:3")  # 1 GiB of eager tensors
    assert memory.free_bytes == memory.capacity - memory.used - 2**30
    runtime = rebel.Runtime(rebel.compile_from_torch(torch.nn.Linear(1024, 1024),
                                                     example_inputs=[torch.randn(4, 1024)]), device=3)
    assert torch.rbln.mem_get_info(3)[0] == free_before - 2**30 - runtime.dram_bytes
    # the eager allocator's limit now leaves out what the runtime holds
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(memory.capacity - 2**30 - runtime.dram_bytes + 2**20, dtype=torch.uint8,
                    device="rbln:3")
    runtime.close()
    del big
    assert torch.rbln.mem_get_info(3)[0] == free_before
