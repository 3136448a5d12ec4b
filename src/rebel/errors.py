"""The exceptions users catch. One base class so `except rebel.RBLNError` catches them all."""


class RBLNError(RuntimeError):
    """Base class of every error open-rbln raises on purpose."""


class SpecError(RBLNError):
    """A hardware spec file is missing, malformed or inconsistent."""


class CompileError(RBLNError):
    """A model cannot be captured or compiled."""


class ArtifactError(RBLNError):
    """A .rbln file is truncated, corrupted, foreign or of an incompatible version."""


class InputError(RBLNError, ValueError):
    """Inputs to a runtime do not match what the model was compiled for."""


class DeviceMemoryError(RBLNError, MemoryError):
    """A model or buffer does not fit in the device DRAM that is left."""


class DeviceError(RBLNError):
    """A device index or option names no device of the virtual machine."""


class PlanError(RBLNError, ValueError):
    """A model config or a capacity-planning request cannot be planned (rebel.plan)."""
