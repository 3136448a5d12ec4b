"""PyTorch module -> device program: capture, partition, precision, fusion, schedule."""
from .artifact import load_artifact, save_artifact
from .compile import CompiledProgram, compile_module
from .program import Kernel, Program, Segment
from .support import supported_ops

__all__ = ["CompiledProgram", "Kernel", "Program", "Segment", "compile_module", "load_artifact",
           "save_artifact", "supported_ops"]
