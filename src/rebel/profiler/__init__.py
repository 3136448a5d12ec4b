"""Turns a run's predicted device events into Perfetto traces and text summaries, so runs without the chip can still be profiled."""
from rebel.profiler.perfetto_trace import TraceSlice, read_trace, write_trace
from rebel.profiler.summary import summarize, summarize_file

__all__ = ["TraceSlice", "read_trace", "summarize", "summarize_file", "write_trace"]
