"""The run folder (``--output``): one run at a time, never clobbered.

A run holds an exclusive ``flock`` on ``<output>/.lock`` from start to end (rank 0 takes it; every rank
learns the outcome). The file names the holder (host, pid, start time) and is emptied on release; the
kernel drops the lock when its process dies, so a later run that finds the lock free but the file still
naming a holder reports that holder as gone and takes over. A folder that already holds a run is
refused unless the run continues it (``--resume``) or replaces it (``--overwrite``, which removes only
what a run writes).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

__all__ = ["LOCK_FILE", "RUN_ENTRIES", "RunFolderError", "RunLock", "prepare_output"]

LOCK_FILE = ".lock"
# what a run writes into its folder (the trainer, checkpoint.py and metrics.py); --overwrite removes these only
RUN_ENTRIES = (
    "config.json",
    "deepspeed_config.json",
    "metrics.jsonl",
    "metrics.jsonl.tmp",
    "curves.png",
    "checkpoints",
    "final",
    ".final.tmp",
)


class RunFolderError(RuntimeError):
    """An ``--output`` folder a run may not use (held by another run, holding another run, not a folder)."""


class RunLock:
    """The exclusive lock on a run folder, held while the object is acquired."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Takes the lock; returns a warning (one line) when a dead holder's record was left in the file.

        Raises:
            RunFolderError: another live process holds it.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunFolderError(
                f"--output {self.path.parent} is in use by another run ({holder}); wait for it to end or pick "
                "another --output"
            ) from None
        previous = os.pread(fd, 4096, 0)
        record = json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        ).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record + b"\n", 0)
        os.fsync(fd)
        self._fd = fd
        if previous.strip():
            return (
                f"--output {self.path.parent}: taking over the lock left by a run that ended without "
                f"releasing it ({_describe(previous)}; that process no longer holds it)"
            )
        return None

    def release(self) -> None:
        """Empties the record and drops the lock (the file stays: removing it would race with a new run)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "holder unknown"


def prepare_output(folder: str | Path, resume: str | None, overwrite: bool) -> tuple[RunLock, str | None]:
    """Creates ``folder``, locks it and checks that this run may write into it; returns the held lock and
    the warning of `RunLock.acquire` (None when the lock was left cleanly).

    A folder holding anything but the lock is refused unless ``resume`` (the run continues it) or
    ``overwrite`` (what a previous run wrote is removed; anything else in it refuses even then).

    Raises:
        RunFolderError: one line naming the folder and the way on.
    """
    folder = Path(folder)
    if resume is not None and overwrite:
        raise RunFolderError("--overwrite starts a new run and --resume continues one; pass only one of them")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise RunFolderError(
            f"--output {folder}: a file is in the way of the run folder; pick another --output"
        ) from None
    except PermissionError:
        raise RunFolderError(f"--output {folder}: cannot create the run folder (permission denied)") from None
    lock = RunLock(folder)
    try:
        warning = lock.acquire()
    except PermissionError:
        raise RunFolderError(f"--output {folder}: cannot write into the run folder (permission denied)") from None
    try:
        for sub in ("checkpoints", "final"):
            if (folder / sub).exists() and not (folder / sub).is_dir():
                raise RunFolderError(
                    f"--output {folder}: {sub} is a file, not a folder; move it away or pick another --output"
                )
        held = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE)
        if held and resume is None and not overwrite:
            raise RunFolderError(
                f"--output {folder} already holds a run ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}); "
                "continue it with --resume auto, or replace it with --overwrite"
            )
        if held and overwrite:
            foreign = [n for n in held if n not in RUN_ENTRIES]
            if foreign:
                raise RunFolderError(
                    f"--overwrite: --output {folder} holds files a run does not write ({', '.join(foreign[:4])}); "
                    "remove them or pick another --output"
                )
            for name in held:
                p = folder / name
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    except BaseException:
        lock.release()
        raise
    return lock, warning
