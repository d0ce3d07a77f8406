"""`uniref demo`: the app's functions on the embedded default model, and the command as a real server.

The browser test (upload, run, download, error message in the page) is tests/test_demo_browser.py.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from uniref import plan_reference_sizes
from uniref.demo import DemoError, edit, load_references, plan_table, run_synthetic, sample_synthetic, synthetic_strip

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "compose"
PROMPT = (EXAMPLE / "prompt.txt").read_text().strip()
SERVER_START_S = 240  # loading torch, diffusers, Gradio and the model on a busy 2-core machine
needs_gradio = pytest.mark.skipif(
    importlib.util.find_spec("gradio") is None, reason="needs Gradio: pip install -e '.[demo]' (or '.[test]')"
)


@pytest.fixture(scope="module")
def pipe():
    from uniref import UniRefEditPipeline

    p = UniRefEditPipeline.from_pretrained()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def refs():
    loaded, errors = load_references([EXAMPLE / f"ref{k}.png" for k in (1, 2, 3)])
    assert errors == []
    return [img for _, img in loaded]


# --------------------------------------------------------------------------------------------
# The plan table
# --------------------------------------------------------------------------------------------


def test_plan_table_is_the_planner_and_token_count_of_both_modes(pipe, refs):
    budget = pipe.default_pixel_budget
    m = pipe.vae_scale_factor * pipe.patch_size
    table = plan_table(pipe, refs, budget)
    assert table.errors == []
    assert len(table.rows) == len(refs) + 2  # references, output, total
    sizes = [(img.height, img.width) for img in refs]
    target = (64, 64)  # the default model's automatic output for a 64x64 first reference
    for mode, col in (("global", 2), ("per_image", 4)):
        plan = plan_reference_sizes(sizes, budget, multiple=m, mode=mode)
        for k, (h, w) in enumerate(plan):
            assert table.rows[k][0] == f"ref {k + 1}" and table.rows[k][1] == f"{sizes[k][0]}x{sizes[k][1]}"
            assert table.rows[k][col : col + 2] == [f"{h}x{w}", str((h // m) * (w // m))]
        assert table.rows[-2][col : col + 2] == ["64x64", str((64 // m) ** 2)]
        total = sum((h // m) * (w // m) for h, w in [target, *plan])
        assert table.tokens[mode] == total and table.rows[-1][col + 1] == str(total)
        assert table.rows[-1][col] == f"{sum(h * w for h, w in plan)} px"
    # SELF keeps the references within the one budget; per image, each gets it
    assert sum(int(c.split("x")[0]) * int(c.split("x")[1]) for c in (r[2] for r in table.rows[:3])) <= budget
    assert table.tokens["global"] < table.tokens["per_image"]


def test_plan_table_follows_the_output_size(pipe, refs):
    table = plan_table(pipe, refs, pipe.default_pixel_budget, height=64, width=96)
    assert table.rows[-2][2:4] == ["64x96", str(8 * 12)]


def test_plan_table_names_too_many_references_for_the_budget(pipe, refs):
    table = plan_table(pipe, refs, 150)  # 8x8 tiles: a global budget needs >= 3 * 64 for 3 references
    assert table.tokens["global"] is None and table.tokens["per_image"] is not None
    assert len(table.errors) == 1
    assert table.errors[0].startswith("SELF global:")
    assert "raise the pixel budget or remove references" in table.errors[0]
    assert table.rows[0][2:4] == ["-", "-"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"pixel_budget": "lots"}, "pixel budget must be a whole number"),
        ({"pixel_budget": 10}, "pixel budget must be in 64.."),
        ({"pixel_budget": 16384.5}, "pixel budget must be a whole number"),
        ({"pixel_budget": 16384, "height": 60, "width": 64}, "output height 60 must be a multiple of 8"),
        ({"pixel_budget": 16384, "height": 64, "width": 0}, "give both height and width"),
        ({"pixel_budget": 16384, "height": 65536, "width": 65536}, "megapixels"),
    ],
)
def test_plan_table_rejects_bad_numbers_in_one_line(pipe, refs, kwargs, message):
    with pytest.raises(DemoError, match=message) as info:
        plan_table(pipe, refs, **kwargs)
    assert "\n" not in str(info.value)


def test_plan_table_without_references(pipe):
    with pytest.raises(DemoError, match="no references yet"):
        plan_table(pipe, [], 16384)


# --------------------------------------------------------------------------------------------
# Uploads
# --------------------------------------------------------------------------------------------


def test_load_references_keeps_order_and_reports_bad_files_by_name(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    huge = tmp_path / "huge.png"
    Image.new("1", (8193, 8192)).save(huge)  # 67.1 megapixels, above the 64-megapixel guard
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((EXAMPLE / "ref2.png").read_bytes()[:-40])
    paths = [EXAMPLE / "ref2.png", corrupt, empty, huge, truncated, tmp_path / "gone.png", EXAMPLE / "ref1.png"]
    loaded, errors = load_references(paths)
    assert [name for name, _ in loaded] == ["ref2.png", "ref1.png"]
    assert all(img.mode == "RGB" for _, img in loaded)
    assert errors == [
        "corrupt.png: is not an image file Pillow can read",
        "empty.png: is empty (0 bytes)",
        "huge.png: is 8193x8192 pixels, too large to decode safely (limit 67 megapixels; decompression-bomb guard)",
        errors[3],
        "gone.png: the uploaded file is gone; upload it again",
    ]
    assert errors[3].startswith("truncated.png: is truncated or corrupt")
    assert all(str(tmp_path) not in e for e in errors)  # the file's name, not the server's upload path


def test_load_references_sees_new_content_at_the_same_path(tmp_path):
    path = tmp_path / "ref.png"
    Image.new("RGB", (32, 48), (255, 0, 0)).save(path)
    ((_, first),) = load_references([path])[0]
    Image.new("RGB", (40, 40), (0, 0, 255)).save(path)
    os.utime(path, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    ((_, second),) = load_references([path])[0]
    assert first.size == (32, 48) and second.size == (40, 40)


# --------------------------------------------------------------------------------------------
# Runs on the embedded default model
# --------------------------------------------------------------------------------------------


def test_edit_runs_the_default_model(pipe, refs):
    out = edit(pipe, refs, PROMPT, steps=3, guidance=1.0, seed=7)
    assert out.mode == "RGB" and out.size == (64, 64)
    again = edit(pipe, refs, PROMPT, steps=3, guidance=1.0, seed=7)
    assert out.tobytes() == again.tobytes()
    wide = edit(pipe, refs, PROMPT, "blurry", "per image", 4096, 64, 96, steps=2, guidance=2.0, seed=0)
    assert wide.size == (96, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": "   "}, "the prompt is empty"),
        ({"images": []}, "no references"),
        ({"pixel_budget": 150}, "pixel budget 150: .* too small for 3 reference.*; raise it or remove references"),
        ({"steps": 0}, "steps must be in 1..1000"),
        ({"guidance": 0.5}, "guidance must be a finite number >= 1"),
        ({"guidance": "strong"}, "guidance must be a number >= 1"),
        ({"seed": -1}, "seed must be in 0.."),
        ({"budget_mode": "both"}, "budget mode must be one of SELF global, per image"),
        ({"height": 64, "width": 70}, "output width 70 must be a multiple of 8"),
    ],
)
def test_edit_rejects_bad_requests_in_one_line(pipe, refs, kwargs, message):
    args = {"images": refs, "prompt": PROMPT, "steps": 1, **kwargs}
    with pytest.raises(DemoError, match=message) as info:
        edit(pipe, args.pop("images"), args.pop("prompt"), **args)
    assert "\n" not in str(info.value)


def test_synthetic_task_run_and_scores(pipe, tmp_path):
    task, out, scores = run_synthetic(pipe, "compose", 3, 5, "test", steps=2, guidance=1.0)
    assert len(task.images) == 3 and out.size == task.target.size == (64, 64)
    assert set(scores) == {"integration", "consistency", "quality", "overall"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    strip = Image.open(synthetic_strip(task, out, tmp_path / "strip.png"))
    assert strip.width > strip.height  # references | output | exact answer, in one row
    edit_task = sample_synthetic("recolor", 4, 1)  # the reference count applies to compositions only
    assert len(edit_task.images) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (("paint", 3, 0), "task kind must be one of"),
        (("compose", 7, 0), "references must be in 2..6"),
        (("compose", 3, -2), "task seed must be in 0.."),
        (("compose", 3, 0, "holdout"), "split must be one of train, val, test"),
    ],
)
def test_sample_synthetic_rejects_bad_fields(args, message):
    with pytest.raises(DemoError, match=message):
        sample_synthetic(*args)


# --------------------------------------------------------------------------------------------
# The page's handlers (the functions Gradio calls), without a server
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def handlers(pipe):
    from uniref.demo import build_app

    app = build_app(pipe, "the embedded default model", 1.0)
    assert app.analytics_enabled is False and os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    return {f.name: f.fn for f in app.fns.values()}


@needs_gradio
def test_page_plan_shows_both_modes_and_names_bad_uploads(handlers, tmp_path):
    paths = [str(EXAMPLE / f"ref{k}.png") for k in (1, 2, 3)]
    table, previews, note, message = handlers["plan_view"](paths, 16384, 0, 0)
    assert list(table["image"]) == ["ref 1", "ref 2", "ref 3", "output", "total"]
    assert [caption for _, caption in previews] == ["image 1", "image 2", "image 3"]
    # the planner's numbers for the three 64 px references (per image: 128^2 each, diffusers' 32-px rounding)
    assert "**320** tokens with SELF's global budget, **800** with a budget per image" in note
    assert message == ""
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"garbage")
    table, previews, note, message = handlers["plan_view"]([str(corrupt)] + paths, 150, 0, 0)
    assert message == "**Error:** corrupt.png: is not an image file Pillow can read  "
    assert len(previews) == 3 and "**Plan:** SELF global: pixel_budget=150 is too small" in note
    _, _, note, _ = handlers["plan_view"](paths, "many", 0, 0)
    assert note == "**Plan:** pixel budget must be a whole number, got 'many'"


@needs_gradio
def test_page_run_shows_output_download_gallery_or_one_line(handlers):
    paths = [str(EXAMPLE / f"ref{k}.png") for k in (1, 2, 3)]
    args = [paths, PROMPT, "", "SELF global", 16384, 0, 0, 2, 1.0, 3]
    image, path, gallery, results, message = handlers["run"](*args, [])
    assert image.size == (64, 64) and Image.open(path).format == "PNG"
    assert Image.open(path).tobytes() == image.tobytes()
    assert gallery == results and len(results) == 1 and message.startswith("Done: 64x64, 2 steps, seed 3")
    message = handlers["run"](*args[:1], "  ", *args[2:], results)[-1]
    assert message.startswith("**Error:** the prompt is empty")
    # a failure that is not the request's (here: a results list Gradio would never send) is one line too
    out = handlers["run"](paths, PROMPT, "", "SELF global", 16384, 0, 0, 2, 1.0, 3, None)
    assert out[-1].startswith("**Error:** internal error (TypeError") and "\n" not in out[-1]


@needs_gradio
def test_page_synthetic_tab(handlers):
    refs, prompt, message = handlers["synthetic_sample"]("compose", 4, 2, "val")
    assert len(refs) == 4 and prompt and message == ""
    assert handlers["synthetic_sample"]("paint", 3, 0, "test")[-1].startswith("**Error:** task kind must be one of")
    refs, prompt, strip, scores, message = handlers["synthetic_run"]("compose", 2, 1, "test", 2, 1.0)
    assert len(refs) == 2 and Image.open(strip).format == "PNG" and message == ""
    assert list(scores.columns) == ["integration", "consistency", "quality", "overall"]
    assert all(0 <= float(v) <= 1 for v in scores.iloc[0])


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_import_uniref_does_not_import_gradio():
    code = (
        "import sys, uniref, uniref.cli, uniref.demo; uniref.cli.build_parser(); "
        "assert 'gradio' not in sys.modules, 'gradio imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_demo(log_dir: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """Starts `uniref demo --port P ARGS` (the console script's entry point, `uniref.cli.main`) on a free
    port and waits until it says it serves, and serves its page. Returns ``(process, url)``; stop it with
    `stop_demo`. The server's output goes to ``log_dir/server.log``."""
    port = _free_port()
    log_path = log_dir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from uniref.cli import main; sys.exit(main())",
                "demo",
                "--port",
                str(port),
                *args,
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"uniref demo exited with {proc.returncode}:\n{log_path.read_text()}")
        if "serving on" not in log_path.read_text():  # printed once the server is up
            time.sleep(0.5)
            continue
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200
        return proc, url
    stop_demo(proc)
    raise AssertionError(f"uniref demo did not serve {url} within {SERVER_START_S} s:\n{log_path.read_text()}")


def stop_demo(proc: subprocess.Popen) -> None:
    """Stops a server from `start_demo` (SIGTERM, then SIGKILL after 20 s)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@needs_gradio
def test_demo_command_warns_when_open_to_the_network(tmp_path):
    proc, url = start_demo(tmp_path, "--host", "0.0.0.0")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            page = r.read().decode()
        assert "uniref demo" in page
    finally:
        stop_demo(proc)
    log = (tmp_path / "server.log").read_text()
    assert "uniref demo: warning: --host 0.0.0.0 makes the demo reachable from other machines" in log
    assert "serving on http://0.0.0.0:" in log
    assert "gradio.live" not in log and "share=True" not in log  # no share link, not even offered


@needs_gradio
def test_demo_command_listens_on_localhost_by_default_without_warning(tmp_path):
    proc, _ = start_demo(tmp_path)
    stop_demo(proc)
    log = (tmp_path / "server.log").read_text()
    assert "serving on http://127.0.0.1:" in log and "warning" not in log


def test_demo_command_bad_model_is_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from uniref.cli import main; sys.exit(main())",
            "demo",
            "--model",
            str(tmp_path / "nowhere"),
            "--port",
            str(_free_port()),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("uniref demo: "), result.stderr
    if importlib.util.find_spec("gradio") is not None:
        assert "--model" in lines[0] and "nowhere" in lines[0]


def test_demo_command_rejects_a_bad_port():
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from uniref.cli import main; sys.exit(main())", "demo", "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "is not a port number (1..65535)" in result.stderr


@needs_gradio
def test_demo_command_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from uniref.cli import main; sys.exit(main())",
                "demo",
                "--port",
                str(port),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 2
    assert result.stderr == (
        f"uniref demo: cannot listen on 127.0.0.1:{port} (in use, or not an address of this "
        "machine); pick another --port or --host\n"
    )
