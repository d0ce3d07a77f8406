"""The synthetic multi-reference world: procedural tasks with exact answers, rewards and benchmark.

    sample_task(seed, kind, num_refs, size=64, split="train") -> Task(images, prompt, target, spec)
    SyntheticEditDataset(split, ...)    deterministic torch Dataset (+ collate_samples for DataLoader)
    score(task, image) -> dict          integration, consistency, quality, overall in [0, 1]
    score_batch(tasks, images) -> (N, 3) float32 tensor of the three rewards; combine() -> overall
    SUITES, suite_tasks(name), evaluate(...)   the fixed held-out benchmark behind `uniref eval`
"""

from uniref.synthetic.bench import BASELINES, SUITES, evaluate, suite_tasks
from uniref.synthetic.rewards import REWARD_NAMES, combine, score, score_batch
from uniref.synthetic.tasks import (
    EDIT_KINDS,
    FAMILIES,
    KINDS,
    SPLITS,
    SyntheticEditDataset,
    Task,
    TaskSpec,
    collate_samples,
    sample_task,
    split_combinations,
    split_of,
)

__all__ = [
    "BASELINES",
    "EDIT_KINDS",
    "FAMILIES",
    "KINDS",
    "REWARD_NAMES",
    "SPLITS",
    "SUITES",
    "SyntheticEditDataset",
    "Task",
    "TaskSpec",
    "collate_samples",
    "combine",
    "evaluate",
    "sample_task",
    "score",
    "score_batch",
    "split_combinations",
    "split_of",
    "suite_tasks",
]
