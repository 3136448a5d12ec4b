"""torch_rbln: PyTorch-native use of the (virtual) RBLN NPU.

    torch.compile(model, backend="rbln")      # Dynamo graphs through the RBLN compiler
    x = torch.ones(4, device="rbln")          # the eager "rbln" device (PrivateUse1)
    torch.rbln.explain()                      # fallbacks, recompiles, copies, device time

Installing the package is enough: the "rbln" Dynamo backend is an entry point
(torch_dynamo_backends) and the device is autoloaded by `import torch` through the
torch.backends entry point (TORCH_DEVICE_BACKEND_AUTOLOAD=0 turns that off; `import torch_rbln`
then registers it).
"""
from __future__ import annotations

import logging

from . import stats
from .profiler import profile

log = logging.getLogger("torch_rbln")
__version__ = "0.1.0"


def _autoload() -> None:
    """Entry point of the torch.backends group, run by `import torch`.

    An exception here would break `import torch` for every user of this environment, so a failure
    to register the device is logged and kept for the first explicit use (torch_rbln.device.setup
    raises it again with its cause).
    """
    try:
        from .device import setup
        setup()
    except Exception as e:  # noqa: BLE001 - must never break `import torch`
        log.warning("torch_rbln: the eager 'rbln' device is unavailable: %s", e)


def explain() -> str:
    from ._explain import explain as _explain
    return _explain()


def _register_on_import() -> None:
    import torch
    if getattr(torch, "rbln", None) is None:
        _autoload()


_register_on_import()

__all__ = ["explain", "profile", "stats"]
