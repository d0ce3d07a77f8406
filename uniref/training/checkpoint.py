"""Atomic checkpoints with a manifest: written under a temporary name, fsynced, renamed; the last N kept.

A checkpoint is the folder ``<output>/checkpoints/step-XXXXXXXX`` holding DeepSpeed's files (model,
optimizer and LR-schedule state of every rank) under ``state/``, ``trainer_state.json`` (step, data
cursor, budget stage, RL step), ``config.json`` (the run's config), one ``rng-rank<r>.json`` per rank
and, written last, ``manifest.json``: every other file with its size and sha256. A checkpoint is
complete only when its manifest is there and every file matches it; ``--resume auto`` takes the newest
complete one and reports each newer one it skipped and why (a kill or a full disk mid-save, a file
damaged later). A run killed at any moment leaves at most a ``.tmp-*`` folder behind, which the next
save removes and resume ignores.

Trust: DeepSpeed's files are pickles. They are read only with PyTorch's weights-only unpickler, which
rebuilds tensors, containers and plain values and, beyond those, exactly the three DeepSpeed types its
ZeRO optimizer state holds (`DEEPSPEED_STATE_TYPES`); a file naming any other global (a function, a
class with a ``__reduce__``) is refused with `CheckpointError` before anything in it runs. Resuming
never runs code from the run folder. The manifest guards against damage, not forgery: a checkpoint
that someone else could write is still only data, but it is data they chose.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from pickle import UnpicklingError  # the weights-only unpickler's refusal (nothing else is used)

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "CheckpointError",
    "check_resumable",
    "find_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "safe_torch_load",
    "save_checkpoint",
    "verify_checkpoint",
]

_NAME = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
MANIFEST = "manifest.json"
TAG = "state"

# Config keys a resumed run may change: they decide what is logged, kept or planned, not what the
# steps compute. Stage / phase step counts may grow or shrink (a run extended or cut short; with a
# cosine schedule the LR curve is recomputed over the new total); the attention backend computes the
# same function (to the last bits). Any other difference refuses the resume.
HARMLESS_KEYS = (
    re.compile(r"^output$"),
    re.compile(r"^log\."),
    re.compile(r"^checkpoint\."),
    re.compile(r"^vae\.steps$"),
    re.compile(r"^sft\.stages\[\d+\]\.steps$"),
    re.compile(r"^msgrpo\.phases\[\d+\]\.steps$"),
    re.compile(r"^model\.attention_backend$"),
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (incomplete, damaged, forged, or from another run)."""


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    """Every file under ``root`` but the manifest, as sorted POSIX paths relative to ``root``."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _write_manifest(root: Path) -> None:
    files = {name: {"size": (root / name).stat().st_size, "sha256": _sha256(root / name)} for name in _files(root)}
    _write_json(root / MANIFEST, {"format": 1, "files": files})


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def _set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def verify_checkpoint(path: str | Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (one line), or None when its manifest and files agree."""
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
    except FileNotFoundError:
        return f"no {MANIFEST} (its save did not finish)"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is damaged"
    present = _files(path)
    extra = sorted(set(present) - set(files))
    if extra:
        return f"{extra[0]} is not in its {MANIFEST}"
    for name, size in sizes.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, its {MANIFEST} says {size} (truncated?)"
        if _sha256(f) != files[name].get("sha256"):
            return f"{name} does not match the checksum in its {MANIFEST}"
    if STATE_FILE not in files:
        return f"no {STATE_FILE}"
    return None


def list_checkpoints(output: str | Path) -> list[Path]:
    """Checkpoints of a run whose save finished (a manifest is there), oldest first. Their files are
    checked against the manifest by `verify_checkpoint` (which `find_checkpoint` runs)."""
    root = Path(output) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_checkpoint(resume: str, output: str | Path, skipped: list[str] | None = None) -> Path | None:
    """``--resume auto``: the newest complete checkpoint of ``output`` (None if there is none), appending
    to ``skipped`` one line per newer checkpoint folder it passed over and why; ``--resume DIR``: that
    checkpoint, which must be complete.

    Raises:
        CheckpointError: ``DIR`` is not a complete checkpoint.
    """
    if resume == "auto":
        root = Path(output) / "checkpoints"
        folders = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)] if root.is_dir() else []
        for p in sorted(folders, key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True):
            reason = verify_checkpoint(p)
            if reason is None:
                return p
            if skipped is not None:
                skipped.append(f"{p.name}: {reason}")
        return None
    reason = verify_checkpoint(resume)
    if reason is not None:
        raise CheckpointError(
            f"--resume {resume}: not a complete checkpoint ({reason}); pass a <output>/checkpoints/step-XXXXXXXX "
            "folder or --resume auto"
        )
    return Path(resume)


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, list) and any(isinstance(v, (dict, list)) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: tree}


def check_resumable(path: str | Path, config: dict, total_steps: int) -> int:
    """The step of checkpoint ``path``, after checking that this run (``config``: `TrainConfig.to_dict`,
    ``total_steps``) may continue it: its config differs only in `HARMLESS_KEYS` and its step is not past
    ``total_steps``.

    Raises:
        CheckpointError: naming every key that differs, or the step.
    """
    path = Path(path)
    step = int(json.loads((path / STATE_FILE).read_text())["step"])
    try:
        saved = _flatten(json.loads((path / CONFIG_FILE).read_text()))
    except FileNotFoundError:
        raise CheckpointError(
            f"--resume {path}: no {CONFIG_FILE} (written by an older uniref); start a new run"
        ) from None
    now = _flatten(json.loads(json.dumps(config)))
    from uniref.training.config import TrainConfig

    # a key a newer uniref added is absent from an older checkpoint's config: at its default, nothing changed
    defaults = _flatten(json.loads(json.dumps(TrainConfig().to_dict())))
    differ = [
        k
        for k in sorted(set(saved) | set(now))
        if saved.get(k, "<absent>") != now.get(k, "<absent>")
        and not any(h.search(k) for h in HARMLESS_KEYS)
        and not (k not in saved and k in defaults and now.get(k) == defaults[k])
    ]
    if differ:
        shown = ", ".join(f"{k} ({saved.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r})" for k in differ[:8])
        more = f" and {len(differ) - 8} more" if len(differ) > 8 else ""
        raise CheckpointError(
            f"--resume {path}: that run's config differs in {shown}{more}; resume with the config it was written "
            "with, or start a new run (another --output, or --overwrite)"
        )
    if step > total_steps:
        raise CheckpointError(
            f"--resume {path}: the checkpoint is at step {step}, past this config's {total_steps} steps; raise the "
            "steps or start a new run"
        )
    return step


def save_checkpoint(
    engine,
    output: str | Path,
    step: int,
    state: dict,
    keep_last: int,
    exclude_frozen: bool = False,
    config: dict | None = None,
    tmp_tag: str = "",
) -> Path:
    """Writes checkpoint ``step`` atomically on every rank together; returns its folder.

    ``config``: the run's `TrainConfig.to_dict` (checked on resume); ``tmp_tag``: the same string on every
    rank, unique to this process group, so the temporary folder is nobody else's.
    """
    root = Path(output) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{tmp_tag or os.getpid()}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    engine.save_checkpoint(str(tmp), tag=TAG, save_latest=False, exclude_frozen_parameters=exclude_frozen)
    _write_json(tmp / f"rng-rank{rank}.json", _rng_state())
    _barrier()
    if rank == 0:
        _write_json(tmp / STATE_FILE, {**state, "step": step})
        _write_json(tmp / CONFIG_FILE, config or {})
        _fsync_tree(tmp)
        _write_manifest(tmp)  # last: a folder without it is incomplete
        _fsync_dir(tmp)
        old = None
        if final.exists():  # re-saving a step after resuming from an older one
            old = root / f".old-step-{step:08d}-{tmp_tag or os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(output)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
        for leftover in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:  # a killed run's (the folder is locked)
            shutil.rmtree(leftover, ignore_errors=True)
    _barrier()
    return final


def _deepspeed_state_types() -> list:
    """The non-torch types DeepSpeed pickles into its ZeRO optimizer state (nothing else is allowed)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_torch_load(path: str | os.PathLike, map_location=None):
    """``torch.load`` with the weights-only unpickler, allowing DeepSpeed's state types; a file naming any
    other global is refused before anything in it runs.

    Raises:
        CheckpointError: the file is not plain checkpoint data.
    """
    with torch.serialization.safe_globals(_deepspeed_state_types()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except UnpicklingError as exc:
            found = re.search(r"GLOBAL (\S+)", str(exc))
            what = f"it names {found.group(1)}" if found else str(exc).splitlines()[0]
            raise CheckpointError(
                f"{path}: refused: not plain checkpoint data ({what}); checkpoints are loaded as data, never run as "
                "code: resume only from checkpoints a uniref run wrote"
            ) from None


def load_checkpoint(engine, path: Path, exclude_frozen: bool = False) -> dict:
    """Restores model, optimizer, LR schedule and this rank's RNG; returns the trainer state. Every file
    DeepSpeed reads goes through `safe_torch_load`."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = json.loads((path / STATE_FILE).read_text())
    engine.checkpoint_engine.load = safe_torch_load  # DeepSpeed's own load unpickles with weights_only=False
    load_path, _ = engine.load_checkpoint(
        str(path),
        tag=TAG,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
        load_module_strict=not exclude_frozen,
    )
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed found no checkpoint files (tag {TAG!r}); the folder is damaged")
    rng = path / f"rng-rank{rank}.json"
    if rng.is_file():
        _set_rng_state(json.loads(rng.read_text()))
    return state
