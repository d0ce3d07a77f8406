"""Deterministic random streams keyed by what they are for, not by how many draws came before.

Every random choice of a training step (noise, timesteps, prompt dropout, rollout noise) comes from a
generator seeded by a hash of (run seed, purpose, step, position). A run on any number of ranks, or
resumed from any checkpoint, therefore draws the same numbers for the same sample.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["generator_for", "seed_for"]


def seed_for(*key) -> int:
    """A 63-bit seed from any printable key."""
    digest = hashlib.blake2b("|".join(map(str, key)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator_for(*key, device: str | torch.device = "cpu") -> torch.Generator:
    """A `torch.Generator` on ``device`` seeded by `seed_for` of ``key``."""
    return torch.Generator(device=device).manual_seed(seed_for(*key))
