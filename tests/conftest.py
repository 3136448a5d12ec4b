"""Shared fixtures: every test starts on the default virtual machine with empty device memory.

The machine (RBLN_VIRTUAL_NPU / RBLN_VIRTUAL_CARDS) and the device DRAM accounting are
process-wide caches, and the profiler reads RBLN_PROFILER / RBLN_PROFILER_DIR; a test that
changes any of them must not leak into the next one.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from rebel.device.memory import reset_memory
from rebel.npu import reset_machine

RBLN_ENV = ("RBLN_VIRTUAL_NPU", "RBLN_VIRTUAL_CARDS", "RBLN_PROFILER", "RBLN_PROFILER_DIR")


@pytest.fixture(autouse=True)
def _rbln_clean_state(monkeypatch):
    for var in RBLN_ENV:
        monkeypatch.delenv(var, raising=False)
    reset_machine()
    reset_memory()
    yield
    reset_machine()
    reset_memory()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run the test with tmp_path as the working directory (for "compiled.rbln", rbln_traces/)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def small_dram_machine(tmp_path, monkeypatch) -> Path:
    """A one-die RBLN-CA12 machine whose DRAM is 0.3 GiB (about 19 MiB usable after the 288 MiB
    reservation). Yields the spec path; the autouse fixture restores the default machine."""
    spec = tmp_path / "small-dram.toml"
    spec.write_text('base = "RBLN-CA12"\n\n[die.memory]\ndram_gib = 0.3\n')
    monkeypatch.setenv("RBLN_VIRTUAL_NPU", str(spec))
    reset_machine()
    reset_memory()
    yield spec
    monkeypatch.delenv("RBLN_VIRTUAL_NPU", raising=False)
    reset_machine()
    reset_memory()

