"""Tensor resize with torchvision's semantics (size rule, interpolation names, antialias)."""
from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F


class InterpolationMode(Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def _output_size(height: int, width: int, size, max_size: int | None) -> tuple[int, int]:
    if isinstance(size, int) or len(size) == 1:  # the smaller edge becomes `size`
        edge = size if isinstance(size, int) else size[0]
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = edge, int(edge * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        return (new_short, new_long) if height <= width else (new_long, new_short)
    if len(size) != 2:
        raise ValueError(f"resize: size must be an int or [height, width], got {size!r}")
    return int(size[0]), int(size[1])


def resize(img, size, interpolation=InterpolationMode.BILINEAR, max_size=None, antialias=True):
    """Resize the last two dimensions of a tensor [..., H, W] to `size`."""
    if not isinstance(img, torch.Tensor):
        raise TypeError(f"this torchvision stand-in resizes tensors only, got {type(img).__name__}")
    if img.dim() < 2:
        raise ValueError(f"resize needs a tensor [..., H, W], got shape {list(img.shape)}")
    mode = InterpolationMode(interpolation) if isinstance(interpolation, str) else interpolation
    height, width = img.shape[-2:]
    out_h, out_w = _output_size(height, width, size, max_size)
    if (out_h, out_w) == (height, width):
        return img
    lead = img.shape[:-2]
    x = img.reshape(-1, 1, height, width)
    dtype = x.dtype
    if not dtype.is_floating_point:
        x = x.float()
    kwargs = {}
    if mode in (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC):
        kwargs = {"align_corners": False, "antialias": bool(antialias)}
    y = F.interpolate(x, size=(out_h, out_w), mode=mode.value, **kwargs)
    if not dtype.is_floating_point:
        y = y.round().clamp(torch.iinfo(dtype).min, torch.iinfo(dtype).max).to(dtype)
    return y.reshape(*lead, out_h, out_w)
