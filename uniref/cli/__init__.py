"""The `uniref` command line: `uniref edit`, `uniref eval` (synthetic benchmark), `uniref plan` (SELF demo),
`uniref info` and `uniref train`.

Each command is one module of this package that defines ``add_parser(subparsers)``: it adds its
subparser and sets ``func`` (``args -> exit status``) as the handler. Modules are found by name, so a new
command is one new file. A command module imports only what building its parser needs (argparse,
torch at most); heavy packages (diffusers, transformers, deepspeed) are imported inside the handler, so
``uniref --help``, ``uniref plan`` and every argument error answer without them.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

__all__ = ["build_parser", "command_names", "main"]


def command_names() -> list[str]:
    """The subcommands, one per public module of this package, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    """The ``uniref`` parser with every command of `command_names` registered."""
    parser = argparse.ArgumentParser(prog="uniref", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in command_names():
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``uniref ARGV...``; returns the exit status (2 with one line on stderr for a bad request)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # what followed the command name, for commands that hand it on (train)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"uniref {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
