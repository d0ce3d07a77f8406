"""``training/run.py``: the command line of a training job (under deepspeed, torchrun or python)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="training/run.py",
        description="SFT (progressive pixel budgets) or MSGRPO on DeepSpeed. Examples:\n"
        "  python training/run.py --config training/configs/tiny_sft.yaml\n"
        "  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 training/run.py --config training/configs/tiny_sft.yaml\n"
        "  deepspeed training/run.py --config training/configs/tiny_msgrpo.yaml --resume auto optim.lr=1e-4",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="a YAML config (training/configs/*.yaml)")
    p.add_argument(
        "--resume", default=None, help="auto (the newest complete checkpoint of --output) or a checkpoint folder"
    )
    p.add_argument(
        "--output",
        default=None,
        help="the run folder (overrides the config's output); a folder that holds a run needs --resume or --overwrite",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run in --output (removes what a run wrote there: checkpoints, final, logs)",
    )
    # deepspeed's launcher passes it
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4 sft.token_budget=512"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from uniref.training.config import ConfigError, load_config

    args = _parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"output={args.output}"] if args.output else [])
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from uniref.data import DatasetError
    from uniref.training.checkpoint import CheckpointError
    from uniref.training.rundir import RunFolderError
    from uniref.training.trainer import train

    try:
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, CheckpointError, RunFolderError, DatasetError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
