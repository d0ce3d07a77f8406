"""The README results command (`scripts/readme_results.py`) on a tiny random pipeline, and the paired
bootstrap of `uniref.synthetic.bench` it reports with."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from uniref.presets import random_edit_pipeline
from uniref.synthetic.bench import paired_bootstrap

ROOT = Path(__file__).resolve().parents[1]
# a repository script, not a module of the package: loaded from its file
_spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
readme_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_results)
END, START = readme_results.END, readme_results.START
main, replace_block = readme_results.main, readme_results.replace_block


def test_paired_bootstrap():
    a = np.linspace(0, 1, 50)
    mean, lo, hi = paired_bootstrap(a, a + 0.25)
    assert mean == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    b = a + rng.normal(0.1, 0.2, 50)
    mean, lo, hi = paired_bootstrap(a, b)
    assert lo < mean < hi and hi - lo < 0.2


def test_results_command_writes_tables_and_the_readme_block(tmp_path):
    pipe = random_edit_pipeline("tiny", seed=0)
    pipe.save_pretrained(tmp_path / "model")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{START}\nold\n{END}\nafter\n")
    args = [
        "--model",
        str(tmp_path / "model"),
        "--sft",
        str(tmp_path / "model"),
        "--out",
        str(tmp_path / "out"),
        "--readme",
        str(readme),
        "--steps",
        "2",
        "--limit",
        "2",
        "--batch",
        "2",
        "--self-cases",
        "2",
        "--example",
        str(ROOT / "examples" / "compose"),
        "--figure",
        str(tmp_path / "fig.png"),
    ]
    assert main(args) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("# x\n\nbefore\n") and text.endswith(f"{END}\nafter\n")
    for heading in ("ToyBench", "SFT vs SFT + MSGRPO", "SELF vs per-image budgets"):
        assert heading in text
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = data["self_vs_per_image"]
    assert [r[0] for r in rows] == [k for k in range(1, 7) for _ in range(2)]
    tokens = {(k, mode): t for k, mode, t, _ in rows}
    assert tokens[(6, "per image")] > 3 * tokens[(6, "global (SELF)")]  # per-image grows with K, SELF stays bounded
    assert max(tokens[(k, "global (SELF)")] for k in range(2, 7)) <= tokens[(2, "per image")]
    same = [row[3] for row in data["ablation"]]
    assert all(d.startswith("+0.000 [+0.000, +0.000]") for d in same)  # the same model twice: no difference
    from PIL import Image

    assert Image.open(tmp_path / "fig.png").size == (5 * 136 - 8, 128)  # 3 references, output, answer
    with pytest.raises(ValueError, match="has no <!-- uniref-results:start -->"):
        replace_block(tmp_path / "model" / "model_index.json", "x")
