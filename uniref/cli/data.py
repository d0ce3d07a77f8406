"""`uniref data check`: read every row of a dataset and print what training will see and every bad row."""

from __future__ import annotations

import argparse
import json
import sys


def _keys(text: str) -> dict:
    try:
        keys = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f'--keys must be a JSON object, e.g. \'{{"prompt": "caption"}}\' ({exc.msg})')
    if not isinstance(keys, dict):
        raise argparse.ArgumentTypeError("--keys must be a JSON object of field names")
    return keys


def _budget(text: str) -> int:
    try:
        value = int(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--pixel-budget {text!r} is not a number of pixels") from None
    if not 16 * 16 <= value <= 64 * 1024 * 1024:
        raise argparse.ArgumentTypeError(f"--pixel-budget {value}: must be in [256, {64 * 1024 * 1024}] pixels")
    return value


def run_check(args: argparse.Namespace) -> int:
    """Prints the report of `uniref.data.check_dataset`; 2 when the dataset cannot be opened or a row is bad."""
    from uniref.data import DatasetError, check_dataset

    try:
        report = check_dataset(
            args.spec,
            args.root,
            args.keys,
            args.pixel_budget or [1024 * 1024],
            multiple=args.multiple,
            require_target=not args.no_target,
            allow_outside_root=args.allow_outside_root,
            progress=sys.stderr.isatty(),
        )
    except DatasetError as exc:
        print(f"uniref data check: {exc}", file=sys.stderr)
        return 2
    print(report.format())
    return 2 if report.bad else 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``data`` (with ``check``) to ``subparsers``."""
    p = subparsers.add_parser("data", help="inspect a training dataset (uniref data check SPEC)")
    sub = p.add_subparsers(dest="data_command", required=True)
    check = sub.add_parser("check", help="read every row; print a summary and every bad row (exit 2 if any)")
    check.add_argument("spec", help="synthetic, diffsynth:PATH, musubi:PATH, aitoolkit:PATH or hf:PATH")
    check.add_argument("--root", help="the folder the dataset's paths are relative to")
    check.add_argument("--keys", type=_keys, default={}, help='field names as JSON, e.g. \'{"prompt": "caption"}\'')
    check.add_argument(
        "--pixel-budget",
        type=_budget,
        action="append",
        help="a reference budget to count tokens at (repeatable; default 1024^2)",
    )
    check.add_argument("--multiple", type=int, default=16, help="the model's pixels per token side (default 16)")
    check.add_argument("--no-target", action="store_true", help="rows without a target are fine (RL prompts)")
    check.add_argument("--allow-outside-root", action="store_true", help="let paths leave --root")
    check.set_defaults(func=run_check)
    return p
