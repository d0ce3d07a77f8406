"""Reward functions for the MSGRPO tests (imported by training/run.py through `msgrpo.reward`)."""

import torch


def contrast(tasks, images: torch.Tensor) -> torch.Tensor:
    """Two sources a random model does not maximize and can reach through a random VAE decoder (whose
    GroupNorms erase global colour shifts but pass spatial structure): red left of centre, green above it."""
    h, w = images.shape[-2:]
    red = images[:, 0, :, : w // 2].mean((1, 2)) - images[:, 0, :, w // 2 :].mean((1, 2))
    green = images[:, 1, : h // 2].mean((1, 2)) - images[:, 1, h // 2 :].mean((1, 2))
    return torch.stack([red, green], dim=1)


contrast.names = ("red_left", "green_top")


def nan_reward(tasks, images: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(tasks), 2)
    out[-1, 0] = float("nan")
    return out


def records_seen(records, images: torch.Tensor) -> torch.Tensor:
    """1 where the reward received a dataset row (an `EditRecord` with its prompt and references), and the
    images' mean brightness: a second source that varies."""
    from uniref.data import EditRecord

    seen = torch.tensor([float(isinstance(r, EditRecord) and bool(r.prompt) and bool(r.references)) for r in records])
    return torch.stack([seen, images.mean((1, 2, 3))], dim=1)


records_seen.names = ("from_a_row", "brightness")
