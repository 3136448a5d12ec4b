"""`torchvision.transforms`: only `functional.resize` and `InterpolationMode` (see the package)."""
from . import functional  # noqa: F401
from .functional import InterpolationMode  # noqa: F401
