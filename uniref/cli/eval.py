"""`uniref eval`: run a model over the synthetic benchmark suites and report.

    uniref eval --model oracle copy_first blank --suite all --out eval_results
    uniref eval --model mypkg.edit:run --suite compose-2-3

For every model and suite it writes ``<out>/<model>/<suite>.json`` and ``<out>/<model>/<suite>.png``
(references | output | target), plus ``<out>/report.json`` with all means, and prints the table. Every
``<model>`` folder is a sanitized name inside ``<out>`` (never ``..``). A bad argument, a model that
cannot be loaded or one that returns something other than a PIL image is one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from uniref.synthetic.bench import BASELINES, SUITES, evaluate, format_table, write_suite_report

__all__ = ["ModelSpecError", "add_parser", "main", "resolve_model", "run_eval"]


class ModelSpecError(ValueError):
    """A --model argument that names no usable model."""


def _pipeline_model(path: str) -> Callable:
    """A saved `UniRefEditPipeline` as an eval model: one image per prompt, seed 0."""
    import torch

    if not (Path(path) / "model_index.json").is_file():
        raise ModelSpecError(
            f"--model {path}: not a loadable UniRef edit pipeline folder (no model_index.json; save one with "
            "UniRefEditPipeline.save_pretrained)"
        )
    from uniref.pipelines import PipelineLoadError, UniRefEditPipeline

    try:
        pipe = UniRefEditPipeline.from_pretrained(path)
    except PipelineLoadError as exc:  # names the folder and what is wrong
        raise ModelSpecError(f"--model: not a loadable UniRef edit pipeline folder: {exc}") from exc
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
    if module_name.startswith(".") and not module_name.endswith(".py"):
        raise ModelSpecError(
            f"--model {spec!r}: {module_name!r} is a relative module name; give an absolute one "
            "(package.module) or a .py file"
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
    except ModelSpecError:
        raise
    except Exception as exc:  # the user's module ran and failed: ImportError, SyntaxError, anything it raises
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelSpecError(f"--model {spec!r}: cannot import {module_name!r} ({detail})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ModelSpecError(f"--model {spec!r}: {module_name!r} has no callable named {attr!r}")
    return fn


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 1, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {value}")
        return value

    return parse


def _one_line_error(message: str):
    # argparse would print the usage block first; every error of this command is one line
    print(f"uniref eval: error: {message}", file=sys.stderr)
    sys.exit(2)


def add_parser(subparsers) -> argparse.ArgumentParser:
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
    p.add_argument(
        "--limit", type=_positive_int("--limit"), default=None, help="score only the first N cases of each suite"
    )
    p.add_argument(
        "--grid-rows", type=_positive_int("--grid-rows"), default=16, help="cases shown in each PNG grid (default: 16)"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int("--batch-size"),
        default=1,
        help="cases per call of a callable model; > 1 calls fn(list of image lists, list of prompts)",
    )
    p.add_argument(
        "--bench",
        choices=("mico", "omnicontext", "multibanana", "gedit"),
        help="run a public benchmark from a local copy (--data) with a judge (--judge) instead of the synthetic "
        "suites; needs pip install -e '.[judge]'",
    )
    p.add_argument("--data", metavar="FOLDER", help="the benchmark's local copy (nothing is downloaded)")
    p.add_argument(
        "--judge",
        metavar="URL|local:FOLDER",
        help="an OpenAI-compatible chat-completions base URL (vLLM / SGLang serve), or local:FOLDER for an "
        "in-process transformers VLM",
    )
    p.add_argument("--judge-model", default="judge", help="the served judge's model name (default: judge)")
    p.add_argument("--judge-key-env", default=None, help="the environment variable holding the judge's API key, if any")
    p.error = _one_line_error
    p.set_defaults(func=run_eval)
    return p


def _judge(args: argparse.Namespace):
    from uniref import rewards

    if args.judge.startswith("local:"):
        return rewards.load("vlm_judge_local", path=args.judge[len("local:") :], mode="score")
    return rewards.load("vlm_judge", base_url=args.judge, model=args.judge_model, api_key_env=args.judge_key_env)


def run_bench(args: argparse.Namespace, models: list) -> int:
    """``--bench``: every model over the local benchmark copy, scored by the judge; tables printed."""
    from uniref.rewards.benchmarks import run_benchmark

    if not args.data or not args.judge:
        print("uniref eval: error: --bench needs --data FOLDER and --judge URL|local:FOLDER", file=sys.stderr)
        return 2
    judge = _judge(args)
    for spec, model in models:
        if isinstance(model, str):
            print(f"uniref eval: error: --bench runs models, not the synthetic baseline {spec!r}", file=sys.stderr)
            return 2
        folder = Path(args.out) / _dir_name(spec) / args.bench
        result = run_benchmark(
            args.bench,
            args.data,
            lambda prompt, refs: model(refs, prompt),
            judge,
            folder,
            limit=args.limit,
            grid_cases=args.grid_rows,
        )
        print((folder / "table.md").read_text())
        print(f"{spec}: judge {result['judge']['model']} at {result['judge']['endpoint']}; reports: {folder}/")
    return 0


def _dir_name(spec: str) -> str:
    # one path component inside --out: no separators, and no leading dots (".." would climb out of it)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_.") or "model"


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelSpecError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    try:
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        raise ModelSpecError(f"--out {out}: the folder is not writable ({exc.strerror or exc})") from None


def run_eval(args: argparse.Namespace) -> int:
    """Runs the ``eval`` subcommand; returns 0, 2 (one line on stderr) for a bad --model or --out or a model
    whose output is not an image, or 1 for a pipeline whose images are not finite."""
    out = Path(args.out)
    try:
        if out.exists() and not out.is_dir():  # before any model is loaded
            raise ModelSpecError(f"--out {out}: is a file; give a folder (it is created if missing)")
        models = [(spec, resolve_model(spec)) for spec in args.model]
        _check_out(out)  # before any model runs
    except ModelSpecError as exc:
        print(f"uniref eval: error: {exc}", file=sys.stderr)
        return 2
    if args.bench:
        try:
            return run_bench(args, models)
        except (ValueError, OSError, RuntimeError) as exc:  # a layout not the benchmark's; a judge that fails
            print(f"uniref eval: error: {_first_line(exc)}", file=sys.stderr)
            return 2
    suites = list(SUITES) if "all" in args.suite else list(dict.fromkeys(args.suite))
    results, summary = [], {}
    for spec, model in models:
        for suite in suites:
            try:
                r = evaluate(model, suite, args.limit, args.batch_size, name=spec)
            except (TypeError, ValueError) as exc:  # outputs that are not images, a wrong number of them
                print(f"uniref eval: error: --model {spec!r} on {suite}: {_first_line(exc)}", file=sys.stderr)
                return 2
            except FloatingPointError as exc:  # a pipeline folder whose images are not finite
                print(f"uniref eval: error: --model {spec!r} on {suite}: {_first_line(exc)}", file=sys.stderr)
                return 1
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
    (out / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(results))
    print(f"reports: {out}/")
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """``python -m uniref.cli.eval ...``: the ``uniref eval`` subcommand on its own."""
    parser = argparse.ArgumentParser(prog="uniref")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
