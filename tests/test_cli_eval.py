"""`uniref eval`'s hostile inputs: where reports go, numbers out of range, models that cannot be imported or
return something other than an image, an --out that is a file. Each is one line on stderr with exit 2."""

from pathlib import Path

import pytest

from uniref.cli import main


def _one_line(capsys, rc, words):
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("uniref eval: error: "), err
    assert words in err, err


def test_a_model_named_dotdot_writes_inside_out(tmp_path, capsys, monkeypatch):
    from uniref.presets import random_edit_pipeline

    (tmp_path / "model").mkdir()
    random_edit_pipeline("tiny").save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "model" / "sub")  # ".." is the model folder
    assert main(["eval", "--model", "..", "--suite", "edit", "--limit", "1", "--out", "out"]) == 0
    out = tmp_path / "model" / "sub" / "out"
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.json"]
    assert sorted(p.name for p in (out / "model").iterdir()) == ["edit.json", "edit.png"]
    assert not list((tmp_path / "model" / "sub").glob("edit.*"))


@pytest.mark.parametrize("flag", ["--grid-rows", "--limit", "--batch-size"])
def test_counts_must_be_positive(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", "blank", flag, "0", "--out", str(tmp_path)])
    _one_line(capsys, exc.value.code, f"{flag} must be >= 1, got 0")


def test_out_naming_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    rc = main(["eval", "--model", "blank", "--limit", "1", "--out", str(tmp_path / "taken")])
    _one_line(capsys, rc, "is a file; give a folder")


@pytest.mark.parametrize(
    "spec, words",
    [
        ("..:f", "'..' is a relative module name"),
        (".mod:f", "'.mod' is a relative module name"),
        ("FILE:run", "cannot import"),
    ],
)
def test_module_specs_that_cannot_be_imported(spec, words, tmp_path, capsys):
    bad = tmp_path / "boom.py"
    bad.write_text("raise RuntimeError('the module fails at import')\n")
    rc = main(["eval", "--model", spec.replace("FILE", str(bad)), "--limit", "1", "--out", str(tmp_path / "o")])
    _one_line(capsys, rc, words)


@pytest.mark.parametrize(
    "returned, words", [("None", "returned NoneType"), ("np.zeros((8, 8, 3))", "returned ndarray")]
)
def test_models_returning_non_images(returned, words, tmp_path, capsys):
    src = tmp_path / "bad_model.py"
    src.write_text(f"import numpy as np\n\n\ndef run(images, prompt, **kw):\n    return {returned}\n")
    rc = main(["eval", "--model", f"{src}:run", "--suite", "edit", "--limit", "1", "--out", str(tmp_path / "o")])
    _one_line(capsys, rc, words)
    assert not Path(tmp_path / "o" / "report.json").exists()


def test_a_bad_model_leaves_no_out_folder(tmp_path, capsys):
    rc = main(["eval", "--model", "no_such_baseline", "--out", str(tmp_path / "o")])
    _one_line(capsys, rc, "is not a baseline")
    assert not (tmp_path / "o").exists()


def test_a_nan_pipeline_is_not_scored(tmp_path, capsys):
    import torch

    from uniref.presets import random_edit_pipeline

    pipe = random_edit_pipeline("tiny")
    with torch.no_grad():
        next(pipe.transformer.parameters()).fill_(float("nan"))
    pipe.save_pretrained(tmp_path / "nan_model")
    rc = main(
        [
            "eval",
            "--model",
            str(tmp_path / "nan_model"),
            "--suite",
            "edit",
            "--limit",
            "1",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the pipeline's progress bar
    assert rc == 1 and err.startswith("uniref eval: error: --model ") and "latents are not finite" in err, err
    assert not (tmp_path / "o" / "report.json").exists()
