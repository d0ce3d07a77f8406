"""The README's fresh-machine commands are what CI runs."""

import re
import subprocess
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [next(line for line in b.splitlines() if line and not line.startswith("#")) for b in blocks[:2]]


def test_readme_has_two_fresh_machine_commands_first():
    main_job, tests = readme_commands()
    assert "pip install" in main_job and "uniref" in main_job.split("&&")[-1]
    assert "pip install" in tests and tests.split("&&")[-1].strip().startswith("pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    _, tests = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_readme_python_examples_run():
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        exec(compile(block, "README.md", "exec"), {})


def test_readme_main_job_runs(tmp_path):
    """The main job's command after the install: `uniref edit` with the embedded default model."""
    main_job, _ = readme_commands()
    edit = main_job.split("&&")[-1].strip()
    assert edit.startswith("uniref edit") and "--model" not in edit and "--output edited.png" in edit
    out = tmp_path / "edited.png"
    proc = subprocess.run(
        ["bash", "-c", edit.replace("--output edited.png", f"--output {out}")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (64, 64)
