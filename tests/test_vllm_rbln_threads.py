"""vllm_rbln's thread policy: vLLM's own start-up OMP_NUM_THREADS is dropped after loading so
the runtime picks each device run's count from the free cores; a user's OMP_NUM_THREADS stays."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vllm_rbln needs vLLM: pip install 'open-rbln[vllm]'")

from vllm.utils.torch_utils import OMP_NUM_THREADS_SET_BY_VLLM  # noqa: E402

from rebel.runtime import threads as run_policy  # noqa: E402
from vllm_rbln import threads  # noqa: E402


@pytest.fixture
def torch_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def test_vllm_startup_count_dropped_runtime_picks_free_cores(monkeypatch, torch_threads):
    monkeypatch.delenv(run_policy.THREADS_ENV, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(OMP_NUM_THREADS_SET_BY_VLLM, "1")
    monkeypatch.setattr(run_policy, "usable_cores", lambda: 2)
    monkeypatch.setattr(run_policy, "busy_elsewhere", lambda: 0)
    monkeypatch.setattr(run_policy, "_free", (float("-inf"), 0))
    assert run_policy.run_threads() is None  # before: vLLM's value read as the user's
    threads.set_serving_threads()
    import os
    assert "OMP_NUM_THREADS" not in os.environ and OMP_NUM_THREADS_SET_BY_VLLM not in os.environ
    assert torch.get_num_threads() == 1          # vLLM's own ops between runs
    assert run_policy.run_threads() == 2         # a device run on an idle 2-core host


def test_user_count_stays(monkeypatch, torch_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv(OMP_NUM_THREADS_SET_BY_VLLM, raising=False)
    torch.set_num_threads(2)
    threads.set_serving_threads()
    threads.set_fixed_serving_threads(2)
    import os
    assert os.environ["OMP_NUM_THREADS"] == "2" and torch.get_num_threads() == 2
    assert run_policy.run_threads() is None


def test_fixed_policy_keeps_vllm_value(monkeypatch, torch_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(OMP_NUM_THREADS_SET_BY_VLLM, "1")
    monkeypatch.setattr("vllm.utils.torch_utils.available_cpu_count", lambda: 5)
    threads.set_fixed_serving_threads(2)
    import os
    assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "1"
