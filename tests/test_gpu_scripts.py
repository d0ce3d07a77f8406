"""The GPU check scripts (benchmarks/gpu/) stay runnable between GPU sessions: each one's --smoke
mode runs its correctness checks at tiny shapes on the device at hand."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

GPU_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu"
SCRIPTS = sorted(p for p in GPU_DIR.glob("*.py") if p.name != "common.py")


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_gpu_script_smoke(script):
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, str(script), "--smoke"], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "card:" in result.stdout
