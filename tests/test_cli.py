"""rbln-smi: the tables and JSON people script against, and errors that are one line, not a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rebel.cli.smi import main
from rebel.npu import reset_machine
from rebel.npu.spec import GiB, MiB, SPEC_DIR

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True)
def clean_machine(monkeypatch):
    monkeypatch.delenv("RBLN_VIRTUAL_NPU", raising=False)
    monkeypatch.delenv("RBLN_VIRTUAL_CARDS", raising=False)
    reset_machine()
    yield
    reset_machine()


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [[], ["list"]])
def test_list_table(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 0 and err == ""
    assert "1 x RBLN-CA25" in out and "4 device(s)" in out
    assert "virtual devices modelled by open-rbln" in out.lower()
    for i in range(4):
        assert f"rbln:{i}" in out
    assert "rbln:4" not in out
    assert "15.72" in out and "16.00" in out and "256" in out  # usable, total GiB; GB/s
    assert "rbln-ca25.toml" in out and str(SPEC_DIR / "rbln-ca25.toml") in out


@pytest.mark.parametrize("argv", [["list", "--json"], ["--json"], ["--json", "list"]])
def test_list_json(capsys, monkeypatch, argv):
    monkeypatch.setenv("RBLN_VIRTUAL_CARDS", "2")
    reset_machine()
    code, out, _ = run(capsys, *argv)
    assert code == 0
    data = json.loads(out)
    assert data["virtual"] is True
    assert (data["product"], data["cards"], data["device_count"]) == ("RBLN-CA25", 2, 8)
    dev = data["devices"][5]
    assert (dev["device"], dev["card"], dev["die"]) == ("rbln:5", 1, 1)
    assert dev["fp16_tflops"] == 32.0 and dev["dram_bandwidth_gbps"] == 256.0
    assert dev["dram_total_bytes"] == 16 * GiB
    assert dev["dram_usable_bytes"] == 16 * GiB - 288 * MiB
    assert dev["spec_file"] == str(SPEC_DIR / "rbln-ca25.toml")


def test_list_ca12(capsys, monkeypatch):
    monkeypatch.setenv("RBLN_VIRTUAL_NPU", "rbln-ca12")
    reset_machine()
    code, out, _ = run(capsys, "list", "--json")
    assert code == 0 and json.loads(out)["device_count"] == 1


def test_spec_table_defaults_to_current_machine(capsys):
    code, out, _ = run(capsys, "spec")
    assert code == 0
    assert "RBLN-CA25" in out and str(SPEC_DIR / "rbln-ca25.toml") in out
    for needle in ("[die.compute]", "[die.memory]", "[links.die_to_die]", "[published_totals]",
                   "local_sram_mib", "MiB", "TFLOPS", "GB/s", "350", "64 x 64"):
        assert needle in out, needle


def test_spec_table_named(capsys):
    code, out, _ = run(capsys, "spec", "RBLN-CA12")
    assert code == 0
    assert str(SPEC_DIR / "rbln-ca12.toml") in out
    assert "[published_totals]" not in out  # CA12 publishes none


def test_spec_json(capsys):
    code, out, _ = run(capsys, "spec", "rbln-ca25", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["name"] == "RBLN-CA25" and data["dies"] == 4 and data["power_w"] == 350.0
    assert data["die"]["compute"]["neural_engines"] == 8
    assert data["die"]["compute"]["fp16_tflops"] == 32.0
    assert data["die"]["memory"]["dram_reserved_mib"] == 288.0
    assert data["published_totals"]["fp16_tflops"] == 128.0
    assert data["source"] == str(SPEC_DIR / "rbln-ca25.toml")


def test_spec_from_path(capsys, tmp_path):
    path = tmp_path / "lab.toml"
    path.write_text('base = "RBLN-CA12"\nname = "LAB [x]"\n')  # brackets must not be markup
    code, out, _ = run(capsys, "spec", str(path))
    assert code == 0 and "LAB [x]" in out and "lab.toml" in out


def test_products(capsys):
    code, out, _ = run(capsys, "products")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(lines) == {"NVIDIA-H100-SXM", "RBLN-CA12", "RBLN-CA25"}
    assert "one ATOM die" in lines["RBLN-CA12"]
    assert "ATOM-Max" in lines["RBLN-CA25"] and "4 x ATOM" in lines["RBLN-CA25"]


def test_entry_point_subprocess():
    env = {**os.environ, "PYTHONPATH": str(SRC), "RBLN_VIRTUAL_CARDS": "2"}
    env.pop("RBLN_VIRTUAL_NPU", None)
    proc = subprocess.run([sys.executable, "-m", "rebel.cli.smi", "list"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "2 x RBLN-CA25" in proc.stdout and "rbln:7" in proc.stdout and proc.stderr == ""


# ---- errors: exit 2, one line on stderr ----------------------------------------------------------

def assert_error(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("rbln-smi: error: ") and needle in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("var, value, needle", [
    ("RBLN_VIRTUAL_CARDS", "many", "RBLN_VIRTUAL_CARDS must be an integer"),
    ("RBLN_VIRTUAL_CARDS", "0", "between 1 and 8"),
    ("RBLN_VIRTUAL_NPU", "RBLN-NOPE", "unknown NPU product 'RBLN-NOPE'"),
])
def test_bad_environment(capsys, monkeypatch, var, value, needle):
    monkeypatch.setenv(var, value)
    reset_machine()
    assert_error(capsys, ["list"], needle)
    assert_error(capsys, ["spec"], needle)


def test_unknown_product(capsys):
    assert_error(capsys, ["spec", "RBLN-NOPE"], "unknown NPU product")


def test_missing_spec_file(capsys, tmp_path):
    assert_error(capsys, ["spec", str(tmp_path / "gone.toml")], "does not exist")


def test_malformed_spec(capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('base = "RBLN-CA12"\n[die.memory]\ndram_gib = -1\n')
    assert_error(capsys, ["spec", str(path), "--json"], "must be positive")


def test_trace_missing_file(capsys, tmp_path):
    assert_error(capsys, ["trace", str(tmp_path / "none.pb")], "does not exist")


def test_usage_error_returns_2(capsys):
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err


def test_help_returns_0(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "spec" in out and "products" in out and "trace" in out


def test_trace_not_a_trace(capsys, tmp_path):
    path = tmp_path / "junk.pb"
    path.write_bytes(b"\xff\xff\xff not protobuf")
    assert_error(capsys, ["trace", str(path)], "not a Perfetto")


def test_trace_summary(capsys, tmp_path):
    from rebel.device.events import HOST, NEURAL_ENGINE, TASK_DMA, Event
    from rebel.profiler import write_trace

    events = [
        Event(HOST, None, "launch", 0.0, 8e-6, category="launch"),
        Event(TASK_DMA, 0, "load weight", 8e-6, 4e-6, category="dma_in", args={"bytes": 4096}),
        Event(NEURAL_ENGINE, 0, "0_input_1", 12e-6, 2e-6, category="kernel"),
        Event(NEURAL_ENGINE, 0, "1_linear_relu", 14e-6, 10e-6, category="kernel"),
        Event(HOST, None, "atan", 24e-6, 30e-6, category="fallback"),
    ]
    path = write_trace(tmp_path / "run.pb", events, {0: "rbln:0"})
    code, out, err = run(capsys, "trace", str(path))
    assert code == 0 and err == ""
    assert "Trace summary" in out and NEURAL_ENGINE in out
    assert "linear_relu" in out and "atan" in out and "4096" in out


def test_explain_subcommand(capsys, tmp_path):
    import json

    import torch

    import rebel

    class Foo(torch.nn.Module):
        def forward(self, x):
            return torch.atan(x) + 1

    path = rebel.compile_from_torch(Foo(), example_inputs=[torch.randn(4)]).save(tmp_path / "m.rbln")
    code, out, _ = run(capsys, "explain", str(path))
    assert code == 0 and "atan" in out
    code, out, _ = run(capsys, "explain", str(path), "--json")
    assert code == 0 and json.loads(out)
    code, _, err = run(capsys, "explain", str(tmp_path / "missing.rbln"))
    assert code == 2 and "no compiled model" in err
