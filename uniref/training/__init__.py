"""Training: SFT with progressive pixel budgets and MSGRPO, on DeepSpeed (``training/run.py``).

    config.py      TrainConfig, load_config (validated YAML + key=value overrides)
    data.py        the synthetic stream, planned under a pixel budget, packed by a token budget
    sft.py         the flow-matching loss on packed batches
    msgrpo.py      rollouts with log-probs, multi-source rewards and advantages, the clipped loss
    checkpoint.py  atomic checkpoints and exact resume
    trainer.py     DeepSpeed setup and the loop
"""

from uniref.training.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config", "main"]


def main(argv: list[str] | None = None) -> int:
    from uniref.training.cli import main as _main

    return _main(argv)
