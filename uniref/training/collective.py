"""The few collectives the training loop needs: agreeing on failure, and averaging logged numbers."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_finite", "global_mean"]


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` is finite on every rank. All ranks call it, so all stop together (a rank that raised
    alone would leave the others waiting in the next collective)."""
    flag = torch.tensor([0.0 if bool(torch.isfinite(t).all()) else 1.0])
    if _world() > 1:
        dist.all_reduce(flag)
    return float(flag) == 0.0


def global_mean(values: dict[str, Tensor]) -> dict[str, float]:
    """Each value averaged over the ranks (as floats)."""
    keys = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64) for k in keys])
    if _world() > 1:
        dist.all_reduce(t)
        t /= _world()
    return {k: float(v) for k, v in zip(keys, t)}
