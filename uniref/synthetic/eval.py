"""`uniref eval`: run a model over the synthetic benchmark suites and report.

    uniref eval --model oracle copy_first blank --suite all --out eval_results
    python -m uniref.synthetic.eval --model mypkg.edit:run --suite compose-2-3

For every model and suite it writes ``<out>/<model>/<suite>.json`` and ``<out>/<model>/<suite>.png``
(references | output | target), plus ``<out>/report.json`` with all means, and prints the table.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from uniref.synthetic.bench import BASELINES, SUITES, evaluate, format_table, write_suite_report

__all__ = ["ModelSpecError", "add_eval_parser", "main", "resolve_model", "run_eval"]


class ModelSpecError(ValueError):
    """A --model argument that names no usable model."""


def _pipeline_model(path: str) -> Callable:
    """A saved `UniRefEditPipeline` as an eval model: one image per prompt, seed 0."""
    import torch

    from uniref.pipelines import UniRefEditPipeline

    if not (Path(path) / "model_index.json").is_file():
        raise ModelSpecError(
            f"--model {path}: not a loadable UniRef edit pipeline folder (no model_index.json; save one with "
            "UniRefEditPipeline.save_pretrained)"
        )
    try:
        pipe = UniRefEditPipeline.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelSpecError(f"--model {path}: not a loadable UniRef edit pipeline folder ({exc})") from exc

    def edit(images, prompt, height=None, width=None):
        out = pipe(images, prompt, height=height, width=width, generator=torch.Generator().manual_seed(0))
        return out.images[0] if isinstance(prompt, str) else out.images

    edit.__name__ = Path(path).name
    return edit


def resolve_model(spec: str) -> str | Callable:
    """Turns a --model argument into a baseline name or a callable.

    Accepted: a `BASELINES` name; ``module:function`` (a dotted module on the path, or a ``.py`` file)
    naming a callable with the edit pipeline's call signature; or a directory holding a saved
    `UniRefEditPipeline` (``save_pretrained``), run with a fixed seed.
    """
    if spec in BASELINES:
        return spec
    if Path(spec).is_dir():
        return _pipeline_model(spec)
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ModelSpecError(
            f"--model {spec!r} is not a baseline ({', '.join(BASELINES)}), a module:function or a directory"
        )
    try:
        if module_name.endswith(".py"):
            location = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            if location is None or not Path(module_name).is_file():
                raise ModelSpecError(f"--model {spec!r}: no such file {module_name!r}")
            module = importlib.util.module_from_spec(location)
            location.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(f"--model {spec!r}: cannot import {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ModelSpecError(f"--model {spec!r}: {module_name!r} has no callable named {attr!r}")
    return fn


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``eval`` subcommand to an argparse subparsers object; its handler is ``args.func``
    (`run_eval`, which returns the exit status)."""
    p = subparsers.add_parser(
        "eval",
        help="score a model on the synthetic benchmark suites",
        description=(
            "Run a model over fixed held-out suites of the synthetic world; write a JSON report and a PNG "
            "grid (references | output | target) per suite and print a table of integration, "
            "consistency, quality and overall."
        ),
    )
    p.add_argument(
        "--model",
        nargs="+",
        required=True,
        metavar="MODEL",
        help=f"one or more of: a baseline ({', '.join(BASELINES)}); module:function or file.py:function, "
        "a callable fn(images, prompt, **kw) -> PIL image; a model directory (needs the edit pipeline)",
    )
    p.add_argument("--suite", nargs="+", default=["all"], choices=[*SUITES, "all"], help="suites (default: all)")
    p.add_argument("--out", default="eval_results", help="output directory (default: eval_results)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N cases of each suite")
    p.add_argument("--grid-rows", type=int, default=16, help="cases shown in each PNG grid (default: 16)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="cases per call of a callable model; > 1 calls fn(list of image lists, list of prompts)",
    )
    p.set_defaults(func=run_eval)
    return p


def _dir_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_") or "model"


def run_eval(args: argparse.Namespace) -> int:
    """Runs the ``eval`` subcommand; returns 0, or 2 (message on stderr) for a bad --model."""
    if args.limit is not None and args.limit < 1:
        print(f"uniref eval: error: --limit must be >= 1, got {args.limit}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"uniref eval: error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        models = [(spec, resolve_model(spec)) for spec in args.model]
    except ModelSpecError as exc:
        print(f"uniref eval: error: {exc}", file=sys.stderr)
        return 2
    suites = list(SUITES) if "all" in args.suite else list(dict.fromkeys(args.suite))
    out = Path(args.out)
    results, summary = [], {}
    for spec, model in models:
        for suite in suites:
            r = evaluate(model, suite, args.limit, args.batch_size, name=spec)
            js, png = write_suite_report(r, out / _dir_name(spec), args.grid_rows)
            if any(r.fixes.values()):
                print(f"note: {spec} on {suite}: outputs fixed up {r.fixes}", file=sys.stderr)
            results.append(r)
            summary.setdefault(spec, {})[suite] = {
                "cases": len(r.cases),
                **r.mean,
                "json": str(js),
                "grid": str(png),
            }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(results))
    print(f"reports: {out}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m uniref.synthetic.eval ...``: the ``uniref eval`` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="uniref")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
