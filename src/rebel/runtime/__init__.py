"""Load compiled models onto virtual devices, run them, report what they did."""
from .compiled_model import RBLNCompiledModel
from .report import KernelRecord, RunReport
from .runtime import AsyncRuntime, Runtime

__all__ = ["AsyncRuntime", "KernelRecord", "RBLNCompiledModel", "RunReport", "Runtime"]
