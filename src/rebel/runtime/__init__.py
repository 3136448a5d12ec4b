"""Load compiled models onto virtual devices, run them, report what they did."""
from .compiled_model import RBLNCompiledModel
from .orchestrator import Orchestrator, Request, Schedule, ScheduledRun, StageRun
from .report import KernelRecord, RunReport
from .runtime import AsyncRuntime, RunRecord, Runtime

__all__ = ["AsyncRuntime", "KernelRecord", "Orchestrator", "RBLNCompiledModel", "Request", "RunRecord",
           "RunReport", "Runtime", "Schedule", "ScheduledRun", "StageRun"]
