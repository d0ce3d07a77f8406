"""The few collectives the training loop needs: agreeing on failure, on rank 0's decisions, and averaging
logged numbers."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_finite", "broadcast_text", "global_mean"]


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


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank (the others pass anything). All ranks call it."""
    if _world() == 1:
        return text
    # nccl moves GPU tensors only
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    if dist.get_rank() != 0:
        data = torch.empty(int(size), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=0)
    return bytes(data.tolist()).decode()
