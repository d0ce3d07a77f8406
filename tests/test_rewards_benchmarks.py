"""Benchmark runners on tiny fabricated copies of each benchmark's layout, judged by a real local server."""

import json
import math

import pytest
from PIL import Image

from uniref import rewards
from uniref.rewards.benchmarks import FORMATS, load_cases, parse_banana, run_benchmark
from uniref.testing.judge_server import JudgeServer

pytest.importorskip("httpx")


def _img(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 20), colour).save(path)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def fabricate(fmt, root):
    """Three cases; the last lacks one input image."""
    if fmt == "mico":
        rows = []
        for i in range(3):
            for j in range(2):
                if (i, j) != (2, 1):
                    _img(root / f"mico_bench_hoi/{i}/{j}.png", (40 * i, 90 * j, 10))
            _img(root / f"mico_bench_hoi/{i}/reference.jpg")
            rows.append(
                {
                    "idx": i,
                    "input": [f"mico_bench_hoi/{i}/0.png", f"mico_bench_hoi/{i}/1.png"],
                    "reference": f"mico_bench_hoi/{i}/reference.jpg",
                    "Task": "HOI",
                    "prompt": f"a person in image 1 holds the object in image 2 ({i})",
                    "human_indices": [0],
                }
            )
        _jsonl(root / "mico_bench_hoi.jsonl", rows)
        (root / "weights").mkdir()
        (root / "weights/mico_bench_hoi.json").write_text(json.dumps({"0": 0.5}))
    elif fmt == "omnicontext":
        rows = []
        for i in range(3):
            if i != 2:
                _img(root / f"images/{i}_0.png", (50 * i, 0, 0))
            _img(root / f"images/{i}_1.png")
            rows.append(
                {
                    "key": f"k{i}",
                    "task_type": "multiple_object" if i else "single_character",
                    "instruction": f"put them together ({i})",
                    "input_images": [f"images/{i}_0.png", f"images/{i}_1.png"],
                }
            )
        _jsonl(root / "omnicontext.jsonl", rows)
    elif fmt == "gedit":
        rows = []
        for i in range(3):
            if i != 2:
                _img(root / f"input/{i}.png", (0, 60 * i, 0))
            rows.append(
                {
                    "key": f"g{i}",
                    "task_type": "color_alter",
                    "instruction": f"make it blue ({i})",
                    "instruction_language": "en" if i % 2 == 0 else "cn",
                    "input_image": f"input/{i}.png",
                }
            )
        _jsonl(root / "gedit.jsonl", rows)
    else:
        for i in range(3):
            (root / "object_2").mkdir(parents=True, exist_ok=True)
            (root / f"object_2/{i:03d}_prompt.txt").write_text(f"place both objects on a desk ({i})\n")
            if i != 2:  # the third case has no reference image at all
                _img(root / f"object_2/{i:03d}_1.jpg")
                _img(root / f"object_2/{i:03d}_2.png", (0, 0, 200))


def editor(prompt, references):
    return Image.new("RGB", (32, 32), (len(prompt) % 255, len(references) * 40, 90))


@pytest.fixture(scope="module")
def server():
    with JudgeServer() as s:
        yield s


@pytest.mark.parametrize("fmt", FORMATS)
def test_runner_writes_cases_table_grid_and_skips_the_missing_image(fmt, tmp_path, server):
    data = tmp_path / "data"
    fabricate(fmt, data)
    judge = rewards.load("vlm_judge", base_url=server.url("ok"), model="judge-x", retries=0)
    out = tmp_path / "run"
    summary = run_benchmark(fmt, data, editor, judge, out)
    assert summary["cases"] == 3 and summary["skipped"] == 1
    assert summary["judge"] == {"model": "judge-x", "endpoint": server.url("ok") + "/chat/completions"}
    cases = json.loads((out / "cases.json").read_text())["case_results"]
    assert [c["status"] for c in cases] == ["scored", "scored", "skipped"]
    assert "missing input image" in cases[2]["error"] or "no references" in cases[2]["error"]
    for c in cases[:2]:
        assert (out / "images" / c["output"]).is_file() and c["judge"]["model"] == "judge-x"
    table = (out / "table.md").read_text()
    assert "judge-x" in table.splitlines()[0] and server.url("ok") in table.splitlines()[0]
    assert "judge-x" in (out / "table.csv").read_text()
    assert Image.open(out / "grid.png").size[1] == 2 * 128
    s = cases[0]["scores"]
    if fmt == "mico":
        assert s["weight"] == 0.5 and cases[1]["scores"]["weight"] == 1.0
        assert s["final"] == pytest.approx(0.5 * math.sqrt(s["sc"] * s["pq"]))
        assert s["sc"] == pytest.approx(math.sqrt(s["sc_prompt_following"] * s["sc_subject_resemblance"]))
        overall = summary["rows"][-1]
        assert overall[0] == "overall" and overall[2] == 2 and overall[3] == 1
        assert overall[1] == pytest.approx(10 * (s["final"] + cases[1]["scores"]["final"]) / 2, abs=0.01)
    elif fmt == "gedit":
        assert s["O"] == pytest.approx(math.sqrt(s["SC"] * s["PQ"]))
        assert cases[0]["output"] == "fullset/color_alter/en/g0.png"
    elif fmt == "omnicontext":
        assert s["Overall"] == pytest.approx(math.sqrt(s["PF"] * s["SC"]))
    else:
        assert s["Average"] == pytest.approx(sum(v for k, v in s.items() if k != "Average") / 5)
        assert cases[0]["output"] == "object_2/000_generated.png"


def test_rescoring_a_run_sends_nothing_with_a_cache(tmp_path, server):
    data = tmp_path / "data"
    fabricate("gedit", data)
    kw = {"base_url": server.url("ok"), "model": "m", "cache_dir": str(tmp_path / "cache")}
    first = run_benchmark("gedit", data, editor, rewards.load("vlm_judge", **kw), tmp_path / "a")
    before = server.requests
    again = run_benchmark("gedit", data, editor, rewards.load("vlm_judge", **kw), tmp_path / "b")
    assert server.requests == before and first["rows"] == again["rows"]


def test_layout_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark format 'nope'"):
        load_cases("nope", tmp_path)
    with pytest.raises(ValueError, match="mico_bench_"):
        load_cases("mico", tmp_path)
    _jsonl(tmp_path / "x.jsonl", [{"key": 1}])
    with pytest.raises(ValueError, match=r"x.jsonl line 1 lacks \['task_type'"):
        load_cases("omnicontext", tmp_path)


def test_parse_banana():
    text = (
        "Reasoning: ok\nInstruction Alignment: 7.\nReference Consistency: 5\nBackground-Subject Match: 4.\n"
        "Physical Realism: 6.\nVisual Quality: 8."
    )
    assert parse_banana(text) == [7, 5, 4, 6, 8]
    with pytest.raises(rewards.JudgeReplyError, match="Visual Quality"):
        parse_banana(text.replace("Visual Quality: 8.", ""))


def _png(colour):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (20, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["gedit", "omnicontext"])
def test_the_hugging_face_parquet_copy_with_images_in_the_cells(fmt, tmp_path, server):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    def cell(colour):
        return {"bytes": _png(colour), "path": None}

    if fmt == "gedit":
        rows = [
            {
                "key": f"g{i}",
                "task_type": "subject-add",
                "instruction": f"add a cat ({i})",
                "instruction_language": "en",
                "input_image": cell((9, 9, 9 * i)) if i < 2 else None,
            }
            for i in range(3)
        ]
    else:
        rows = [
            {
                "key": f"k{i}",
                "task_type": "multiple_object",
                "instruction": f"both ({i})",
                "input_images": [cell((9 * i, 0, 0)), cell((0, 9, 0))] if i < 2 else [cell((0, 0, 9)), None],
            }
            for i in range(3)
        ]
    (tmp_path / "data/data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data/data/train-00000-of-00001.parquet")
    judge = rewards.load("vlm_judge", base_url=server.url("ok"), model="judge-x", retries=0)
    summary = run_benchmark(fmt, tmp_path / "data", editor, judge, tmp_path / "run")
    assert summary["cases"] == 3 and summary["skipped"] == 1
    cases = json.loads((tmp_path / "run/cases.json").read_text())["case_results"]
    assert "train-00000-of-00001.parquet row 2" in cases[2]["error"]
    assert all(r.startswith("data/train-00000-of-00001.parquet row 0") for r in cases[0]["references"])


def test_uniref_eval_bench_runs_a_model_against_a_served_judge(tmp_path, server):
    """``uniref eval --bench gedit --data ... --judge URL --model file.py:fn``: the runner behind the CLI."""
    import subprocess
    import sys

    fabricate("gedit", tmp_path / "gedit")
    (tmp_path / "model.py").write_text(
        "from PIL import Image\n\ndef fn(images, prompt, **kw):\n    return images[0].convert('RGB')\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "uniref.cli",
        "eval",
        "--bench",
        "gedit",
        "--data",
        str(tmp_path / "gedit"),
        "--judge",
        server.url("ok"),
        "--judge-model",
        "test-judge",
        "--model",
        f"{tmp_path / 'model.py'}:fn",
        "--out",
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        "judge test-judge at" in proc.stdout and len(list((tmp_path / "out").glob("*model.py_fn/gedit/table.md"))) == 1
    )
    down = subprocess.run(
        cmd[:-2] + ["--out", str(tmp_path / "out2"), "--judge", server.url("fail")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert down.returncode == 2 and down.stderr.startswith("uniref eval: error:") and "Traceback" not in down.stderr
    missing = subprocess.run(cmd[:6] + ["--model", "copy_first"], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "--bench needs --data FOLDER and --judge" in missing.stderr
