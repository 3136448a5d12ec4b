"""A stand-in for the one piece of torchvision the vendor's Cosmos classes import.

The vendor's `transformer_cosmos.py` (and `controlnet_cosmos.py`) run `from torchvision import
transforms` at import time and call `transforms.functional.resize(mask, size, NEAREST)` on the
padding mask. The vendor environment has no torchvision: PyPI's builds do not import beside the
pinned CPU torch (`operator torchvision::nms does not exist`), see
packaging/vendor-compat/requirements.txt. cosmos_support.import_vendor_cosmos() loads this
package under the name `torchvision` only while those two vendor modules are imported, then takes
it out of sys.modules again: were it importable, transformers' availability probe (`find_spec`)
would take it for the real one. A real torchvision, where installed, is used instead.

Only tensor resizing exists here, computed as torchvision computes it for tensors (one
`torch.nn.functional.interpolate` call); anything else raises a clear error.
"""
__version__ = "0.0+open-rbln-shim"

from . import transforms  # noqa: E402,F401
