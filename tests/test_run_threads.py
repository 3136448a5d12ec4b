"""Runs compute with `rebel.runtime.threads.run_threads()` torch threads (the usable cores no
other process is running on, or RBLN_NUM_THREADS; OMP_NUM_THREADS left alone), restore the caller's count afterwards, and give
the same results at any count."""
from __future__ import annotations

import os
import threading

import torch

import rebel
from rebel.runtime import threads


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(96, 256)
        self.b = torch.nn.Linear(256, 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).softmax(-1)


def test_policy(monkeypatch):
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    for busy, expected in ((0, 4), (1, 3), (3, 1), (9, 1), (None, 3)):
        monkeypatch.setattr(threads, "busy_elsewhere", lambda busy=busy: busy)
        monkeypatch.setattr(threads, "_free", (float("-inf"), 0))  # look again now
        assert threads.run_threads() == expected, busy
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0)
    assert threads.run_threads() == 3  # within RECHECK_S the last look (busy unknown) holds
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.run_threads() is None  # the user's choice: torch already follows it
    monkeypatch.setenv(threads.THREADS_ENV, "2")
    assert threads.run_threads() == 2


def test_busy_elsewhere_reads_this_machine():
    """On Linux: a number of other processes' runnable threads (not this test's own)."""
    busy = threads.busy_elsewhere()
    assert busy is None or busy >= 0
    if os.path.exists("/proc/loadavg"):
        assert busy is not None


def test_count_set_inside_and_restored():
    before = torch.get_num_threads()
    with threads.run_threads_set(1):
        assert torch.get_num_threads() == 1
        with threads.run_threads_set(before + 1):  # nested: the outer run's count holds
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    done = []

    def other_thread():  # each thread sets and restores its own count
        with threads.run_threads_set(1):
            done.append(torch.get_num_threads())
        done.append(torch.get_num_threads())

    with threads.run_threads_set(1):
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert done[0] == 1 and torch.get_num_threads() == before


def test_results_do_not_depend_on_thread_count(monkeypatch):
    torch.manual_seed(0)
    compiled = rebel.compile_from_torch(_Net().eval(), example_inputs=[torch.randn(64, 96)])
    runtime = rebel.Runtime(compiled, tensor_type="pt")
    x = torch.randn(64, 96)
    outputs = []
    for count in ("1", "2"):
        monkeypatch.setenv(threads.THREADS_ENV, count)
        outputs.append(runtime.run(x))
    assert torch.equal(outputs[0], outputs[1])
    before = torch.get_num_threads()
    runtime.run(x)
    assert torch.get_num_threads() == before


def test_products_mkl_splits_do_not_depend_on_the_load(monkeypatch):
    """A [64, 1536] x [1536, 576] product, which MKL sums in another order at 1 and 2 threads,
    gives the same bits whatever count the load-adaptive policy picks for the run: multi-row
    products run at the machine's fixed count (rebel.device.gemm_threads)."""
    import pytest

    from rebel.device import gemm_threads

    torch.manual_seed(0)
    x, w = torch.randn(64, 1536), torch.randn(576, 1536)
    plain = []
    saved = torch.get_num_threads()
    for count in (1, 2):
        torch.set_num_threads(count)
        plain.append(torch.nn.functional.linear(x, w))
    torch.set_num_threads(saved)
    if torch.equal(*plain) or gemm_threads._mkl_local() is None or gemm_threads.fixed_threads() is None:
        pytest.skip("this BLAS sums the product the same way at 1 and 2 threads (nothing to fix)")
    layer = torch.nn.Linear(1536, 576, bias=False)
    compiled = rebel.compile_from_torch(layer.eval(), example_inputs=[x])
    runtime = rebel.Runtime(compiled, tensor_type="pt")
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    outputs = []
    for count in (1, 2):
        monkeypatch.setattr(threads, "free_cores", lambda count=count: count)
        assert threads.run_threads() == count
        outputs.append(runtime.run(x))
    assert torch.equal(outputs[0], outputs[1])


def test_convolutions_do_not_depend_on_thread_count(monkeypatch):
    conv = torch.nn.Conv2d(320, 320, 3, padding=1).eval()
    x = torch.randn(1, 320, 8, 8)
    runtime = rebel.Runtime(rebel.compile_from_torch(conv, example_inputs=[x]), tensor_type="pt")
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    outputs = []
    for count in (1, 2):
        monkeypatch.setattr(threads, "free_cores", lambda count=count: count)
        outputs.append(runtime.run(x))
    assert torch.equal(outputs[0], outputs[1])


def test_busy_elsewhere_measures_time_not_a_snapshot(monkeypatch):
    """Over a span, a job spinning in another process counts as a busy core, and this process's
    own work does not."""
    import subprocess
    import sys
    import time

    if not os.path.exists("/proc/stat"):
        return
    monkeypatch.setattr(threads, "_times", None)
    monkeypatch.setattr(threads, "runnable_elsewhere", lambda: -1)
    assert threads.busy_elsewhere() == -1  # no span yet: the snapshot answers
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # this process busy: not counted
        pass
    assert threads.busy_elsewhere() == 0
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.6)
        threads.busy_elsewhere()  # start the span with the spinner running
        time.sleep(0.6)
        assert threads.busy_elsewhere() >= 1
    finally:
        spinner.kill()
        spinner.wait()
    monkeypatch.setattr(threads, "_times", (time.monotonic() - 10, 0, 0))
    assert threads.busy_elsewhere() == -1  # a look long ago says nothing about now
