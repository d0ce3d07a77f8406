"""`uniref lora convert IN OUT --to diffusers|kohya|peft`: a LoRA file from one format to another."""

from __future__ import annotations

import argparse
import sys


def run_convert(args: argparse.Namespace) -> int:
    """Converts with `uniref.lora.convert_lora`; 2 with one line when the input cannot be read."""
    from uniref.lora import LoraError, convert_lora

    try:
        out = convert_lora(args.input, args.output, args.to)
    except LoraError as exc:
        print(f"uniref lora convert: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``lora`` (with ``convert``) to ``subparsers``."""
    from uniref.lora import FORMATS

    p = subparsers.add_parser("lora", help="LoRA files: convert between diffusers, PEFT and kohya/ComfyUI")
    sub = p.add_subparsers(dest="lora_command", required=True)
    convert = sub.add_parser("convert", help="convert a LoRA file (format detected from its keys)")
    convert.add_argument("input", help="a LoRA .safetensors file, or a folder holding one")
    convert.add_argument("output", help="the folder to write into")
    convert.add_argument("--to", required=True, choices=FORMATS, help="the output format")
    convert.set_defaults(func=run_convert)
    return p
