"""Group filtering: drop prompt groups that teach nothing because every sample already scores high.

Edit-R1 (UniWorld-V2's RL recipe) drops a group whose reward std is below 0.05 and whose mean is above 0.9:
all its advantages are near zero, and the few that are not amplify judge noise.
"""

from __future__ import annotations

import torch

__all__ = ["filter_groups"]


def filter_groups(
    rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 0.05, min_mean: float = 0.9
) -> tuple[torch.Tensor, float]:
    """Which samples to keep, dropping whole groups with ``std < eps`` and ``mean > min_mean``.

    Args:
        rewards: float ``(N,)``, the combined reward of each sample (in [0, 1] for the built-in sources).
        group_ids: int ``(N,)``, equal for samples of the same prompt and references.
        eps, min_mean: the thresholds (Edit-R1's 0.05 and 0.9).

    Returns:
        ``(keep, dropped_fraction)``: bool ``(N,)`` and the fraction of groups dropped (for the metrics).
        The std is the population std (``unbiased=False``), so a group of one sample has std 0.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32).flatten()
    g = torch.as_tensor(group_ids).flatten()
    if r.shape != g.shape:
        raise ValueError(f"rewards {tuple(r.shape)} and group_ids {tuple(g.shape)} must both be (N,)")
    uniq, inv = torch.unique(g, return_inverse=True)
    n = torch.zeros(len(uniq)).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(len(uniq)).index_add_(0, inv, r) / n
    var = torch.zeros(len(uniq)).index_add_(0, inv, (r - mean[inv]) ** 2) / n
    drop = (var.sqrt() < eps) & (mean > min_mean)
    return ~drop[inv], float(drop.float().mean()) if len(uniq) else 0.0
