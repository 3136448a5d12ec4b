"""Register the eager "rbln" device: PrivateUse1 renamed, the C++ shim, kernels, torch.rbln.

setup() is idempotent and is what both the torch.backends autoload entry point and
`import torch_rbln` run. The device count and DRAM size come from the virtual machine
(rebel.npu.current_machine: 4 devices per RBLN-CA25 card).
"""
from __future__ import annotations

import sys
import threading

import torch

from rebel.device.memory import Tenant, add_tenant

_lock = threading.Lock()
_done = False
_error: Exception | None = None


def setup() -> None:
    global _done, _error
    with _lock:
        if _done:
            return
        if _error is not None:
            raise RuntimeError(f"the torch_rbln device failed to register earlier: {_error}") from _error
        try:
            _setup()
        except Exception as e:
            _error = e
            raise
        _done = True


_dynamo_registered = False


class _EagerTensors(Tenant):
    """Eager tensors and compiled runtimes share each device's DRAM: runtimes see the eager
    bytes, and the eager allocator's limit shrinks by what runtimes hold."""

    def __init__(self, shim, usable: dict[int, int]):
        self.shim = shim
        self.usable = usable

    def used(self, index: int) -> int:
        return self.shim.stats(index)[0] if index in self.usable else 0

    def runtimes_changed(self, index: int, runtime_bytes: int) -> None:
        if index in self.usable:  # 0 would mean unlimited to the shim
            self.shim.set_capacity(index, max(1, self.usable[index] - runtime_bytes))


def _setup() -> None:
    name = torch._C._get_privateuse1_backend_name()
    if name not in ("privateuseone", "rbln"):
        raise RuntimeError(f"PrivateUse1 is already taken by the {name!r} backend; torch_rbln needs it")
    from rebel.npu import current_machine

    from . import _dispatch, _shim, rbln_module

    shim = _shim.load()
    machine = current_machine()
    shim.configure(len(machine.devices))
    for info in machine.devices:
        shim.set_capacity(info.index, info.spec.die.memory.dram_usable_bytes)
    add_tenant(_EagerTensors(shim, {i.index: i.spec.die.memory.dram_usable_bytes for i in machine.devices}))
    if name != "rbln":
        torch.utils.rename_privateuse1_backend("rbln")
    torch._register_device_module("rbln", rbln_module)
    torch.utils.generate_methods_for_privateuse1_backend(for_storage=True)
    rbln_module._init(shim)
    _dispatch.register(shim)
    if "torch._dynamo" in sys.modules:  # else the backend registers it when torch.compile is used:
        _register_dynamo_interface()    # importing Dynamo here would double `import torch` time
    from . import profiler
    profiler.start_from_env()


def _register_dynamo_interface() -> None:
    """Let Dynamo trace code that touches rbln tensors and torch.rbln (device, streams)."""
    global _dynamo_registered
    if _dynamo_registered or torch._C._get_privateuse1_backend_name() != "rbln":
        return
    _dynamo_registered = True
    try:
        from torch._dynamo.device_interface import DeviceInterface, register_interface_for_device
    except ImportError:
        return
    from . import rbln_module

    class RBLNInterface(DeviceInterface):
        device = rbln_module.device  # type: ignore[assignment]

        @staticmethod
        def current_device():
            return rbln_module.current_device()

        @staticmethod
        def set_device(device):
            rbln_module.set_device(device)

        @staticmethod
        def device_count():
            return rbln_module.device_count()

        @staticmethod
        def is_available() -> bool:
            return True

        @staticmethod
        def synchronize(device=None):
            rbln_module.synchronize(device)

        @staticmethod
        def get_compute_capability(device=None):
            return 0

    register_interface_for_device("rbln", RBLNInterface)
