"""The fixed benchmark suites, the baselines and the `uniref eval` command."""

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from uniref.synthetic import BASELINES, SUITES, evaluate, split_of, suite_tasks
from uniref.synthetic.bench import format_table, write_grid
from uniref.synthetic.eval import add_eval_parser, main

REPO = Path(__file__).resolve().parents[1]


def test_suites_are_fixed_held_out_and_shaped_like_multicom_bench():
    assert list(SUITES) == ["edit", "compose-2-3", "compose-4-6"]
    first = suite_tasks("compose-4-6", 12)
    again = suite_tasks("compose-4-6", 12)
    assert [t.target.tobytes() for t in first] == [t.target.tobytes() for t in again]
    assert {len(t.images) for t in first} == {4, 5, 6}
    assert {len(t.images) for t in suite_tasks("compose-2-3", 10)} == {2, 3}
    edits = suite_tasks("edit", 10)
    assert {t.spec.kind for t in edits} == set(SUITES["edit"].kinds) and all(len(t.images) == 1 for t in edits)
    for t in first + edits:
        assert t.spec.split == "test" and all(split_of(*k) == "test" for k in t.spec.keyed)
    assert len(suite_tasks("edit")) == SUITES["edit"].cases == 100
    with pytest.raises(ValueError, match="unknown suite"):
        suite_tasks("compose-7-9")


def test_baselines_bracket_the_score_range():
    for suite in SUITES:
        assert evaluate("oracle", suite, limit=10).mean["overall"] >= 0.99
        for name in ("copy_first", "blank", "noise"):
            assert evaluate(name, suite, limit=10).mean["overall"] < 0.1, (name, suite)


def test_callable_models_get_the_pipeline_signature_and_their_outputs_fixed_up():
    calls = []

    def copy_small(images, prompt, height, width):
        calls.append((len(images), prompt, height, width))
        return images[0].resize((32, 32)).convert("L")  # wrong size and mode: fixed up and counted

    r = evaluate(copy_small, "compose-2-3", limit=4)
    assert [c[2:] for c in calls] == [(64, 64)] * 4 and calls[0][1] == r.cases[0]["prompt"]
    assert r.fixes == {"converted_to_rgb": 4, "resized": 4} and r.model == "copy_small"

    def batched(image_lists, prompts, **kw):
        assert isinstance(prompts, list) and len(image_lists) == len(prompts) <= 3
        return [images[0] for images in image_lists]

    rb = evaluate(batched, "edit", limit=7, batch_size=3)
    assert rb.mean == evaluate("copy_first", "edit", limit=7).mean

    with pytest.raises(TypeError, match="expected a PIL image"):
        evaluate(lambda images, prompt: "nope", "edit", limit=1)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate("oracle", "edit", limit=1, batch_size=0)


def test_grid_and_table(tmp_path):
    r = evaluate("copy_first", "compose-4-6", limit=5)
    png = write_grid(r, tmp_path / "g.png", rows=3)
    with Image.open(png) as im:
        kmax = max(len(t.images) for t in r.tasks[:3])
        assert im.height == 3 * 66 + 2 and im.width == (kmax + 2) * 66 + 6
    table = format_table([r])
    assert "integration" in table and "copy_first" in table and table.splitlines()[-1].split()[-1] == "5"


def _model_module(tmp_path: Path) -> Path:
    src = tmp_path / "toy_models.py"
    src.write_text(
        textwrap.dedent(
            """
            def copy_first(images, prompt, **kwargs):
                return images[0]
            NOT_CALLABLE = 3
            """
        )
    )
    return src


def test_eval_cli_writes_reports_and_prints_the_table(tmp_path, capsys):
    src = _model_module(tmp_path)
    out = tmp_path / "out"
    rc = main(["--model", "oracle", "copy_first", f"{src}:copy_first", "--suite", "edit", "compose-4-6",
               "--limit", "3", "--grid-rows", "2", "--out", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "oracle" in printed and "compose-4-6" in printed and "overall" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"oracle", "copy_first", f"{src}:copy_first"}
    assert report["oracle"]["edit"]["overall"] == 1.0 and report["oracle"]["edit"]["cases"] == 3
    same = ("cases", "integration", "consistency", "quality", "overall")
    assert {k: report["copy_first"]["edit"][k] for k in same} == {
        k: report[f"{src}:copy_first"]["edit"][k] for k in same
    }
    suite_json = json.loads((out / "oracle" / "compose-4-6.json").read_text())
    assert suite_json["cases"] == 3 and len(suite_json["per_case"]) == 3 and "K=4" in suite_json["by_group"]
    assert (out / "oracle" / "compose-4-6.png").is_file() and (out / "copy_first" / "edit.png").is_file()


@pytest.mark.parametrize(
    "model, words",
    [
        ("DIR", "not a loadable UniRef edit pipeline folder"),
        ("definitely_not_a_model", "is not a baseline"),
        ("no_such_module_xyz:fn", "cannot import 'no_such_module_xyz'"),
        ("MOD:NOT_CALLABLE", "has no callable named 'NOT_CALLABLE'"),
        ("MOD:missing", "has no callable named 'missing'"),
        ("/no/such/file.py:fn", "no such file"),
    ],
)
def test_eval_cli_refuses_models_it_cannot_run(tmp_path, capsys, model, words):
    model = model.replace("DIR", str(tmp_path)).replace("MOD", str(_model_module(tmp_path)))
    assert main(["--model", model, "--limit", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1


def test_eval_runs_a_saved_pipeline_folder(tmp_path, capsys):
    from uniref.presets import random_edit_pipeline

    random_edit_pipeline("tiny").save_pretrained(tmp_path / "model")
    assert (
        main(
            ["--model", str(tmp_path / "model"), "--suite", "compose-2-3", "--limit", "2", "--out", str(tmp_path / "o")]
        )
        == 0
    )
    report = json.loads((tmp_path / "o" / "report.json").read_text())[str(tmp_path / "model")]
    assert report["compose-2-3"]["cases"] == 2
    assert 0.0 <= report["compose-2-3"]["overall"] <= 1.0


def test_eval_subcommand_plugs_into_a_parent_cli(tmp_path):
    parser = argparse.ArgumentParser(prog="uniref")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", "--model", "blank", "--suite", "edit", "--limit", "2", "--out", str(tmp_path)])
    assert args.func(args) == 0 and (tmp_path / "blank" / "edit.json").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--model", "blank", "--suite", "nope"])


def test_eval_runs_as_a_module(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "uniref.synthetic.eval", "--model", "oracle", "--suite", "compose-2-3",
         "--limit", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "compose-2-3" in proc.stdout and (tmp_path / "report.json").is_file()
    assert set(BASELINES) >= {"oracle", "copy_first", "blank", "noise"}
