"""Compile progress for large models, on stderr (rich).

Small models compile in well under a second and print nothing. A large model (a billion
parameters, or many buckets) shows one bar per stage so a user can tell a long compile from a
hung one. `RBLN_PROGRESS=1` forces the display on, `RBLN_PROGRESS=0` off.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

import torch

LARGE_MODEL_PARAMS = 100_000_000


def wants_progress(module: torch.nn.Module, flag: bool | None) -> bool:
    if flag is not None:
        return bool(flag)
    env = os.environ.get("RBLN_PROGRESS", "").lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return sum(p.numel() for p in module.parameters()) >= LARGE_MODEL_PARAMS


class CompileProgress:
    """Stages with a known amount of work each; a no-op when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None
        self._task = None
        self.stage_seconds: dict[str, float] = {}
        self._stage = None
        self._stage_start = 0.0

    def stage(self, name: str, total: int = 1) -> None:
        self._close_stage()
        self._stage, self._stage_start = name, time.perf_counter()
        if self._progress is not None:
            self._task = self._progress.add_task(name, total=max(1, total))

    def advance(self, n: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def _close_stage(self) -> None:
        if self._stage is not None:
            elapsed = time.perf_counter() - self._stage_start
            self.stage_seconds[self._stage] = self.stage_seconds.get(self._stage, 0.0) + elapsed
            if self._progress is not None and self._task is not None:
                task = self._progress.tasks[-1]
                self._progress.update(self._task, completed=task.total)
        self._stage = None

    @contextmanager
    def running(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)
            self._progress = Progress(TextColumn("rebel compile: {task.description:<22}"),
                                      BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                      console=Console(file=sys.stderr))
            self._progress.start()
        try:
            yield self
        finally:
            self._close_stage()
            if self._progress is not None:
                self._progress.stop()
                self._progress = None
