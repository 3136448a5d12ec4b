"""Which host memory a tensor lives in: pinned (page-locked) or pageable.

The External HDMA engine reads page-locked host memory directly; ordinary (pageable) memory is
staged through pinned chunks first, which is 2-3x slower for large copies (see the `pageable`
table of a spec's [host_link]). The runtime picks the path for each input from the tensor the
user passes.

`Tensor.is_pinned()` is the normal way to ask. On this CPU-only PyTorch, with the eager "rbln"
device registered as PrivateUse1, `torch.empty(..., pin_memory=True)` and `Tensor.pin_memory()`
raise (PyTorch asks the PrivateUse1 backend for a pinned allocator, which a Python extension
cannot register), so `pin(tensor)` declares a tensor pinned explicitly instead. numpy arrays are
always pageable.
"""
from __future__ import annotations

import torch

_MARK = "_rbln_pinned"


def pin(tensor: torch.Tensor) -> torch.Tensor:
    """Declare `tensor` as living in pinned host memory and return it.

    Tries the real `Tensor.pin_memory()` first; where this PyTorch build cannot pin (no
    accelerator allocator), the same tensor is marked instead, so the timing model treats its
    copies as pinned while the data stays where it is."""
    try:
        pinned = tensor.pin_memory()
        if pinned.is_pinned():
            return pinned
    except (RuntimeError, NotImplementedError):
        pass
    setattr(tensor, _MARK, True)
    return tensor


def is_pinned(value) -> bool:
    """True when a host input is in pinned memory (really pinned, or declared with `pin`)."""
    if not isinstance(value, torch.Tensor):
        return False  # numpy arrays and anything else: pageable
    if getattr(value, _MARK, False):
        return True
    try:
        return bool(value.is_pinned())
    except (RuntimeError, NotImplementedError):
        return False
