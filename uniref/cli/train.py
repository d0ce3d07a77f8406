"""`uniref train`: the training job of ``training/run.py``, with the same arguments.

The arguments are defined once, by `uniref.training.cli` (``training/run.py``'s parser); this command
registers a copy of that parser's arguments for ``uniref --help`` and argument errors, then hands the
command line, unchanged, to `uniref.training.cli.main`.
"""

from __future__ import annotations

import argparse


def run_train(args: argparse.Namespace) -> int:
    """Runs the training job; returns its exit status."""
    from uniref.training.cli import main

    return main(args.argv)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``train`` to ``subparsers``, with the arguments of ``training/run.py``."""
    from uniref.training.cli import _parser

    parent = _parser()
    p = subparsers.add_parser(
        "train",
        parents=[parent],
        add_help=False,
        help="SFT or MSGRPO training (same arguments as training/run.py)",
        description=parent.description.replace("python training/run.py", "uniref train"),
        formatter_class=parent.formatter_class,
    )
    p.set_defaults(func=run_train)
    return p
