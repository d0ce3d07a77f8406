"""Run logs: one JSON object per logged step (``metrics.jsonl``) and a PNG of the curves at the end."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

__all__ = ["MetricsLog", "plot_curves", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _complete_rows(path: Path) -> tuple[list[dict], int]:
    """The rows of ``path`` up to its last complete line, and how many bytes follow them (a line torn by a
    kill or a full disk, or anything unreadable after it)."""
    raw = path.read_bytes() if path.is_file() else b""
    rows, good = [], 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            break
        if row is not None:
            rows.append(row)
        good += len(line)
    return rows, len(raw) - good


class MetricsLog:
    """Appends metrics as JSON lines (rank 0 only). On resume, lines past the checkpoint's step -- logged
    by the interrupted run after its last checkpoint -- are dropped, so the log reads like one run, and a
    torn last line is cut back to the last complete one (with a warning)."""

    def __init__(self, path: str | Path, enabled: bool = True, resume_step: int = 0):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step:
            rows, torn = _complete_rows(self.path)
            if torn:
                self.warn(f"{self.path}: cut {torn} bytes after the last complete line (a torn write)")
            kept = [m for m in rows if m.get("step", 0) <= resume_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        os.replace(tmp, self.path)

    def write(self, metrics: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")

    def info(self, message: str) -> None:
        if self.enabled:
            print(f"[uniref.training] {message}", flush=True)

    def warn(self, message: str) -> None:
        if self.enabled:
            print(f"[uniref.training] warning: {message}", file=sys.stderr, flush=True)


def plot_curves(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Loss / reward / grad-norm curves against the step, one panel each; None when nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        return None
    keys = [
        k
        for k in ("loss", "reward/weighted", "reward/overall", "grad_norm", "kl", "clip_fraction")
        if any(isinstance(r.get(k), (int, float)) for r in rows)
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts))
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return Path(png_path)
