"""Atomic checkpoints: written under a temporary name, fsynced, then renamed; the last N kept.

A checkpoint is the folder ``<output>/checkpoints/step-XXXXXXXX`` holding DeepSpeed's files (model,
optimizer and LR-schedule state of every rank), ``trainer_state.json`` (step, data cursor, budget
stage, RL step) and one ``rng-rank<r>.json`` per rank. A folder with that name is complete by
construction: it only appears by the rename, after every byte is on disk. A run killed at any moment
leaves at most a ``.tmp-*`` folder behind, which the next save removes and resume ignores.

These files are written by the run itself and loaded only by it (DeepSpeed's own files are pickles:
do not resume from checkpoints you did not write).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["find_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint"]

_NAME = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
TAG = "state"


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


def list_checkpoints(output: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_checkpoint(resume: str, output: str | Path) -> Path | None:
    """``--resume auto``: the newest complete checkpoint of ``output`` (None if there is none);
    ``--resume DIR``: that checkpoint, which must be complete."""
    if resume == "auto":
        found = list_checkpoints(output)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume {resume}: not a complete checkpoint (no {STATE_FILE}); pass a "
            "<output>/checkpoints/step-XXXXXXXX folder or --resume auto"
        )
    return path


def save_checkpoint(engine, output: str | Path, step: int, state: dict, keep_last: int,
                    exclude_frozen: bool = False) -> Path:
    """Writes checkpoint ``step`` atomically on every rank together; returns its folder."""
    root = Path(output) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
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
        _fsync_tree(tmp)
        old = None
        if final.exists():  # re-saving a step after resuming from an older one
            old = root / f".old-step-{step:08d}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(output)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
        for leftover in root.glob(".tmp-step-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(engine, path: Path, exclude_frozen: bool = False) -> dict:
    """Restores model, optimizer, LR schedule and this rank's RNG; returns the trainer state."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = json.loads((path / STATE_FILE).read_text())
    load_path, _ = engine.load_checkpoint(
        str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True,
        load_module_strict=not exclude_frozen,
    )
    if load_path is None:
        raise FileNotFoundError(f"{path}: DeepSpeed found no checkpoint files (tag {TAG!r}); the folder is damaged")
    rng = path / f"rng-rank{rank}.json"
    if rng.is_file():
        _set_rng_state(json.loads(rng.read_text()))
    return state
