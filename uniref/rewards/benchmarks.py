"""Offline runners for the public multi-reference editing benchmarks, on a local copy (nothing is downloaded).

    summary = run_benchmark("mico", "/data/MICo-Bench", editor, judge, "runs/mico")

``editor(prompt: str, references: list[PIL.Image]) -> PIL.Image`` makes each output; ``judge`` is a
`uniref.rewards` judge (``vlm_judge`` or ``vlm_judge_local``) whose ``ask`` scores it. Each run writes, under
``out``: ``images/`` (the outputs, in the benchmark's own results layout), ``cases.json`` (every case: its
inputs, output, scores or why it was skipped), ``table.md`` and ``table.csv`` (the benchmark's summary
table) and ``grid.png`` (references and output of the first cases). The judge's model name and endpoint
stand beside every number: scores from different judges are not comparable.

The formats, their layouts and their scoring (sources in docs/rewards.md):

* ``mico`` -- MICo-Bench (A113N-W3I/MICo-150K, ``MICo-Bench/README.md``): ``mico_bench_<task>.jsonl`` with
  ``idx`` (``ed_idx`` for De&Re), ``input`` (source paths relative to the folder), ``reference`` (the
  human-verified target), ``prompt``. Score = W x sqrt(SC x PQ), SC = sqrt(PF x SR) against the reference
  image, PQ = sqrt(naturalness x artifacts), reported x10 (0-100) as its summary is. W (ArcFace + a VLM
  yes/no per source) is read from ``weights/<task>.json`` in the data folder when present, else 1.0, as its
  ``eval_score.py`` defaults.
* ``omnicontext`` -- OmniContext (VectorSpaceLab/OmniGen2, ``omnicontext/``): JSONL rows ``key``,
  ``task_type``, ``instruction``, ``input_images`` (paths), or the Hugging Face parquet copy (images stored
  in the cells); outputs ``fullset/<task_type>/<key>.png``;
  PF (prompt following) and SC (subject consistency) 0-10, overall sqrt(PF x SC), per task type.
* ``multibanana`` -- MultiBanana (matsuolab/multibanana, ``judge.py``): ``<task>/<N>_prompt.txt`` and
  references ``<N>_<i>.<ext>`` (i from 0 or 1); outputs ``<task>/<N>_generated.png``; one question, five
  axes 1-10 read from ``Axis: n`` lines, Average = their mean, per task.
* ``gedit`` -- GEdit-Bench (stepfun-ai/Step1X-Edit; VIEScore): JSONL rows ``key``, ``task_type``,
  ``instruction``, ``instruction_language``, ``input_image`` (a path, or the parquet copy's image cell); outputs
  ``fullset/<task_type>/<language>/<key>.png``; SC = min(success, over-editing), PQ = min(naturalness,
  artifacts), O = sqrt(SC x PQ), per task type and language.

The question wording is ours (condensed from each benchmark's rubric, with the same axes, scales and reply
format), so numbers track but need not equal those of the benchmark's own scripts and judges.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from uniref.rewards.judge import Query
from uniref.rewards.prompts import TEMPLATES, JudgeReplyError, parse_scores

__all__ = ["FORMATS", "Case", "load_cases", "run_benchmark"]

_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Case:
    """One benchmark case: where its inputs are and where its output goes (relative to ``out/images``)."""

    id: str
    task: str
    prompt: str
    references: list[str]
    output: str
    target: str | None = None  # a ground-truth image the judge compares with (MICo-Bench)
    extra: dict = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict, repr=False)  # images stored in the data files


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not JSON ({e.msg})") from None
    return rows


def _need(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{where} lacks {missing}; see uniref.rewards.benchmarks for the layout")


def _mico(root: Path) -> list[Case]:
    files = sorted(root.glob("mico_bench_*.jsonl"))
    if not files:
        raise ValueError(f"{root} has no mico_bench_*.jsonl; point --data at the MICo-Bench folder")
    cases = []
    for f in files:
        for n, row in enumerate(_jsonl(f), 1):
            _need(row, ("input", "prompt", "reference"), f"{f.name} line {n}")
            cid = str(row["ed_idx"] if "ed_idx" in row else row["idx"])
            cases.append(
                Case(
                    cid,
                    f.stem,
                    row["prompt"],
                    [str(root / p) for p in row["input"]],
                    f"{f.stem}/{cid}.png",
                    target=str(root / row["reference"]),
                    extra={"human_indices": row.get("human_indices", [])},
                )
            )
    return cases


def _rows(root: Path, what: str) -> list[tuple[str, dict]]:
    """``(where, row)`` of every row of the folder's ``*.jsonl`` files, or else of its ``**/*.parquet`` files
    (the Hugging Face copy: ``huggingface-cli download --repo-type dataset ...``; needs pyarrow)."""
    files = sorted(root.glob("*.jsonl"))
    if files:
        return [(f"{f.name} line {n}", row) for f in files for n, row in enumerate(_jsonl(f), 1)]
    files = sorted(root.rglob("*.parquet"))
    if not files:
        raise ValueError(f"{root} has no *.jsonl or *.parquet of {what} rows")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {files[0]} needs pyarrow: pip install 'uniref[judge]'") from None
    return [
        (f"{f.relative_to(root)} row {n}", row) for f in files for n, row in enumerate(pq.read_table(f).to_pylist())
    ]


def _image(value, root: Path, where: str, blobs: dict) -> str:
    """A path (relative to the folder) as is, or a Hugging Face image cell ``{"bytes", "path"}`` kept in
    `blobs` under a label naming its row."""
    if isinstance(value, str):
        return str(root / value)
    if isinstance(value, dict) and value.get("bytes"):
        label = f"{where}: {value.get('path') or 'image'} #{len(blobs)}"
        blobs[label] = value["bytes"]
        return label
    return f"{where}: no image"  # a null cell: the case is skipped as missing


def _omnicontext(root: Path) -> list[Case]:
    cases = []
    for where, row in _rows(root, "OmniContext (key, task_type, instruction, input_images)"):
        _need(row, ("key", "task_type", "instruction", "input_images"), where)
        blobs = {}
        refs = [_image(v, root, where, blobs) for v in row["input_images"] or []]
        cases.append(
            Case(
                str(row["key"]),
                row["task_type"],
                row["instruction"],
                refs,
                f"fullset/{row['task_type']}/{row['key']}.png",
                blobs=blobs,
            )
        )
    return cases


def _gedit(root: Path) -> list[Case]:
    cases = []
    for where, row in _rows(root, "GEdit-Bench (key, task_type, instruction, instruction_language, input_image)"):
        _need(row, ("key", "task_type", "instruction", "input_image"), where)
        lang, blobs = row.get("instruction_language") or "en", {}
        cases.append(
            Case(
                str(row["key"]),
                row["task_type"],
                row["instruction"],
                [_image(row["input_image"], root, where, blobs)],
                f"fullset/{row['task_type']}/{lang}/{row['key']}.png",
                extra={"language": lang},
                blobs=blobs,
            )
        )
    return cases


def _multibanana(root: Path) -> list[Case]:
    cases = []
    for task in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for prompt in sorted(task.glob("*_prompt.txt")):
            number = prompt.name[: -len("_prompt.txt")]
            refs = []
            for start in (0, 1):  # its judge.py numbers references from 1, qwenvl_judge.py from 0
                i = start
                while (
                    found := next(
                        (task / f"{number}_{i}{e}" for e in _EXTS if (task / f"{number}_{i}{e}").exists()), None
                    )
                ) is not None:
                    refs.append(str(found))
                    i += 1
                if refs:
                    break
            cases.append(
                Case(
                    number,
                    task.name,
                    prompt.read_text(encoding="utf-8").strip(),
                    refs,
                    f"{task.name}/{number}_generated.png",
                )
            )
    if not cases:
        raise ValueError(f"{root} has no <task>/<N>_prompt.txt; point --data at the MultiBanana folder")
    return cases


_LOADERS = {"mico": _mico, "omnicontext": _omnicontext, "multibanana": _multibanana, "gedit": _gedit}
FORMATS = tuple(_LOADERS)


def load_cases(format: str, data_dir: str | os.PathLike) -> list[Case]:
    """The cases of a local benchmark copy, in file order."""
    if format not in _LOADERS:
        raise ValueError(f"unknown benchmark format {format!r}; choose one of {list(FORMATS)}")
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"benchmark data folder {root} does not exist")
    return _LOADERS[format](root)


# --- questions and their replies ---------------------------------------------------------------------------

_JSON_REPLY = TEMPLATES["quality"].split("The image is")[0]  # the VIEScore context and JSON reply format

# MICo-Bench's SC: the output against the human-verified reference image (its README: PF and SR, SC =
# sqrt(PF x SR)); its PQ: naturalness and artifacts, PQ = sqrt(N x A).
_MICO_SC = _JSON_REPLY + (
    "The first image is a reference composition; the second was generated from several source images by the "
    "prompt below. Give two scores from 0 to 10 in a list: prompt following (how well the second image follows "
    "the prompt) and subject resemblance (how closely its subjects match those of the reference image).\n"
    "Prompt: {prompt}"
)
# OmniContext's PF and SC (VectorSpaceLab/OmniGen2 omnicontext): prompt following against the instruction,
# subject consistency against every input image.
_OMNI_PF = _JSON_REPLY + (
    "The last image was generated from the first {n_refs} image(s) by the instruction below. Give one score "
    "from 0 to 10 for how completely and accurately it follows the instruction.\nInstruction: {prompt}"
)
_OMNI_SC = _JSON_REPLY + (
    "The last image was generated from the first {n_refs} image(s) by the instruction below. Give one score "
    "from 0 to 10 for how consistent the subjects it takes from the input images are with them (identity, "
    "appearance, details).\nInstruction: {prompt}"
)
# MultiBanana's five axes and reply format (matsuolab/multibanana judge.py, create_evaluation_prompts).
_BANANA_AXES = (
    "Instruction Alignment",
    "Reference Consistency",
    "Background-Subject Match",
    "Physical Realism",
    "Visual Quality",
)
_BANANA = (
    "You are a strict rater of multi-reference image generation. The first {n_refs} image(s) are the "
    "references; the last image is the output for this instruction: {prompt}\n"
    "Rate it from five independent perspectives, each from 1 to 10 (an average output earns about 4): "
    "instruction alignment (the instructed subjects, placed as asked, nothing unintended; 1 if a referenced "
    "subject is missing), reference consistency (every reference's structure and fine details reproduced), "
    "background-subject match (subjects blend into the scene, no pasted look), physical realism (physically "
    "plausible, proper contact), visual quality (perceptual and aesthetic quality).\n"
    "Explain your reasoning first, starting with 'Reasoning: ', then give the final assessment in this format:\n"
    + "".join(f"{a}: <A number from 1 to 10>.\n" for a in _BANANA_AXES)
)


def _fill(template: str, n_refs: int, prompt: str) -> str:
    return template.replace("{n_refs}", str(n_refs)).replace("{prompt}", prompt)


def parse_banana(text: str) -> list[float]:
    """MultiBanana's five ``Axis: n`` scores (1-10), in `_BANANA_AXES` order."""
    scores = []
    for axis in _BANANA_AXES:
        m = re.search(re.escape(axis) + r":\s*(\d+(?:\.\d+)?)", text)
        if m is None:
            raise JudgeReplyError(f"no '{axis}: n' line in the reply: {text[:200]!r}")
        v = float(m.group(1))
        if not 1 <= v <= 10:
            raise JudgeReplyError(f"'{axis}' must lie in 1-10, got {v}")
        scores.append(v)
    return scores


def parse_pair(text: str) -> list[float]:
    """A JSON reply with exactly two scores 0-10."""
    scores = parse_scores(text)
    if len(scores) != 2:
        raise JudgeReplyError(f'expected two scores under "score", got {scores}')
    return scores


def parse_one(text: str) -> list[float]:
    """A JSON reply with one score 0-10 (a list is reduced to its minimum)."""
    return [min(parse_scores(text))]


def _questions(format: str, case: Case, refs: list[Image.Image], output: Image.Image, target):
    """``[(name, Query, parse)]`` for one case."""
    n, p = len(refs), case.prompt
    if format == "mico":
        return [
            ("sc", Query("mico_sc", _fill(_MICO_SC, n, p), [target, output]), parse_pair),
            ("pq", Query("quality", TEMPLATES["quality"], [output]), parse_pair),
        ]
    if format == "omnicontext":
        return [
            ("pf", Query("omni_pf", _fill(_OMNI_PF, n, p), [*refs, output]), parse_one),
            ("sc", Query("omni_sc", _fill(_OMNI_SC, n, p), [*refs, output]), parse_one),
        ]
    if format == "gedit":
        return [
            ("sc", Query("instruction", _fill(TEMPLATES["instruction"], n, p), [*refs, output]), parse_pair),
            ("pq", Query("quality", TEMPLATES["quality"], [output]), parse_pair),
        ]
    return [("axes", Query("multibanana", _fill(_BANANA, n, p), [*refs, output]), parse_banana)]


def _scores(format: str, answers: dict[str, list[float]], weight: float) -> dict[str, float]:
    if format == "mico":
        pf, sr = answers["sc"]
        nat, art = answers["pq"]
        sc, pq = math.sqrt(pf * sr), math.sqrt(nat * art)
        return {
            "weight": weight,
            "pq_naturalness": nat,
            "pq_artifacts": art,
            "pq": pq,
            "sc_prompt_following": pf,
            "sc_subject_resemblance": sr,
            "sc": sc,
            "final": weight * math.sqrt(sc * pq),
        }
    if format == "omnicontext":
        pf, sc = answers["pf"][0], answers["sc"][0]
        return {"PF": pf, "SC": sc, "Overall": math.sqrt(pf * sc)}
    if format == "gedit":
        sc, pq = min(answers["sc"]), min(answers["pq"])
        return {"SC": sc, "PQ": pq, "O": math.sqrt(sc * pq)}
    row = dict(zip((a.replace(" ", "_").replace("-", "_") for a in _BANANA_AXES), answers["axes"]))
    row["Average"] = sum(answers["axes"]) / len(_BANANA_AXES)
    return row


# --- outputs -----------------------------------------------------------------------------------------------


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _table(format: str, cases: list[dict]) -> tuple[list[str], list[list]]:
    """The benchmark's summary: one row per task (per task and language for GEdit-Bench), then overall."""
    scored = [c for c in cases if c["status"] == "scored"]
    if format == "mico":
        cols = ["task", "mean", "count", "skipped"]
        key = "final"
    else:
        cols = ["task", *(["language"] if format == "gedit" else []), "samples", "skipped"]
        key = None
    metrics = list(scored[0]["scores"]) if scored else []
    if format != "mico":
        cols += metrics
    groups: dict[tuple, list[dict]] = {}
    for c in cases:
        g = (c["task"], c.get("language")) if format == "gedit" else (c["task"],)
        groups.setdefault(g, []).append(c)
    groups[("overall",) + ((None,) if format == "gedit" else ())] = cases
    rows = []
    for g, members in groups.items():
        ok = [c for c in members if c["status"] == "scored"]
        skipped = len(members) - len(ok)
        if format == "mico":  # its summary.json reports the mean final score x 10
            mean = 10 * sum(c["scores"][key] for c in ok) / len(ok) if ok else float("nan")
            rows.append([g[0], round(mean, 2), len(ok), skipped])
        else:
            means = [round(sum(c["scores"][m] for c in ok) / len(ok), 3) if ok else float("nan") for m in metrics]
            rows.append([*[x if x is not None else "all" for x in g], len(ok), skipped, *means])
    return cols, rows


def _grid(entries: list[tuple[list[Image.Image], Image.Image | None]], cell: int = 128) -> Image.Image:
    width = max(len(r) + 1 for r, _ in entries) * cell
    grid = Image.new("RGB", (width, cell * len(entries)), (255, 255, 255))
    for y, (refs, out) in enumerate(entries):
        for x, im in enumerate([*refs, out]):
            if im is not None:
                thumb = im.copy()
                thumb.thumbnail((cell, cell))
                grid.paste(thumb, (x * cell, y * cell))
    return grid


def _open(ref: str, blobs: dict) -> Image.Image:
    return Image.open(io.BytesIO(blobs[ref]) if ref in blobs else ref).convert("RGB")


def run_benchmark(
    format: str,
    data_dir: str | os.PathLike,
    editor: Callable,
    judge,
    out: str | os.PathLike,
    limit: int | None = None,
    grid_cases: int = 16,
) -> dict:
    """Runs `editor` on every case of a local benchmark copy and scores the outputs with `judge`.

    Args:
        format: one of `FORMATS` (``mico``, ``omnicontext``, ``multibanana``, ``gedit``).
        data_dir: the benchmark's local folder (see the module docstring for each layout).
        editor: ``(prompt: str, references: list[PIL.Image]) -> PIL.Image``.
        judge: a `uniref.rewards` judge with ``ask(queries, parse)`` and ``judge_id`` (``vlm_judge`` or
            ``vlm_judge_local``).
        out: the run's folder (created).
        limit: score only the first `limit` cases.
        grid_cases: cases shown in ``grid.png``.

    Returns:
        ``{"format", "judge": {"model", "endpoint"}, "columns", "rows", "cases", "skipped"}``; the same
        goes to ``out/cases.json`` (with every case), ``out/table.md`` and ``out/table.csv``.

    A case with a missing or unreadable input image is recorded as ``skipped`` with the file named, and
    counted in the table's ``skipped`` column; a judge that fails raises (see `uniref.rewards.JudgeError`).
    """
    if not hasattr(judge, "ask"):
        raise TypeError("judge must be a uniref.rewards judge (vlm_judge or vlm_judge_local)")
    cases = load_cases(format, data_dir)[:limit]
    out = Path(out)
    weights = {}
    if format == "mico":
        for task in {c.task for c in cases}:
            wf = Path(data_dir) / "weights" / f"{task}.json"
            weights[task] = json.loads(wf.read_text()) if wf.exists() else {}
    judge_info = {"model": judge.judge_id, "endpoint": getattr(judge, "url", None) or f"local:{judge.judge_id}"}
    records, grid = [], []
    pending = []  # (record, [(name, Query, parse)])
    for case in cases:
        rec = {**asdict(case), "language": case.extra.get("language"), "judge": judge_info}
        rec.pop("blobs")
        try:
            paths = case.references + ([case.target] if case.target else [])
            missing = [p for p in paths if p not in case.blobs and not Path(p).is_file()]
            if missing or not case.references:
                raise FileNotFoundError(f"missing input image(s): {missing or 'no references found'}")
            refs = [_open(p, case.blobs) for p in case.references]
            target = Image.open(case.target).convert("RGB") if case.target else None
        except (OSError, ValueError) as e:
            rec.update(status="skipped", error=str(e))
            records.append(rec)
            continue
        output = editor(case.prompt, refs)
        if not isinstance(output, Image.Image):
            raise TypeError(f"editor must return a PIL image, got {type(output).__name__} for case {case.id}")
        output = output.convert("RGB")
        buf = io.BytesIO()
        output.save(buf, format="PNG")
        _write(out / "images" / case.output, buf.getvalue())
        if len(grid) < grid_cases:
            grid.append((refs, output))
        pending.append((rec, _questions(format, case, refs, output, target)))
        records.append(rec)
    for parse in (parse_pair, parse_one, parse_banana):  # one concurrent batch per reply parser
        items = [(rec, name, q) for rec, qs in pending for name, q, p in qs if p is parse]
        if items:
            for (rec, name, _), value in zip(items, judge.ask([q for _, _, q in items], parse)):
                rec.setdefault("answers", {})[name] = value
    for rec, _ in pending:
        w = float(weights.get(rec["task"], {}).get(rec["id"], 1.0)) if format == "mico" else 1.0
        rec.update(status="scored", scores=_scores(format, rec.pop("answers"), w))
    cols, rows = _table(format, records)
    summary = {
        "format": format,
        "judge": judge_info,
        "columns": cols,
        "rows": rows,
        "cases": len(records),
        "skipped": sum(r["status"] == "skipped" for r in records),
    }
    _write(out / "cases.json", json.dumps({**summary, "case_results": records}, indent=1).encode())
    md = [
        f"Judge: {judge_info['model']} at {judge_info['endpoint']} ({format}, {len(records)} cases)",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    md += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    _write(out / "table.md", ("\n".join(md) + "\n").encode())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*cols, "judge_model", "judge_endpoint"])
    w.writerows([*row, judge_info["model"], judge_info["endpoint"]] for row in rows)
    _write(out / "table.csv", buf.getvalue().encode())
    if grid:
        buf = io.BytesIO()
        _grid(grid).save(buf, format="PNG")
        _write(out / "grid.png", buf.getvalue())
    return summary
