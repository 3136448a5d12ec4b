"""The virtual NPU: functional kernels, timing rules, the event engine and DRAM accounting."""
from . import ops  # noqa: F401  registers rbln:: device ops with torch.library
