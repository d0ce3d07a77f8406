"""Training: SFT with progressive pixel budgets and MSGRPO, on DeepSpeed (``training/run.py``).

config.py      TrainConfig, load_config (validated YAML + key=value overrides)
data.py        the synthetic stream, planned under a pixel budget, packed by a token budget
sft.py         the flow-matching loss on packed batches
msgrpo.py      rollouts with log-probs, multi-source rewards and advantages, the clipped loss
vae.py         the autoencoder task's model and loss
tasks.py       one object per task (vae, sft, msgrpo): build, step, export
schedule.py    the learning-rate schedule
rundir.py      the run folder: its lock, and never clobbering another run
checkpoint.py  atomic checkpoints with a manifest, weights-only loading, exact resume
trainer.py     DeepSpeed setup and the loop
"""

from uniref.training.config import ConfigError, TrainConfig, load_config

__all__ = ["ConfigError", "TrainConfig", "load_config", "main"]


def main(argv: list[str] | None = None) -> int:
    from uniref.training.cli import main as _main

    return _main(argv)
