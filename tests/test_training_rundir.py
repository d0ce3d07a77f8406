"""The run folder (uniref/training/rundir.py): refused when it holds a run, locked while one runs."""

from __future__ import annotations

import json
import os

from uniref.training.checkpoint import list_checkpoints
from uniref.training.metrics import read_metrics
from uniref.training.rundir import LOCK_FILE, RunLock

from training_helpers import SFT, run, write

ONE_STEP = {
    **SFT,
    "sft": {**SFT["sft"], "stages": [{"pixel_budget": 4096, "steps": 1}]},
    "checkpoint": {"every": 1, "keep_last": 2},
}


def _error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines[-1]


def test_a_used_output_is_refused_unless_resumed_or_overwritten(tmp_path):
    path, out = write(tmp_path, ONE_STEP), tmp_path / "out"
    run(path, out)
    before = {p: p.read_bytes() for p in [out / "metrics.jsonl", *(out / "final").rglob("*.safetensors")]}
    line = _error_line(run(path, out, check=False, timeout=120))
    assert f"--output {out} already holds a run" in line
    assert "continue it with --resume auto, or replace it with --overwrite" in line
    assert all(p.read_bytes() == data for p, data in before.items())  # nothing of the first run was touched
    assert "pass only one of them" in _error_line(
        run(path, out, "--overwrite", "--resume", "auto", check=False, timeout=120)
    )
    (out / "notes.txt").write_text("mine")
    line = _error_line(run(path, out, "--overwrite", check=False, timeout=120))
    assert "holds files a run does not write (notes.txt)" in line
    (out / "notes.txt").unlink()
    two = write(
        tmp_path,
        {**ONE_STEP, "sft": {**ONE_STEP["sft"], "stages": [{"pixel_budget": 4096, "steps": 2}]}, "seed": 4},
        "two.yaml",
    )
    run(two, out, "--overwrite")
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert [p.name for p in list_checkpoints(out)] == ["step-00000001", "step-00000002"]
    assert json.loads((out / "config.json").read_text())["seed"] == 4


def test_a_held_lock_refuses_a_second_run_on_every_rank(tmp_path):
    path, out = write(tmp_path, ONE_STEP), tmp_path / "out"
    out.mkdir()
    lock = RunLock(out)
    assert lock.acquire() is None
    try:
        holder = f"is in use by another run (pid {os.getpid()} on host"
        assert holder in _error_line(run(path, out, check=False, timeout=120))
        proc = run(path, out, procs=2, check=False, timeout=300)  # both ranks stop; neither waits for the other
        assert proc.returncode != 0 and holder in proc.stderr + proc.stdout
    finally:
        lock.release()
    assert (out / LOCK_FILE).read_bytes() == b""
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_a_dead_runs_lock_is_reported_and_taken(tmp_path):
    path, out = write(tmp_path, ONE_STEP), tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 999999, "started": "2026-01-01T00:00:00"}))
    proc = run(path, out)
    assert (
        "taking over the lock left by a run that ended without releasing it (pid 999999 on host elsewhere, "
        "started 2026-01-01T00:00:00"
    ) in proc.stderr
    assert (out / "final").is_dir() and (out / LOCK_FILE).read_bytes() == b""


def test_a_file_in_the_way_is_a_one_line_error(tmp_path):
    path = write(tmp_path, ONE_STEP)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoints").write_text("not a folder")
    line = _error_line(run(path, tmp_path / "out", "--resume", "auto", check=False, timeout=120))
    assert "checkpoints is a file, not a folder" in line
    (tmp_path / "file").write_text("x")
    assert "a file is in the way of the run folder" in _error_line(
        run(path, tmp_path / "file", check=False, timeout=120)
    )
