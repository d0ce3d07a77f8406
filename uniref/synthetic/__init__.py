"""The synthetic multi-reference world: procedural tasks with exact answers, rewards and a benchmark.

Public API:
    sample_task            (seed, kind, num_refs, size=64, split="train") -> Task(images, prompt, target, spec)
    SyntheticEditDataset   deterministic torch Dataset of tasks (collate_samples for a DataLoader)
    score                  (task, image) -> {integration, consistency, quality, overall}, each in [0, 1]
    score_batch, combine   (tasks, images) -> (N, 3) float32 rewards for RL; (N, 3) -> (N,) overall
    SUITES, suite_tasks, evaluate, BASELINES   the fixed held-out benchmark behind `uniref eval`
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
