"""Readers for the dataset layouts people already have, each returning `EditRecord` rows.

    synthetic          the embedded synthetic world (`uniref.synthetic`), prompts, references and targets
    diffsynth:PATH     DiffSynth-Studio metadata (``.jsonl``, ``.json`` list or ``.csv``): ``image`` (target),
                       ``edit_image`` (a list of reference paths, or one path), ``prompt``; paths relative to
                       the root (default: the metadata file's folder)
    musubi:PATH        musubi-tuner: a JSONL of ``image_path``, ``control_path_0``, ``control_path_1``, ...,
                       ``caption``; or an image folder (``NAME.png`` + ``NAME.txt``) whose references are
                       ``NAME_0.png``, ``NAME_1.png``, ... (or ``NAME_0000.png``) in ``keys.control_directory``
    aitoolkit:PATH     ai-toolkit: a target folder (``NAME.png`` + ``NAME.txt``) and one folder per reference
                       slot in ``keys.control`` (a list), matched by file name
    hf:PATH            a Hugging Face ``datasets`` folder (``save_to_disk``) or a folder of parquet files; the
                       column names in ``keys`` (``prompt``, ``target``, ``references``: one list column or a
                       list of columns); image columns hold images or paths

Field names are overridable through ``keys`` (e.g. ``{"prompt": "instruction"}``). Paths in metadata may
not leave the root (``../`` or absolute paths outside it) unless ``allow_outside_root``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path

import PIL.Image

from uniref.data.records import DatasetError, EditRecord

__all__ = ["SPEC_KINDS", "open_dataset"]

SPEC_KINDS = ("synthetic", "diffsynth", "musubi", "aitoolkit", "hf")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class _Rows(Sequence):
    """A map-style dataset of records built on first access of each row."""

    def __init__(self, rows: list, build):
        self._rows, self._build = rows, build

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._build(i, self._rows[i])


def _resolve(root: Path, value, where: str, allow_outside: bool) -> Path:
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{where}: expected an image path, got {value!r}")
    path = (root / value).resolve()
    if not allow_outside and not path.is_relative_to(root.resolve()):
        raise DatasetError(
            f"{where}: {value} is outside the data root {root}; move the file under the root or "
            "set data.allow_outside_root: true"
        )
    return path


def _read_metadata(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such metadata file") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path} line {n}: not JSON ({exc.msg})") from None
        return rows
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(rows, list):
            raise DatasetError(f"{path}: a .json metadata file must hold a list of rows")
        return rows
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    raise DatasetError(f"{path}: metadata must be .jsonl, .json or .csv")


def _paths(value) -> list:
    """A reference field as a list: a list, one path, or (in CSV) a JSON list in a string."""
    if value is None or value == "":
        return []
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    return list(value) if isinstance(value, list) else [value]


def _diffsynth(path: Path, root: Path | None, keys: dict, allow_outside: bool):
    root = root or path.parent
    k = {"target": "image", "references": "edit_image", "prompt": "prompt", "id": "id", **keys}
    rows = _read_metadata(path)

    def build(i, row):
        where = f"{path.name} row {i}"
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: a row must be a mapping of fields")
        if k["prompt"] not in row:
            raise DatasetError(f"{where}: no {k['prompt']!r} field (fields: {sorted(row)}); set data.keys.prompt")
        target = row.get(k["target"])
        return EditRecord(
            id=str(row.get(k["id"], i)),
            prompt=_prompt(row[k["prompt"]], where),
            references=[_resolve(root, p, where, allow_outside) for p in _paths(row.get(k["references"]))],
            target=None if target in (None, "") else _resolve(root, target, where, allow_outside),
            metadata={f: v for f, v in row.items() if f not in (k["target"], k["references"], k["prompt"], k["id"])},
        )

    return _Rows(rows, build)


def _prompt(value, where: str) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"{where}: the prompt must be text, got {type(value).__name__}")
    return value


def _caption(image: Path, suffix: str = ".txt") -> str:
    caption = image.with_suffix(suffix)
    if not caption.is_file():
        raise DatasetError(f"{image}: no caption file {caption.name} beside it")
    return caption.read_text(encoding="utf-8").strip()


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _musubi(path: Path, root: Path | None, keys: dict, allow_outside: bool):
    if path.suffix.lower() == ".jsonl":
        root = root or path.parent
        rows = _read_metadata(path)

        def build(i, row):
            where = f"{path.name} row {i}"
            numbered = ((re.fullmatch(r"control_path_(\d+)", f), v) for f, v in row.items())
            controls = sorted((int(m.group(1)), v) for m, v in numbered if m)
            target = row.get(keys.get("target", "image_path"))
            return EditRecord(
                id=str(row.get("id", i)),
                prompt=_prompt(row.get(keys.get("prompt", "caption"), ""), where),
                references=[_resolve(root, v, where, allow_outside) for _, v in controls],
                target=None if not target else _resolve(root, target, where, allow_outside),
                metadata={f: v for f, v in row.items() if not f.startswith(("control_path_", "image_path", "caption"))},
            )

        return _Rows(rows, build)
    control = keys.get("control_directory")
    if control is None:
        raise DatasetError(f"musubi:{path}: an image folder needs data.keys.control_directory (its references' folder)")
    control = Path(control) if Path(control).is_absolute() else (root or path.parent) / control
    targets = _images(path)
    by_stem: dict[str, list[tuple[int, Path]]] = {}
    for p in _images(control):
        m = re.fullmatch(r"(.+)_(\d+)", p.stem)
        if m:
            by_stem.setdefault(m.group(1), []).append((int(m.group(2)), p))

    def build(i, image):
        return EditRecord(
            id=image.stem,
            prompt=_caption(image, keys.get("caption_extension", ".txt")),
            references=[p for _, p in sorted(by_stem.get(image.stem, []))],
            target=image,
        )

    return _Rows(targets, build)


def _aitoolkit(path: Path, root: Path | None, keys: dict, allow_outside: bool):
    controls = keys.get("control")
    if not controls:
        raise DatasetError(f"aitoolkit:{path}: name the reference folders in data.keys.control (a list, one per slot)")
    base = root or path.parent
    controls = [controls] if isinstance(controls, str) else controls
    folders = [Path(c) if Path(c).is_absolute() else base / c for c in controls]
    index = [{p.stem: p for p in _images(folder)} for folder in folders]

    def build(i, image):
        refs = [slot[image.stem] for slot in index if image.stem in slot]
        return EditRecord(id=image.stem, prompt=_caption(image), references=refs, target=image)

    return _Rows(_images(path), build)


def _hf(path: Path, root: Path | None, keys: dict, allow_outside: bool):
    try:
        import datasets
    except ImportError:
        raise DatasetError("hf: datasets are read with the `datasets` package: pip install -e '.[data]'") from None
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        table = datasets.load_from_disk(str(path))
    else:
        files = sorted(str(p) for p in path.glob("*.parquet"))
        if not files:
            raise DatasetError(f"hf:{path}: neither a save_to_disk folder nor a folder of .parquet files")
        table = datasets.load_dataset("parquet", data_files=files, split="train")
    if isinstance(table, datasets.DatasetDict):
        table = table[keys.get("split", "train")]
    k = {"prompt": "prompt", "target": "target", "references": "references", **keys}
    missing = [k[f] for f in ("prompt",) if k[f] not in table.column_names]
    if missing:
        raise DatasetError(f"hf:{path}: no column {missing[0]!r} (columns: {table.column_names}); set data.keys")
    base = root or path

    def image(value, where):
        if isinstance(value, PIL.Image.Image):
            return value
        if isinstance(value, dict) and value.get("bytes") is not None:  # an undecoded datasets.Image cell
            import io

            return PIL.Image.open(io.BytesIO(value["bytes"]))
        if isinstance(value, dict) and value.get("path"):
            value = value["path"]
        return _resolve(base, value, where, allow_outside)

    def build(i, _):
        row = table[i]
        where = f"hf:{path.name} row {i}"
        ref_cols = k["references"]
        if isinstance(ref_cols, list):
            values = [row[c] for c in ref_cols if row.get(c) is not None]
        else:
            values = row.get(ref_cols) or []
            values = values if isinstance(values, list) else [values]
        target = row.get(k["target"])
        return EditRecord(
            id=str(row.get(k.get("id", "id"), i)),
            prompt=_prompt(row[k["prompt"]], where),
            references=[image(v, where) for v in values],
            target=None if target is None else image(target, where),
        )

    return _Rows(list(range(len(table))), build)


def _synthetic(options: dict):
    from uniref.synthetic import SyntheticEditDataset

    data = SyntheticEditDataset(**options)

    def build(i, _):
        item = data[i]
        to_pil = lambda t: PIL.Image.fromarray(t.permute(1, 2, 0).numpy())  # noqa: E731
        return EditRecord(
            id=str(i),
            prompt=item["prompt"],
            references=[to_pil(r) for r in item["references"]],
            target=to_pil(item["target"]),
            metadata={"kind": item["kind"]},
        )

    return _Rows(list(range(len(data))), build)


def open_dataset(
    spec: str,
    root: str | Path | None = None,
    keys: dict | None = None,
    allow_outside_root: bool = False,
    **synthetic_options,
) -> Sequence[EditRecord]:
    """A map-style dataset of `EditRecord` from a spec (see the module docstring); rows are read lazily.

    Raises:
        DatasetError: an unknown spec, a missing path or root, unreadable metadata (naming the file and line).
    """
    kind, _, rest = spec.partition(":")
    if kind not in SPEC_KINDS:
        raise DatasetError(
            f"data.source {spec!r}: must be synthetic or one of diffsynth:, musubi:, aitoolkit:, hf: followed by a path"
        )
    if kind == "synthetic":
        if rest:
            raise DatasetError(f"data.source {spec!r}: 'synthetic' takes no path")
        return _synthetic(synthetic_options)
    if not rest:
        raise DatasetError(f"data.source {spec!r}: give a path after '{kind}:'")
    root_path = Path(root) if root is not None else None
    if root_path is not None and not root_path.is_dir():
        raise DatasetError(f"data.root {root_path}: no such folder")
    path = Path(rest) if Path(rest).is_absolute() or root_path is None else root_path / rest
    if not path.exists():
        raise DatasetError(f"data.source {spec!r}: {path} does not exist")
    reader = {"diffsynth": _diffsynth, "musubi": _musubi, "aitoolkit": _aitoolkit, "hf": _hf}[kind]
    return reader(path, root_path, dict(keys or {}), allow_outside_root)
