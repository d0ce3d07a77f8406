"""The fixed held-out benchmark of the synthetic world, its baselines and reports.

Three suites of test-split tasks (`SUITES`), mirroring MultiCom-Bench's split by number of inputs:
single-image edits, compositions with 2-3 references and with 4-6 references. A model is anything with
the edit pipeline's call signature, ``fn(images: list[PIL.Image], prompt: str, **kwargs) -> PIL.Image``
(it is passed ``height`` and ``width`` when it accepts them), or its batched form
``fn(list[list[PIL.Image]], list[str], **kwargs) -> list[PIL.Image]``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from uniref.synthetic.rewards import REWARD_NAMES, score
from uniref.synthetic.tasks import EDIT_KINDS, Task, sample_task
from uniref.synthetic.world import BLANK_COLOUR

__all__ = [
    "BASELINES",
    "SUITES",
    "SuiteResult",
    "Suite",
    "evaluate",
    "format_table",
    "paired_bootstrap",
    "suite_tasks",
    "write_grid",
    "write_suite_report",
]

SCORE_NAMES: tuple[str, ...] = REWARD_NAMES + ("overall",)


@dataclass(frozen=True)
class Suite:
    """A fixed list of test-split tasks: case i has kind ``kinds[i % len(kinds)]`` and K
    ``num_refs[(i // len(kinds)) % len(num_refs)]`` and is ``sample_task(i, kind, K, size, "test")``."""

    name: str
    description: str
    kinds: tuple[str, ...]
    num_refs: tuple[int | None, ...]
    cases: int = 100
    size: int = 64


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("edit", "single-image edits (recolor, move, remove, add, background)", EDIT_KINDS, (None,)),
        Suite("compose-2-3", "composition, 2-3 references", ("compose",), (2, 3)),
        Suite("compose-4-6", "composition, 4-6 references", ("compose",), (4, 5, 6)),
    )
}


def suite_tasks(name: str, limit: int | None = None) -> list[Task]:
    """The tasks of suite `name` (its first `limit` cases when given); always the same."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
    s = SUITES[name]
    n = s.cases if limit is None else max(0, min(int(limit), s.cases))
    out = []
    for i in range(n):
        kind = s.kinds[i % len(s.kinds)]
        k = s.num_refs[(i // len(s.kinds)) % len(s.num_refs)]
        out.append(sample_task(i, kind, k, s.size, "test"))
    return out


# --- baselines: functions of the whole task (the oracle needs the answer) ------------------------------


def _oracle(task: Task) -> Image.Image:
    return task.target.copy()


def _copy_first(task: Task) -> Image.Image:
    first = task.images[0]
    return first.copy() if first.size == task.target.size else first.resize(task.target.size, Image.BICUBIC)


def _blank(task: Task) -> Image.Image:
    return Image.new("RGB", task.target.size, BLANK_COLOUR)


def _noise(task: Task) -> Image.Image:
    w, h = task.target.size
    rng = np.random.default_rng(task.spec.seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


BASELINES: dict[str, Callable[[Task], Image.Image]] = {
    "oracle": _oracle,
    "copy_first": _copy_first,
    "blank": _blank,
    "noise": _noise,
}


# --- running a model -----------------------------------------------------------------------------------


def _size_kwargs(fn: Callable, height: int, width: int) -> dict:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {"height": height, "width": width}
    return {k: v for k, v in (("height", height), ("width", width)) if k in params}


def _as_output(image, task: Task, fixes: dict) -> Image.Image:
    """A model's output as an RGB PIL image of the target's size; conversions are counted in `fixes`."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"the model returned {type(image).__name__}, expected a PIL image")
    if image.mode != "RGB":
        image = image.convert("RGB")
        fixes["converted_to_rgb"] += 1
    if image.size != task.target.size:
        image = image.resize(task.target.size, Image.BICUBIC)
        fixes["resized"] += 1
    return image


def _run(model, tasks: list[Task], batch_size: int) -> tuple[list[Image.Image], dict]:
    fixes = {"converted_to_rgb": 0, "resized": 0}
    if isinstance(model, str):
        if model not in BASELINES:
            raise ValueError(f"unknown baseline {model!r}; baselines: {', '.join(BASELINES)}")
        return [BASELINES[model](t) for t in tasks], fixes
    if not callable(model):
        raise TypeError(f"model must be a baseline name or a callable, got {type(model).__name__}")
    outputs: list[Image.Image] = []
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start : start + batch_size]
        w, h = chunk[0].target.size
        kw = _size_kwargs(model, h, w)
        if batch_size == 1:
            got = [model(list(chunk[0].images), chunk[0].prompt, **kw)]
        else:
            got = list(model([list(t.images) for t in chunk], [t.prompt for t in chunk], **kw))
            if len(got) != len(chunk):
                raise ValueError(f"the batched model returned {len(got)} images for {len(chunk)} prompts")
        outputs += [_as_output(im, t, fixes) for im, t in zip(got, chunk)]
    return outputs, fixes


@dataclass
class SuiteResult:
    """One model on one suite: ``mean`` per score name, per-case rows, and the images for the grid."""

    suite: str
    model: str
    mean: dict[str, float]
    by_group: dict[str, dict[str, float]]
    cases: list[dict]
    fixes: dict[str, int]
    tasks: list[Task]
    outputs: list[Image.Image]

    def to_json(self) -> dict:
        return {
            "suite": self.suite,
            "description": SUITES[self.suite].description,
            "model": self.model,
            "cases": len(self.cases),
            "mean": self.mean,
            "by_group": self.by_group,
            "output_fixes": self.fixes,
            "per_case": self.cases,
        }


def _means(rows: list[dict]) -> dict[str, float]:
    return {k: (float(np.mean([r[k] for r in rows])) if rows else math.nan) for k in SCORE_NAMES}


def evaluate(model, suite: str, limit: int | None = None, batch_size: int = 1, name: str | None = None) -> SuiteResult:
    """Runs `model` over a suite and scores every case.

    Args:
        model: a `BASELINES` name, or a callable with the edit pipeline's signature (see the module
            docstring; batched when ``batch_size > 1``).
        suite: a `SUITES` name.
        limit: score only the first `limit` cases (for quick checks).
        batch_size: cases per call of a callable model; > 1 uses the batched call form.
        name: the model's name in the result (default: the baseline name or the callable's name).

    Returns:
        A `SuiteResult`. Outputs that are not RGB or not the target's size are converted and resized
        (bicubic), and counted in ``fixes``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    tasks = suite_tasks(suite, limit)
    outputs, fixes = _run(model, tasks, batch_size)
    rows = []
    for i, (t, y) in enumerate(zip(tasks, outputs)):
        s = score(t, y)
        k = len(t.images)
        rows.append({"case": i, "kind": t.spec.kind, "num_refs": k, "seed": t.spec.seed, "prompt": t.prompt, **s})
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["kind"] if r["kind"] != "compose" else f"K={r['num_refs']}", []).append(r)
    label = name or (model if isinstance(model, str) else getattr(model, "__name__", type(model).__name__))
    return SuiteResult(
        suite, label, _means(rows), {g: _means(v) for g, v in groups.items()}, rows, fixes, tasks, outputs
    )


# --- reports -------------------------------------------------------------------------------------------

_CELL, _GAP = 64, 2
_PANEL = (40, 40, 40)


def _fit(image: Image.Image, cell: int) -> Image.Image:
    """`image` scaled (nearest, to keep the pixels visible) to fit a cell x cell box, centred on it."""
    w, h = image.size
    scale = cell / max(w, h)
    small = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST)
    box = Image.new("RGB", (cell, cell), _PANEL)
    box.paste(small, ((cell - small.width) // 2, (cell - small.height) // 2))
    return box


def write_grid(result: SuiteResult, path: str | os.PathLike, rows: int = 16) -> Path:
    """Writes a PNG grid: one case per row, ``references | output | target``, for the first `rows` cases.

    Every image is fitted into a 64 x 64 cell (aspect kept); the reference columns are as many as the
    largest K among the shown cases, and a wider gap separates references from output and target.
    """
    shown = list(zip(result.tasks, result.outputs))[: max(0, rows)]
    path = Path(path)
    if not shown:
        Image.new("RGB", (_CELL, _CELL), _PANEL).save(path)
        return path
    kmax = max(len(t.images) for t, _ in shown)
    width = kmax * (_CELL + _GAP) + 3 * _GAP + 2 * (_CELL + _GAP)
    grid = Image.new("RGB", (width, len(shown) * (_CELL + _GAP) + _GAP), (0, 0, 0))
    for r, (task, out) in enumerate(shown):
        y = _GAP + r * (_CELL + _GAP)
        for c, ref in enumerate(task.images):
            grid.paste(_fit(ref, _CELL), (_GAP + c * (_CELL + _GAP), y))
        x = _GAP + kmax * (_CELL + _GAP) + 3 * _GAP
        grid.paste(_fit(out, _CELL), (x, y))
        grid.paste(_fit(task.target, _CELL), (x + _CELL + _GAP, y))
    grid.save(path)
    return path


def write_suite_report(result: SuiteResult, out_dir: str | os.PathLike, grid_rows: int = 16) -> tuple[Path, Path]:
    """Writes ``<out_dir>/<suite>.json`` (means, per-group means, per-case scores) and
    ``<out_dir>/<suite>.png`` (`write_grid`); returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js = out / f"{result.suite}.json"
    js.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return js, write_grid(result, out / f"{result.suite}.png", grid_rows)


def format_table(results: list[SuiteResult]) -> str:
    """A plain-text table: one row per (model, suite); columns the three sources, overall and cases."""
    mw = max([len("model")] + [len(r.model) for r in results])
    sw = max([len("suite")] + [len(r.suite) for r in results])
    cols = [("integration", 11), ("consistency", 11), ("quality", 8), ("overall", 8)]
    head = f"{'model':<{mw}}  {'suite':<{sw}} " + " ".join(f"{c:>{w}}" for c, w in cols) + f" {'cases':>6}"
    lines = [head, "-" * len(head)]
    for r in results:
        nums = " ".join(f"{r.mean[c]:>{w}.3f}" for c, w in cols)
        lines.append(f"{r.model:<{mw}}  {r.suite:<{sw}} {nums} {len(r.cases):>6d}")
    return "\n".join(lines)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``b - a`` over paired cases and its 95% bootstrap interval (resampling the cases)."""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (resamples, len(d)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)
