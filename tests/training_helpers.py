"""What the training tests share: small SFT / MSGRPO configs and `training/run.py` run as users run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from uniref.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "training" / "run.py"
CONFIGS = sorted((ROOT / "training" / "configs").glob("*.yaml"))

SFT = {
    "task": "sft",
    "seed": 3,
    "model": {"preset": "tiny", "train_text_encoder": True},
    "data": {"size": 64, "num_refs": [2, 3]},
    "optim": {"lr": 2e-3, "weight_decay": 0.0, "schedule": "constant"},
    "deepspeed": {"zero_stage": 2, "micro_batches_per_step": 2},
    "sft": {"stages": [{"pixel_budget": 4096, "steps": 4}, {"pixel_budget": 8192, "steps": 4}], "token_budget": 160},
    "checkpoint": {"every": 2, "keep_last": 2},
    "log": {"progress": False, "plot": False},
}

MSGRPO = {
    "task": "msgrpo",
    "seed": 1,
    "model": {"preset": "tiny"},
    "data": {"size": 64, "num_refs": [2, 3]},
    "optim": {"lr": 1e-3, "weight_decay": 0.0, "schedule": "constant"},
    "deepspeed": {"zero_stage": 2},
    "msgrpo": {
        "phases": [{"data": "compose", "steps": 3}, {"data": "edit", "steps": 2}],
        "prompts_per_step": 2,
        "group_size": 4,
        "num_steps": 6,
        "sde_window": [1, 4],
        "pixel_budget": 8192,
    },
    "checkpoint": {"every": 5, "keep_last": 1},
    "log": {"progress": False, "plot": False},
}


def env(default_threads: bool = False, **extra) -> dict:
    """The environment of a run: one OpenMP thread per process (the machine is shared) unless
    ``default_threads`` (the run then uses as many as OpenMP picks, as a user's run does)."""
    e = dict(os.environ)
    e.pop("RANK", None)
    if default_threads:
        e.pop("OMP_NUM_THREADS", None)
    else:
        e["OMP_NUM_THREADS"] = "1"
    e.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), DS_ACCELERATOR="cpu", **extra)
    return e


def write(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(
    cfg_path: Path,
    out: Path,
    *overrides: str,
    procs: int = 1,
    check: bool = True,
    timeout: int = 600,
    env_extra: dict | None = None,
    default_threads: bool = False,
):
    """``training/run.py --config cfg_path --output out *overrides`` in 1 process or under the deepspeed launcher."""
    if procs == 1:
        cmd = [sys.executable, str(RUN)]
    else:
        # the `deepspeed` launcher users run (its console script beside this interpreter when installed)
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [str(launcher)] if launcher.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]
        cmd += ["--num_gpus", str(procs), "--master_port", str(29500 + os.getpid() % 1000), str(RUN)]
    cmd += ["--config", str(cfg_path), "--output", str(out), *overrides]
    proc = subprocess.run(
        cmd, env=env(default_threads, **(env_extra or {})), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def weights(out: Path) -> dict[str, torch.Tensor]:
    """The exported transformer's and text encoder's tensors (``text.`` prefix for the latter)."""
    w = load_file(out / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    text = load_file(out / "final" / "text_encoder" / "diffusion_pytorch_model.safetensors")
    w.update({f"text.{k}": v for k, v in text.items()})
    return w


def metric(out: Path, key: str) -> list[float]:
    return [m[key] for m in read_metrics(out / "metrics.jsonl")]
