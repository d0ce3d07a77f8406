"""The `uniref` command as a package: the command registry, `uniref train`, the deprecated import paths, and
what each command imports (`uniref --help`, `uniref plan` and bad requests never load diffusers,
transformers or deepspeed)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from uniref.cli import build_parser, command_names, main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("diffusers", "transformers", "deepspeed")


def test_every_module_of_the_package_is_a_command():
    assert command_names() == ["data", "demo", "edit", "eval", "info", "lora", "plan", "train"]
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == command_names()


def test_train_takes_the_arguments_of_training_run_py():
    from uniref.training.cli import _parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    train = sub.choices["train"]
    assert {s for a in train._actions for s in a.option_strings} == {
        s for a in _parser()._actions for s in a.option_strings
    }


def test_train_reports_a_bad_config_as_run_py_does(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    missing = str(tmp_path / "missing.yaml")
    runs = [
        subprocess.run(cmd + ["--config", missing], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        for cmd in ([sys.executable, "-m", "uniref.cli", "train"], [sys.executable, "training/run.py"])
    ]
    assert [r.returncode for r in runs] == [2, 2], [r.stderr for r in runs]
    assert runs[0].stderr == runs[1].stderr and "missing.yaml" in runs[0].stderr


def test_train_help_is_uniref_train(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: uniref train") and "--config" in out and "--resume" in out


@pytest.mark.parametrize(
    "old, new, names",
    [
        ("uniref.edit_cli", "uniref.cli.edit", ["load_image", "write_image_atomic", "run_edit", "EditInputError"]),
        ("uniref.synthetic.eval", "uniref.cli.eval", ["resolve_model", "run_eval", "main", "ModelSpecError"]),
    ],
)
def test_old_import_paths_work_and_warn(old, new, names):
    import importlib

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)
    target = importlib.import_module(new)
    assert all(getattr(module, n) is getattr(target, n) for n in names)
    adder = "add_edit_parser" if old.endswith("edit_cli") else "add_eval_parser"
    assert getattr(module, adder) is target.add_parser


def _modules_after(code: str, tmp_path) -> dict:
    """Runs ``code`` in a fresh interpreter; returns which HEAVY modules it imported and its exit status."""
    script = (
        "import json, sys\nrc = None\ntry:\n"
        + "".join(f"    {line}\n" for line in code.splitlines())
        + "except SystemExit as exc:\n    rc = exc.code\n"
        + f"print(json.dumps({{'rc': rc, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [
        None,  # import uniref alone
        ["--help"],
        ["plan"],
        ["edit", "--help"],
        ["eval", "--help"],
        ["train", "--help"],
        ["info"],
        ["edit", "--image", "missing.png", "--prompt", "p", "--output", "o.png"],
        ["edit", "--image", "missing.png", "--prompt", "p", "--output", "o.png", "--steps", "0"],
        ["edit", "--image", "IMG", "--prompt", "p", "--output", "o.png", "--model", "not_a_folder"],
        ["edit", "--image", "IMG", "--prompt", "p", "--output", "o.unknown"],
        ["eval", "--model", "nope", "--out", "o"],
        ["eval", "--model", "blank", "--grid-rows", "0"],
        ["plan", "--target", "100000x100000"],
    ],
)
def test_commands_import_no_heavy_package(argv, tmp_path):
    import numpy as np
    import PIL.Image

    PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "img.png")
    if argv is None:
        code = "import uniref"
    else:
        argv = [str(tmp_path / "img.png") if a == "IMG" else a for a in argv]
        code = f"from uniref.cli import main\nrc = main({argv!r})"
    got = _modules_after(code, tmp_path)
    assert got["heavy"] == [], (argv, got)
    if argv and argv[-1] != "--help" and argv[0] != "info" and argv != ["plan"]:
        assert got["rc"] == 2, (argv, got)


@pytest.mark.parametrize("preset, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_waits_passively_unless_the_user_says_otherwise(preset, expected, tmp_path):
    """Spin-waiting OpenMP workers make sampling 10-40x slower on a busy machine
    (benchmarks/test_sampling_load.py); uniref sets passive waiting before torch loads the runtime."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = "import os\nimport sys\nimport uniref.cli\nprint(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.stdout.split() == [expected, "True"], proc.stderr


def test_uniref_train_runs_a_job(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "uniref.cli", "train", "--config", "training/configs/tiny_sft.yaml",
         "--output", str(tmp_path / "run"), "sft.stages=[{pixel_budget: 4096, steps: 2}]", "checkpoint.every=2"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "final").is_dir()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 2
