"""`uniref edit`: a happy path with a tiny random model saved to a folder, the input conversions, and every
error path -- one line on stderr, exit code 2, nothing written -- with real files made in tmp_path."""

import argparse
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from uniref.cli.edit import add_parser as add_edit_parser
from uniref.cli.edit import load_image, write_image_atomic
from uniref.pipelines import UniRefEditPipeline
from uniref.presets import random_edit_pipeline


def cli(argv):
    """`uniref edit ...` through a parser built as uniref.cli builds it."""
    parser = argparse.ArgumentParser(prog="uniref")
    add_edit_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["edit", *argv])
    return args.func(args)


def save_random(path, h=32, w=48, seed=0, **save_kwargs):
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, **save_kwargs)
    return path


def png_claiming(path, width, height):
    """A valid 1x1 PNG whose header claims width x height: what a decompression bomb looks like."""
    save_random(path, 1, 1)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR crc over type + 13 data bytes
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    random_edit_pipeline("tiny", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def refs(tmp_path):
    return [save_random(tmp_path / "a.png", 48, 64, 1), save_random(tmp_path / "b.jpg", 40, 24, 2, quality=95)]


# --------------------------------------------------------------------------------------------
# Happy path
# --------------------------------------------------------------------------------------------


def test_edit_writes_the_pipeline_image(model_dir, refs, tmp_path, capsys):
    out = tmp_path / "out.png"
    rc = cli(
        [
            "--image",
            str(refs[0]),
            "--image",
            str(refs[1]),
            "--prompt",
            "put b into a",
            "--output",
            str(out),
            "--model",
            str(model_dir),
            "--steps",
            "2",
            "--seed",
            "7",
            "--guidance",
            "2.5",
            "--pixel-budget",
            "2048",
            "--budget-mode",
            "per_image",
        ]
    )
    assert rc == 0 and f"wrote {out} (80x48)" in capsys.readouterr().out
    written = np.asarray(PIL.Image.open(out))
    assert written.shape == (48, 80, 3)  # the first reference's aspect ratio at the model's 64^2 target
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left

    pipe = UniRefEditPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        [load_image(r) for r in refs],
        "put b into a",
        true_cfg_scale=2.5,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(7),
        pixel_budget=2048,
        budget_mode="per_image",
    ).images[0]
    assert np.array_equal(written, np.asarray(expected))


def test_output_is_replaced_atomically(tmp_path, monkeypatch):
    out = tmp_path / "out.png"
    out.write_bytes(b"old")
    image = PIL.Image.new("RGB", (8, 8), (1, 2, 3))

    def failing_save(self, fp, format=None, **kw):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(PIL.Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_image_atomic(image, out)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    monkeypatch.undo()
    write_image_atomic(image, out)
    assert PIL.Image.open(out).getpixel((0, 0)) == (1, 2, 3)


# --------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------


def test_cmyk_becomes_rgb(tmp_path):
    PIL.Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    img = load_image(tmp_path / "c.jpg")
    r, g, b = img.getpixel((8, 8))
    assert img.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_sixteen_bit_grey_becomes_eight_bit(tmp_path):
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    PIL.Image.fromarray(values).save(tmp_path / "g16.png")
    assert PIL.Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    img = load_image(tmp_path / "g16.png")
    assert img.mode == "RGB" and [img.getpixel((x, 0)) for x in range(3)] == [(0,) * 3, (128,) * 3, (255,) * 3]


def test_transparency_is_composited_on_white(tmp_path):
    rgba = PIL.Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    rgba.save(tmp_path / "t.png")
    img = load_image(tmp_path / "t.png")
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0))[0] == 255 and 125 <= img.getpixel((1, 0))[1] <= 129
    pal = PIL.Image.new("P", (2, 1))
    pal.putpalette([0, 0, 255] * 256)
    pal.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    save_random(tmp_path / "r.jpg", h=48, w=32, exif=exif)
    assert PIL.Image.open(tmp_path / "r.jpg").size == (32, 48)
    assert load_image(tmp_path / "r.jpg").size == (48, 32)


# --------------------------------------------------------------------------------------------
# Errors: one line, exit code 2, nothing written
# --------------------------------------------------------------------------------------------


def _bad_image(kind, tmp_path):
    p = tmp_path / f"{kind}.png"
    if kind == "missing":
        pass
    elif kind == "directory":
        p.mkdir()
    elif kind == "zero_byte":
        p.write_bytes(b"")
    elif kind == "truncated":
        data = save_random(p, 64, 64).read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "not_an_image":
        p.write_text("hello, I am text")
    elif kind == "bomb":
        png_claiming(p, 20000, 20000)
    elif kind == "large":
        png_claiming(p, 9000, 8000)  # 72 MP: under PIL's own limit, over ours
    elif kind == "float_mode":
        p = tmp_path / "f.tif"
        PIL.Image.fromarray(np.ones((4, 4), dtype=np.float32)).save(p)
    return p


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("zero_byte", r"is empty \(0 bytes\)"),
        ("truncated", "is truncated or corrupt"),
        ("not_an_image", "is not an image file Pillow can read"),
        ("bomb", r"is too large to decode safely \(limit 67 megapixels; decompression-bomb guard\)"),
        ("large", "is 9000x8000 pixels, too large to decode safely"),
        ("float_mode", "unsupported image mode 'F'"),
    ],
)
def test_bad_images(kind, message, model_dir, refs, tmp_path, capsys):
    bad = _bad_image(kind, tmp_path)
    out = tmp_path / "out.png"
    rc = cli(
        ["--image", str(refs[0]), "--image", str(bad), "--prompt", "x", "--output", str(out), "--model", str(model_dir)]
    )
    _assert_one_line_failure(rc, capsys, rf"--image {bad}: {message}", out)


def test_unreadable_image(model_dir, refs, tmp_path, capsys, monkeypatch):
    read = Path.read_bytes

    def deny(self):
        if self.name == "a.png":
            raise PermissionError(13, "Permission denied")
        return read(self)

    monkeypatch.setattr(Path, "read_bytes", deny)  # chmod 000 does not stop root, which runs CI here
    out = tmp_path / "out.png"
    rc = cli(["--image", str(refs[0]), "--prompt", "x", "--output", str(out), "--model", str(model_dir)])
    _assert_one_line_failure(rc, capsys, r"cannot be read \(permission denied\)", out)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--pixel-budget", "512", "--budget-mode", "global"],
            r"--pixel-budget 512: .*too small for 3 reference\(s\) in 'global' mode.*>= 768; raise it or pass fewer",
        ),
        (["--prompt", "  "], "--prompt is empty"),
        (["--output", "{tmp}/out.gif"], "unknown image extension '.gif'"),
        (["--output", "{tmp}/no/such/dir/out.png"], "folder .* does not exist"),
        (["--model", "{tmp}"], "not a pipeline folder"),
        (["--steps", "1"], r"num_inference_steps=1 gives no valid schedule .*use more steps"),
    ],
)
def test_bad_requests(extra, message, model_dir, refs, tmp_path, capsys):
    extra = [e.format(tmp=tmp_path) for e in extra]
    out = tmp_path / "out.png"
    argv = ["--image", str(refs[0])] * 3 + ["--prompt", "x", "--output", str(out), "--model", str(model_dir)] + extra
    _assert_one_line_failure(cli(argv), capsys, message, out)


def test_without_model_says_when_the_default_is_missing(refs, tmp_path, capsys, monkeypatch):
    import uniref.pipelines.edit as edit

    monkeypatch.setattr(edit, "DEFAULT_MODEL_DIR", tmp_path / "missing")
    out = tmp_path / "out.png"
    rc = cli(["--image", str(refs[0]), "--prompt", "x", "--output", str(out)])
    _assert_one_line_failure(rc, capsys, "embedded default model is missing from this installation", out)


def test_without_model_uses_the_default_model(refs, tmp_path, capsys):
    out = tmp_path / "out.png"
    rc = cli(
        [
            "--image",
            str(refs[0]),
            "--image",
            str(refs[1]),
            "--prompt",
            "put image 2 on image 1",
            "--output",
            str(out),
            "--steps",
            "3",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    w, h = PIL.Image.open(out).size
    assert abs(w * h - 64 * 64) <= 0.25 * 64 * 64 and w > h  # the model's area, the first reference's shape


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_cuda_without_a_device(model_dir, refs, tmp_path, capsys):
    out = tmp_path / "out.png"
    rc = cli(
        ["--image", str(refs[0]), "--prompt", "x", "--output", str(out), "--model", str(model_dir), "--device", "cuda"]
    )
    _assert_one_line_failure(rc, capsys, "no CUDA device is available here; use --device cpu", out)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--steps", "0", "--steps must be >= 1"),
        ("--steps", "many", "'many' is not an integer"),
        ("--guidance", "0.5", r"must be a finite number >= 1 \(1 disables guidance\)"),
        ("--guidance", "nan", "must be a finite number >= 1"),
        ("--seed", "-1", "--seed must be >= 0"),
        ("--pixel-budget", "100", r"--pixel-budget must be >= 256 \(one 16x16 tile\)"),
        ("--budget-mode", "sum", "invalid choice: 'sum'"),
    ],
)
def test_bad_numbers(flag, value, message, refs, tmp_path, capsys):
    out = tmp_path / "out.png"
    with pytest.raises(SystemExit) as exc:
        cli(["--image", str(refs[0]), "--prompt", "x", "--output", str(out), flag, value])
    _assert_one_line_failure(exc.value.code, capsys, f"argument {flag}: .*{message}", out)


def test_missing_required_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["--prompt", "x"])
    _assert_one_line_failure(exc.value.code, capsys, "required: --image, --output", tmp_path / "none.png")


def _assert_one_line_failure(rc, capsys, pattern, out):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("uniref edit: "), err
    assert __import__("re").search(pattern, lines[0]), lines[0]
    assert not out.exists() and not list(out.parent.glob(".out.png.*"))


def test_output_gets_ordinary_file_permissions(tmp_path):
    from PIL import Image

    from uniref.cli.edit import write_image_atomic

    old = os.umask(0o022)
    try:
        write_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "out.png")
    finally:
        os.umask(old)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------------------------
# Hostile inputs: files that are not files, outputs that cannot be written, numbers out of range
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["device", "fifo", "huge"])
def test_special_and_huge_files_are_refused_before_reading(kind, model_dir, refs, tmp_path, capsys):
    from uniref.cli.edit import MAX_INPUT_BYTES

    if kind == "device":
        bad, message = Path("/dev/zero"), r"is not a regular file \(a device, FIFO or socket\)"
    elif kind == "fifo":
        bad, message = tmp_path / "pipe.png", r"is not a regular file"
        os.mkfifo(bad)  # opening it for reading would block forever
    else:
        bad, message = tmp_path / "huge.png", rf"is {MAX_INPUT_BYTES + 1} bytes, above the limit of {MAX_INPUT_BYTES}"
        with open(bad, "wb") as f:  # sparse: no disk is used
            f.truncate(MAX_INPUT_BYTES + 1)
    out = tmp_path / "out.png"
    rc = cli(
        ["--image", str(refs[0]), "--image", str(bad), "--prompt", "x", "--output", str(out), "--model", str(model_dir)]
    )
    _assert_one_line_failure(rc, capsys, rf"--image {bad}: {message}", out)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--pixel-budget", str(10**12), r"--pixel-budget must be >= 256 .* and <= 67108864"),
        ("--guidance", "1e300", r"must be a finite number >= 1 .* and <= 100"),
        ("--seed", str(10**23), r"--seed must be >= 0 and <= 18446744073709551615"),
    ],
)
def test_numbers_are_bounded(flag, value, message, refs, tmp_path, capsys):
    out = tmp_path / "out.png"
    with pytest.raises(SystemExit) as exc:
        cli(["--image", str(refs[0]), "--prompt", "x", "--output", str(out), flag, value])
    _assert_one_line_failure(exc.value.code, capsys, f"argument {flag}: .*{message}", out)


def test_largest_seed_runs(model_dir, refs, tmp_path, capsys):
    out = tmp_path / "out.png"
    rc = cli(
        [
            "--image",
            str(refs[0]),
            "--prompt",
            "x",
            "--output",
            str(out),
            "--model",
            str(model_dir),
            "--steps",
            "2",
            "--seed",
            str(2**64 - 1),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert out.is_file()


def test_steps_the_scheduler_cannot_run_are_refused_by_name(model_dir, refs, tmp_path, capsys):
    out = tmp_path / "out.png"
    rc = cli(
        ["--image", str(refs[0]), "--prompt", "x", "--output", str(out), "--model", str(model_dir), "--steps", "1"]
    )
    _assert_one_line_failure(rc, capsys, r"^uniref edit: --steps 1: this model's scheduler cannot run it", out)


def test_an_unwritable_output_folder_is_refused_before_compute(model_dir, refs, capsys):
    # /proc/self passes os.access(W_OK) for root, but no file can be created there
    out = Path("/proc/self/out.png")
    rc = cli(["--image", str(refs[0]), "--prompt", "x", "--output", str(out), "--model", str(model_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("uniref edit: --output /proc/self/out.png: folder /proc/self is not writable")
    assert len(err.strip().splitlines()) == 1


def test_a_non_utf8_prompt_is_one_line(model_dir, refs, tmp_path):
    out = tmp_path / "out.png"
    proc = subprocess.run(
        [sys.executable, "-m", "uniref.cli", "edit", "--image", str(refs[0]), "--prompt", b"caf\xe9 \xff",
         "--output", str(out), "--model", str(model_dir)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "LC_ALL": "C.UTF-8"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "uniref edit: --prompt is not valid UTF-8 text; pass the instruction as UTF-8"
    assert not out.exists()


def test_a_broken_model_is_not_written_as_a_black_image(refs, tmp_path, capsys):
    pipe = random_edit_pipeline("tiny", seed=0)
    with torch.no_grad():
        next(pipe.transformer.parameters()).fill_(float("nan"))
    pipe.save_pretrained(tmp_path / "nan_model")
    out = tmp_path / "out.png"
    rc = cli(
        [
            "--image",
            str(refs[0]),
            "--prompt",
            "x",
            "--output",
            str(out),
            "--model",
            str(tmp_path / "nan_model"),
            "--steps",
            "2",
        ]
    )
    err = capsys.readouterr().err.strip().split("\r")[-1]  # after the progress bar, which clears itself
    assert rc == 1 and err.startswith("uniref edit: the sampled latents are not finite (NaN or inf)"), err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_overwriting_keeps_the_files_mode(tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"old")
    out.chmod(0o600)
    write_image_atomic(PIL.Image.new("RGB", (4, 4)), out)
    assert out.stat().st_mode & 0o777 == 0o600 and PIL.Image.open(out).size == (4, 4)


def test_a_symlinked_output_is_written_through(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "image.png"
    target.write_bytes(b"old")
    target.chmod(0o640)
    link = tmp_path / "link.png"
    link.symlink_to(target)
    write_image_atomic(PIL.Image.new("RGB", (4, 4)), link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert PIL.Image.open(target).size == (4, 4) and target.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.png", "real"]
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["image.png"]


def test_pipeline_load_errors_are_not_prefixed_twice(model_dir, refs, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "model_index.json").write_text("{not json")
    out = tmp_path / "out.png"
    rc = cli(["--image", str(refs[0]), "--prompt", "x", "--output", str(out), "--model", str(broken)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("cannot load") <= 1 and err.count(str(broken)) == 1, err
    assert "model_index.json is corrupt" in err


def test_the_pixel_limit_comes_from_the_model_and_the_machine():
    """Beyond the fixed sanity bound of --pixel-budget, a request is refused when its planned images (references
    + output) would not fit this machine's memory for this model; the message names the limit and its source."""
    import PIL.Image

    from uniref.cli.edit import EditInputError, _check_budget, pixel_limit
    from uniref.presets import random_edit_pipeline

    pipe = random_edit_pipeline("tiny")
    limit, why = pixel_limit(pipe)
    assert limit > 0 and "RAM" in why and "bytes per pixel" in why
    small, _ = pixel_limit(pipe, memory=64 * 2**20)  # a 64 MiB machine
    assert small < limit
    refs = [PIL.Image.new("RGB", (64, 64))] * 2
    _check_budget(pipe, refs, 4096, "global")  # well within this machine's memory
    _check_budget(pipe, refs, 4096, "global", memory=64 * 2**20)  # and a 64 MiB one's
    with pytest.raises(EditInputError, match=rf"over this machine's limit of {small} for this model \(memory"):
        _check_budget(pipe, refs, 4096 * 4096, "global", memory=64 * 2**20)
