"""`uniref info`: what this install was built with."""

from __future__ import annotations

import argparse


def run_info(args: argparse.Namespace) -> int:
    """Prints `uniref.info()`; returns 0."""
    from uniref.info import info

    info()
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``info`` to ``subparsers``."""
    p = subparsers.add_parser("info", help="what this install was built with")
    p.set_defaults(func=run_info)
    return p
