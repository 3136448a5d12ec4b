"""The seed's models, written as the seed writes them, shared by the tests that use them."""
from __future__ import annotations

import torch


class Foo(torch.nn.Module):
    """Linear -> torch.atan (no device kernel: host fallback) -> Linear: three segments."""

    def __init__(self):
        super().__init__()
        self.linear1 = torch.nn.Linear(16, 16)
        self.linear2 = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.linear2(torch.atan(self.linear1(x)))
