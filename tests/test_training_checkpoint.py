"""Checkpoints and resume (uniref/training/checkpoint.py): real DeepSpeed runs in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from uniref.training import load_config
from uniref.training.checkpoint import (
    CheckpointError,
    _write_manifest,
    check_resumable,
    find_checkpoint,
    list_checkpoints,
    safe_torch_load,
    verify_checkpoint,
)
from uniref.training.metrics import read_metrics

from training_helpers import ROOT, RUN, SFT, env, run, weights, write


def test_killed_run_resumes_bitwise(tmp_path):
    stages = [{"pixel_budget": 4096, "steps": 8}, {"pixel_budget": 8192, "steps": 8}]
    path = write(tmp_path, {**SFT, "sft": {**SFT["sft"], "stages": stages}})
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run(path, ref, default_threads=True)  # bitwise at the thread count users run with, not only at one
    cmd = [sys.executable, str(RUN), "--config", str(path), "--output", str(killed)]
    proc = subprocess.Popen(
        cmd, env=env(default_threads=True), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
    )
    deadline = time.time() + 300
    while not list_checkpoints(killed) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next steps, maybe mid-way through writing the next checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = find_checkpoint("auto", killed)
    assert resumed_from is not None
    assert int(resumed_from.name.split("-")[1]) < 16, "the run finished before it was killed; nothing was tested"
    run(path, killed, "--resume", "auto", default_threads=True)
    w_ref, w_res = weights(ref), weights(killed)
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in rows]  # noqa: E731
    assert strip(read_metrics(killed / "metrics.jsonl")) == strip(read_metrics(ref / "metrics.jsonl"))
    assert [p.name for p in list_checkpoints(killed)] == ["step-00000014", "step-00000016"]  # keep_last 2
    assert not list((killed / "checkpoints").glob(".tmp-*"))


def test_resume_argument_errors(tmp_path):
    path = write(tmp_path, SFT)
    proc = run(path, tmp_path / "out", "--resume", str(tmp_path / "nowhere"), check=False)
    assert proc.returncode == 2 and "not a complete checkpoint" in proc.stderr
    partial = tmp_path / "out2" / "checkpoints" / ".tmp-step-00000002"
    partial.mkdir(parents=True)
    assert find_checkpoint("auto", tmp_path / "out2") is None  # a half-written checkpoint is never picked


def test_non_finite_loss_stops_with_the_last_checkpoint_intact(tmp_path):
    cfg = {
        **SFT,
        "optim": {"lr": 1e30, "weight_decay": 0.0, "schedule": "constant", "grad_clip": 0.0},
        "checkpoint": {"every": 1, "keep_last": 5},
    }
    out = tmp_path / "out"
    proc = run(write(tmp_path, cfg), out, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "non-finite SFT loss at step" in proc.stderr and "last checkpoint is intact" in proc.stderr
    steps = [int(p.name.split("-")[1]) for p in list_checkpoints(out)]
    bad = json.loads(proc.stderr.split("non-finite SFT loss at step ")[1].split(" ")[0])
    assert steps and max(steps) == bad  # every step before the bad one was checkpointed; nothing after
    assert not (out / "final").exists()


# --------------------------------------------------------------------------------------------
# Complete checkpoints, fallback, trust
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step SFT run with a checkpoint at every step, all kept: (its config file, its folder)."""
    root = tmp_path_factory.mktemp("run")
    cfg = {
        **SFT,
        "sft": {**SFT["sft"], "stages": [{"pixel_budget": 4096, "steps": 4}]},
        "checkpoint": {"every": 1, "keep_last": 4},
    }
    path = write(root, cfg)
    run(path, root / "out")
    return path, root / "out"


def _copy_of(finished_run, tmp_path) -> tuple[Path, Path]:
    path, out = finished_run
    shutil.copytree(out, tmp_path / "out")
    return path, tmp_path / "out"


def test_resume_auto_skips_damaged_checkpoints_and_a_torn_metrics_line(finished_run, tmp_path):
    path, out = _copy_of(finished_run, tmp_path)
    step4, step3 = out / "checkpoints" / "step-00000004", out / "checkpoints" / "step-00000003"
    assert [verify_checkpoint(p) for p in list_checkpoints(out)] == [None] * 4
    optim = step4 / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = optim.stat().st_size
    optim.write_bytes(optim.read_bytes()[: size // 2])  # what a full disk leaves
    (step3 / "manifest.json").unlink()  # a save killed before its manifest
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a kill mid-line
    assert verify_checkpoint(step4) == (
        f"state/zero_pp_rank_0_mp_rank_00_optim_states.pt has {size // 2} bytes, its "
        f"manifest.json says {size} (truncated?)"
    )
    assert find_checkpoint("auto", out) == out / "checkpoints" / "step-00000002"
    proc = run(path, out, "--resume", "auto")
    skipped4 = "--resume auto: skipped checkpoint step-00000004: state/zero_pp_rank_0_mp_rank_00_optim_states.pt has"
    assert skipped4 in proc.stderr
    assert "--resume auto: skipped checkpoint step-00000003: no manifest.json" in proc.stderr
    assert f"resumed from {out / 'checkpoints' / 'step-00000002'} at step 2" in proc.stdout
    assert "bytes after the last complete line" in proc.stderr
    assert [m["step"] for m in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [verify_checkpoint(p) for p in list_checkpoints(out)] == [None] * 4  # steps 3 and 4 written again
    w_ref, w_res = weights(finished_run[1]), weights(out)
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k


class _Forged:
    """A pickle that runs a command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_forged_checkpoint_runs_nothing(finished_run, tmp_path):
    path, out = _copy_of(finished_run, tmp_path)
    marker = tmp_path / "ran"
    newest = out / "checkpoints" / "step-00000004"
    forged = newest / "state" / "mp_rank_00_model_states.pt"
    torch.save({"module": _Forged(marker)}, forged)
    _write_manifest(newest)  # whoever can write the folder can write its manifest too
    assert verify_checkpoint(newest) is None
    with pytest.raises(CheckpointError, match="refused: not plain checkpoint data .it names posix.system"):
        safe_torch_load(forged)
    proc = run(path, out, "--resume", "auto", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[-1].startswith(f"error: {forged}: refused: not plain checkpoint data"), lines[-1]
    assert not marker.exists()


def test_resume_refuses_another_runs_config_or_a_step_past_the_total(finished_run, tmp_path):
    path, out = _copy_of(finished_run, tmp_path)
    proc = run(path, out, "--resume", "auto", "optim.lr=0.5", "data.size=96", check=False, timeout=120)
    assert proc.returncode == 2
    assert (
        "that run's config differs in data.size (64 -> 96), optim.lr (0.002 -> 0.5); resume with the config it "
        "was written with"
    ) in proc.stderr.strip().splitlines()[-1]
    shorter = write(
        tmp_path,
        {
            **SFT,
            "sft": {**SFT["sft"], "stages": [{"pixel_budget": 4096, "steps": 2}]},
            "checkpoint": {"every": 1, "keep_last": 4},
        },
        "short.yaml",
    )
    proc = run(shorter, out, "--resume", "auto", check=False, timeout=120)
    assert proc.returncode == 2
    assert "the checkpoint is at step 4, past this config's 2 steps" in proc.stderr
    assert (
        check_resumable(
            out / "checkpoints" / "step-00000004",
            load_config(path, ["log.every=3", "checkpoint.keep_last=1"]).to_dict(),
            4,
        )
        == 4
    )
    # a checkpoint written before a key existed: the key at its default is no difference, set otherwise it is
    saved = out / "checkpoints" / "step-00000004" / "config.json"
    older = json.loads(saved.read_text())
    del older["data"]["on_bad_row"]
    saved.write_text(json.dumps(older))
    assert check_resumable(saved.parent, load_config(path).to_dict(), 4) == 4
    with pytest.raises(CheckpointError, match=r"data.on_bad_row \('<absent>' -> 'skip'\)"):
        check_resumable(saved.parent, load_config(path, ["data.on_bad_row=skip"]).to_dict(), 4)
