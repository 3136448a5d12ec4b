"""The plain rebel API the vendor's optimum-rbln calls (see /work/shared/notes/rebel-compiler-api.md):
`rebel.compile`'s signature, `compile_from_torch(input_info=, num_devices=)`, loading an artifact
with `RBLNCompiledModel(path)`, `Runtime(device=None, timeout=)`, keyword inputs, `out=` buffers,
`forward`, flat results, and `get_npu_name` for a missing device. Numbers are checked against the
FP32 module at 16-bit tolerances."""
from __future__ import annotations

import inspect
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import rebel

ATOL = RTOL = 1e-2  # FP16 device arithmetic through two small layers


class EmbedMLP(torch.nn.Module):
    """Token ids plus a float input, two outputs in a dict: exercises int input_info dtypes, input
    binding by name, and the flat-list return convention (the module returns a pytree)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, input_ids, hidden):
        h = self.embed(input_ids) + hidden
        return {"logits": self.proj(h), "doubled": h * 2}


INFO = [("input_ids", [1, 4], "int64"), ("hidden", [1, 4, 8], "float32")]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return EmbedMLP().eval()


@pytest.fixture
def compiled(model):
    return rebel.compile_from_torch(model, input_info=INFO)


def sample():
    torch.manual_seed(1)
    return torch.randint(0, 16, (1, 4)), torch.randn(1, 4, 8)


def check(result, reference):
    torch.testing.assert_close(result, reference.detach(), atol=ATOL, rtol=RTOL)


def test_compile_signature_has_num_devices():
    """optimum-rbln reads only this signature to choose `num_devices=` over `tensor_parallel_size=`."""
    assert "num_devices" in inspect.signature(rebel.compile).parameters


def test_input_info_names_and_flat_results(model, compiled):
    runtime = rebel.Runtime(compiled, tensor_type="pt", device=None, timeout=10)
    assert runtime._index_to_input_name == {0: "input_ids", 1: "hidden"}
    ids, hidden = sample()
    reference = model(ids, hidden)
    for result in (runtime(ids, hidden), runtime.forward(ids, hidden=hidden),
                   runtime(input_ids=ids, hidden=hidden), runtime.run(hidden=hidden, input_ids=ids)):
        assert isinstance(result, list) and len(result) == 2  # flat, not the module's dict
        check(result[0], reference["logits"])
        check(result[1], reference["doubled"])


def test_single_output_is_a_tensor():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4).eval()
    compiled = rebel.compile_from_torch(linear, input_info=[("x", (2, 8), "float32")])
    x = torch.randn(2, 8)
    result = rebel.Runtime(compiled)(x=x)
    assert isinstance(result, torch.Tensor)
    check(result, linear(x))


def test_example_inputs_form_keeps_its_pytree(model):
    """Without input_info the runtime returns the module's own structure, as before."""
    ids, hidden = sample()
    compiled = rebel.compile_from_torch(model, example_inputs=[ids, hidden])
    result = rebel.Runtime(compiled)(ids, hidden)
    assert isinstance(result, dict) and set(result) == {"logits", "doubled"}
    check(result["logits"], model(ids, hidden)["logits"])


def test_input_info_with_example_inputs_and_buckets(model):
    """input_info as a list of buckets; example_inputs given beside it are used for the capture."""
    info = [[("input_ids", [1, 4], "int64"), ("hidden", [1, 4, 8], "float32")],
            [("input_ids", [1, 2], "int64"), ("hidden", [1, 2, 8], "float32")]]
    compiled = rebel.compile_from_torch(model, input_info=info)
    assert len(compiled.buckets) == 2
    runtime = rebel.Runtime(compiled)
    for ids, hidden in (sample(), (torch.tensor([[3, 5]]), torch.randn(1, 2, 8))):
        logits, doubled = runtime(input_ids=ids, hidden=hidden)
        check(logits, model(ids, hidden)["logits"])
    ids, hidden = sample()
    compiled = rebel.compile_from_torch(model, input_info=info[0], example_inputs=[ids, hidden])
    assert rebel.Runtime(compiled)._index_to_input_name == {0: "input_ids", 1: "hidden"}


def test_other_input_info_dtypes():
    class Mixed(torch.nn.Module):
        def forward(self, a, b, c, d):
            return a.float() + b.float() + c.float() + d.float()

    info = [("a", [2, 3], "int32"), ("b", [2, 3], "int16"), ("c", [2, 3], "bfloat16"),
            ("d", [2, 3], "float32")]
    compiled = rebel.compile_from_torch(Mixed(), input_info=info)
    inputs = [torch.full((2, 3), 2, dtype=torch.int32), torch.full((2, 3), 3, dtype=torch.int16),
              torch.full((2, 3), 0.5, dtype=torch.bfloat16), torch.full((2, 3), 0.25)]
    check(rebel.Runtime(compiled)(*inputs), Mixed()(*inputs))


def test_out_buffers(model, compiled):
    runtime = rebel.Runtime(compiled)
    ids, hidden = sample()
    reference = model(ids, hidden)
    out = [torch.empty(1, 4, 8), torch.empty(1, 4, 8)]
    returned = runtime(ids, hidden, out=out)
    assert returned is out
    check(out[0], reference["logits"])
    check(out[1], reference["doubled"])
    with pytest.raises(rebel.InputError, match=r"out\[0\] is \[1, 4\] float32 but output 0 is \[1, 4, 8\]"):
        runtime(ids, hidden, out=[torch.empty(1, 4), torch.empty(1, 4, 8)])
    with pytest.raises(rebel.InputError, match=r"out\[1\] is \[1, 4, 8\] float16"):
        runtime(ids, hidden, out=[torch.empty(1, 4, 8), torch.empty(1, 4, 8, dtype=torch.float16)])
    with pytest.raises(rebel.InputError, match="out= has 1 tensor"):
        runtime(ids, hidden, out=torch.empty(1, 4, 8))


def test_keyword_input_errors(compiled):
    runtime = rebel.Runtime(compiled)
    ids, hidden = sample()
    with pytest.raises(rebel.InputError, match="unknown input 'mask'"):
        runtime(input_ids=ids, hidden=hidden, mask=hidden)
    with pytest.raises(rebel.InputError, match="'input_ids' was given twice"):
        runtime(ids, input_ids=ids, hidden=hidden)
    with pytest.raises(rebel.InputError, match=r"missing input\(s\) \['hidden'\]"):
        runtime(input_ids=ids)
    with pytest.raises(rebel.InputError, match=r"input 1 \(hidden\) has shape"):
        runtime(input_ids=ids, hidden=torch.randn(1, 3, 8))


def test_compile_errors(model):
    with pytest.raises(rebel.CompileError, match="disagree"):
        rebel.compile_from_torch(model, input_info=INFO, num_devices=2, tensor_parallel_size=1)
    with pytest.raises(rebel.SpecError, match="unknown NPU product 'RBLN-XX99'"):
        rebel.compile_from_torch(model, input_info=INFO, npu="RBLN-XX99")
    with pytest.raises(rebel.CompileError, match="dtype 'float64'"):
        rebel.compile_from_torch(model, input_info=[("input_ids", [1, 4], "float64")])
    with pytest.raises(rebel.CompileError, match="names repeat"):
        rebel.compile_from_torch(model, input_info=[("a", [1, 4], "int64"), ("a", [1, 4, 8], "float32")])
    with pytest.raises(rebel.CompileError, match="example_inputs must be a non-empty list of tensors .or give input_info"):
        rebel.compile_from_torch(model)


def test_num_devices_is_tensor_parallel_size():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).eval()
    compiled = rebel.compile(mlp, input_info=[("x", [2, 16], "float32")], num_devices=2)
    assert compiled.program.tensor_parallel_size == 2
    runtime = rebel.Runtime(compiled, device=None)
    assert runtime.devices == (0, 1)
    x = torch.randn(2, 16)
    check(runtime(x=x), mlp(x))
    same = rebel.compile_from_torch(mlp, input_info=[("x", [2, 16], "float32")], num_devices=2,
                                    tensor_parallel_size=2)
    assert same.program.tensor_parallel_size == 2


def test_timeout_when_the_runtime_is_busy(compiled):
    """timeout bounds the wait for the runtime's lock (another thread's run holds it)."""
    runtime = rebel.Runtime(compiled, timeout=0.05)
    ids, hidden = sample()
    held = threading.Event()
    release = threading.Event()

    def hold():
        with runtime._lock:
            held.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(5)
    try:
        with pytest.raises(rebel.RBLNError, match="timeout=0.05"):
            runtime(ids, hidden)
    finally:
        release.set()
        thread.join()
    assert isinstance(runtime(ids, hidden), list)  # free again
    with pytest.raises(rebel.RBLNError, match="timeout must be"):
        rebel.Runtime(compiled, timeout=-1)


def test_get_npu_name():
    assert rebel.get_npu_name(0) == "RBLN-CA25"
    assert rebel.get_npu_name(rebel.device_count()) is None
    assert rebel.get_npu_name(-1) is None


RELOAD = """
import sys, torch, rebel
compiled = rebel.RBLNCompiledModel(sys.argv[1])
runtime = rebel.Runtime(compiled, tensor_type="pt", device=None, timeout=30)
print(runtime._index_to_input_name)
torch.manual_seed(1)
ids, hidden = torch.randint(0, 16, (1, 4)), torch.randn(1, 4, 8)
logits, doubled = runtime.forward(input_ids=ids, hidden=hidden)
torch.save(logits, sys.argv[2])
"""


def test_save_and_reload_in_a_fresh_process(model, compiled, tmp_path):
    """Names and the flat convention live in the artifact, not only in this process's objects."""
    path = compiled.save(tmp_path / "model.rbln")
    result_path = tmp_path / "logits.pt"
    src = Path(rebel.__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", RELOAD, str(path), str(result_path)],
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert "{0: 'input_ids', 1: 'hidden'}" in done.stdout
    ids, hidden = sample()
    check(torch.load(result_path), model(ids, hidden)["logits"])
