"""Reward sources for multi-source RL, selectable by name.

    source = uniref.rewards.load("vlm_judge", base_url="http://127.0.0.1:8000/v1", model="Qwen2.5-VL-72B")
    rewards = source(records, images)          # (N, len(source.names)) float32

Every source has ``.names`` (its axes) and ``__call__(records, images) -> Tensor (N, S)``, ``images`` float
``(N, 3, H, W)`` in [0, 1] and ``records`` objects with ``.prompt`` and ``.references`` (see
`uniref.rewards.records`).

========================  =======================================================================
name                      axes
========================  =======================================================================
``vlm_judge``             instruction, consistency_mean, consistency_min, quality (a served judge)
``vlm_judge_local``       the same, from a transformers model in this process
``similarity``            similarity_mean, similarity_min (image embeddings vs each reference)
``synthetic``             integration, consistency, quality (the synthetic world's exact score)
========================  =======================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from uniref.rewards.groups import filter_groups
from uniref.rewards.judge import JudgeError, VLMJudge
from uniref.rewards.prompts import JudgeReplyError
from uniref.rewards.records import Record, as_record

__all__ = [
    "JudgeError",
    "JudgeReplyError",
    "MultiSource",
    "Record",
    "SyntheticReward",
    "as_record",
    "available",
    "filter_groups",
    "load",
]


class SyntheticReward:
    """The synthetic world's exact reward (`uniref.synthetic.score_batch`) as a reward source; records must
    be the world's `Task`s (they carry the exact answer)."""

    def __init__(self):
        from uniref.synthetic.rewards import REWARD_NAMES

        self.names = REWARD_NAMES

    def __call__(self, records: Sequence, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3)`` float32 in [0, 1] for N tasks and float ``(N, 3, H, W)`` outputs in [0, 1]."""
        from uniref.synthetic.rewards import score_batch

        return score_batch(list(records), images)


def _vlm_judge_local(**args):
    from uniref.rewards.local import LocalVLMJudge

    return LocalVLMJudge(**args)


def _similarity(**args):
    from uniref.rewards.similarity import SimilarityReward

    return SimilarityReward(**args)


_REGISTRY = {
    "vlm_judge": VLMJudge,
    "vlm_judge_local": _vlm_judge_local,
    "similarity": _similarity,
    "synthetic": SyntheticReward,
}


class MultiSource:
    """Several sources as one: their axes side by side, named ``<source>/<axis>``, each with a weight.

    Args:
        specs: ``[{"name": str, "weight": float or list of floats (one per axis), "args": dict}, ...]``, the
            shape of ``msgrpo.rewards``; a single weight applies to every axis of its source.
    """

    def __init__(self, specs: Sequence[dict]):
        if not specs:
            raise ValueError("rewards: give at least one source, e.g. [{'name': 'synthetic'}]")
        self.sources, names, weights = [], [], []
        for i, spec in enumerate(specs):
            unknown = set(spec) - {"name", "weight", "args"}
            if "name" not in spec or unknown:
                raise ValueError(f"rewards[{i}] must be {{name, weight, args}}, got keys {sorted(spec)}")
            src = load(spec["name"], **(spec.get("args") or {}))
            w = spec.get("weight", 1.0)
            w = [float(w)] * len(src.names) if isinstance(w, (int, float)) else [float(x) for x in w]
            if len(w) != len(src.names):
                raise ValueError(f"rewards[{i}] ({spec['name']}) has {len(w)} weights for its axes {src.names}")
            self.sources.append(src)
            names += [f"{spec['name']}/{n}" for n in src.names]
            weights += w
        self.names, self.weights = tuple(names), weights

    def __call__(self, records: Sequence, images: torch.Tensor) -> torch.Tensor:
        """float32 ``(N, len(self.names))``: every source's columns, in order."""
        return torch.cat([torch.as_tensor(src(records, images), dtype=torch.float32) for src in self.sources], dim=1)


def available() -> tuple[str, ...]:
    """The registered source names."""
    return tuple(_REGISTRY)


def load(name: str, **args):
    """The reward source registered as `name`, built with `args` (see each source's class for its arguments)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward source {name!r}; choose one of {list(_REGISTRY)}")
    return _REGISTRY[name](**args)
