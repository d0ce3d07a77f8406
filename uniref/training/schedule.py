"""The learning-rate schedule: linear warmup, then cosine decay to a floor, or constant."""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["Schedule", "lr_lambda"]

Schedule = Literal["cosine", "constant"]


def lr_lambda(total: int, warmup: int, schedule: Schedule, min_ratio: float):
    """LR multiplier at an optimizer step: linear warmup, then cosine to ``min_ratio`` (or constant)."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
