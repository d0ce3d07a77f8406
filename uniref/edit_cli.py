"""`uniref edit`: edit or compose images from the command line.

    uniref edit --image A.png [--image B.png ...] --prompt TEXT --output OUT.png [--model DIR] [--steps N]
                [--seed S] [--guidance G] [--pixel-budget P] [--budget-mode global|per_image] [--device cpu|cuda]

Every problem with the request -- a bad number, a missing, unreadable, empty, truncated, oversized or
unsupported image, more references than the pixel budget holds, an unusable output path or model folder --
is reported as ONE line on stderr with exit code 2, before anything is written. The output is written
atomically: a temporary file in the output's folder, fsync, then `os.replace`, so OUT is either the old
file or the complete new one.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from PIL import ImageOps

__all__ = ["EditInputError", "MAX_INPUT_PIXELS", "add_edit_parser", "load_image", "run_edit", "write_image_atomic"]

# Decompression-bomb guard: a 64-megapixel input (e.g. 8192 x 8192) is far above any size the model uses
# (references are resized to the pixel budget), while a few hundred bytes of PNG can claim gigapixels.
MAX_INPUT_PIXELS = 64 * 1024 * 1024

# PIL modes converted to RGB, and how: 8-bit colour and grey as they are, CMYK/YCbCr by PIL's conversion,
# alpha composited on white, 16-bit grey scaled to 8 bits.
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_DIRECT_MODES = {"RGB", "L", "1", "CMYK", "YCbCr"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                   ".tiff": "TIFF"}


class EditInputError(ValueError):
    """A problem with the request, reported as one line with exit code 2."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _to_rgb(img: PIL.Image.Image, where: str) -> PIL.Image.Image:
    if img.mode == "P":
        # palette images may carry transparency; resolve it before compositing
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise EditInputError(f"{where}: 32-bit integer pixels outside the 16-bit range are not supported")
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)  # 16 -> 8 bits, rounded
        return PIL.Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode in _DIRECT_MODES:
        return img.convert("RGB")
    raise EditInputError(
        f"{where}: unsupported image mode {img.mode!r}; use 8/16-bit RGB(A), greyscale, palette or CMYK images"
    )


def load_image(path: str | os.PathLike, max_pixels: int = MAX_INPUT_PIXELS) -> PIL.Image.Image:
    """Reads one reference image for editing as an 8-bit RGB PIL image.

    Conversions: EXIF orientation applied; CMYK/YCbCr/greyscale/bilevel -> RGB; 16-bit greyscale -> 8-bit;
    transparency (RGBA, LA, palette with transparency) composited on white. Multi-frame files give their
    first frame.

    Raises:
        EditInputError: missing, unreadable, empty, not an image, truncated or corrupt, larger than
            ``max_pixels`` (decompression-bomb guard, checked from the header before decoding), or an
            unsupported mode (e.g. 32-bit float).
    """
    where = f"--image {path}"
    p = Path(path)
    if not p.exists():
        raise EditInputError(f"{where}: no such file")
    if p.is_dir():
        raise EditInputError(f"{where}: is a directory, not an image file")
    try:
        data = p.read_bytes()
    except PermissionError:
        raise EditInputError(f"{where}: cannot be read (permission denied)") from None
    except OSError as exc:
        raise EditInputError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    if not data:
        raise EditInputError(f"{where}: is empty (0 bytes)")
    limit = f"too large to decode safely (limit {max_pixels / 1e6:.0f} megapixels; decompression-bomb guard)"
    with warnings.catch_warnings():
        # PIL warns (and above twice its limit, raises) for huge images; both are the same refusal here
        warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
        try:
            img = PIL.Image.open(io.BytesIO(data))
        except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning):
            raise EditInputError(f"{where}: is {limit}") from None
        except PIL.UnidentifiedImageError:
            raise EditInputError(f"{where}: is not an image file Pillow can read") from None
        except OSError as exc:
            raise EditInputError(f"{where}: is corrupt ({exc})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise EditInputError(f"{where}: is {width}x{height} pixels, {limit}")
    if width == 0 or height == 0:
        raise EditInputError(f"{where}: has no pixels ({width}x{height})")
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise EditInputError(f"{where}: is truncated or corrupt ({exc})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, TypeError) as exc:
        raise EditInputError(f"{where}: has unreadable EXIF data ({exc})") from None
    return _to_rgb(img, where)


def write_image_atomic(image: PIL.Image.Image, path: str | os.PathLike) -> None:
    """Writes ``image`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    The format follows the extension (see ``_OUTPUT_FORMATS``). On any failure the temp file is removed
    and ``path`` is untouched.
    """
    path = Path(path)
    fmt = _OUTPUT_FORMATS[path.suffix.lower()]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # make the rename itself durable
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_output(path: str) -> None:
    p = Path(path)
    if p.suffix.lower() not in _OUTPUT_FORMATS:
        raise EditInputError(
            f"--output {path}: unknown image extension {p.suffix!r}; use one of {', '.join(sorted(_OUTPUT_FORMATS))}"
        )
    if p.is_dir():
        raise EditInputError(f"--output {path}: is a directory; give a file name such as {p / 'out.png'}")
    parent = p.parent
    if not parent.is_dir():
        raise EditInputError(f"--output {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EditInputError(f"--output {path}: folder {parent} is not writable")


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def _int_at_least(lo: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer ({what})") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} is too small: {what}")
        return value

    return parse


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 1 (1 disables guidance)")
    return value


def _one_line_error():
    # argparse would print the usage block first; every error of this command is one line
    def error(message: str):
        print(f"uniref edit: {message}", file=sys.stderr)
        sys.exit(2)

    return error


def add_edit_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``edit`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``); ``args.func(args)`` runs it."""
    p = subparsers.add_parser(
        "edit",
        help="edit or compose images from 1..N references and an instruction",
        description="Edit or compose images: the references share one pixel budget (SELF) and are fused by "
        "the model into one output image.",
    )
    p.add_argument("--image", action="append", required=True, metavar="PATH",
                   help="a reference image; repeat for several, in the order the prompt refers to them")
    p.add_argument("--prompt", required=True, help="the edit instruction")
    p.add_argument("--output", required=True, metavar="OUT", help="where to write the result (.png, .jpg, .webp, ...)")
    p.add_argument("--model", metavar="DIR",
                   help="a local pipeline folder (save_pretrained); default: the embedded default model")
    p.add_argument("--steps", type=_int_at_least(1, "--steps must be >= 1"), default=50,
                   help="denoising steps (default 50)")
    p.add_argument("--seed", type=_int_at_least(0, "--seed must be >= 0"), default=0,
                   help="random seed of the initial noise (default 0)")
    p.add_argument("--guidance", type=_guidance, default=4.0,
                   help="classifier-free guidance scale, >= 1; 1 disables it (default 4.0)")
    p.add_argument("--pixel-budget", type=_int_at_least(16 * 16, "--pixel-budget must be >= 256 (one 16x16 tile)"),
                   metavar="P", help="reference pixels: the total in global mode, per image in per_image mode "
                   "(default: the budget the model was trained with, else its target size: 1024^2 for Qwen-Image-sized "
                   "models)")
    p.add_argument("--budget-mode", choices=("global", "per_image"), default="global",
                   help="global: all references share the budget (SELF, default); per_image: each gets it")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where to run (default cpu); cuda runs in bfloat16 where supported")
    p.error = _one_line_error()
    p.set_defaults(func=run_edit)
    return p


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _load_pipeline(model: str | None, device: str):
    from uniref.pipelines.edit import DefaultModelUnavailableError, UniRefEditPipeline

    if device == "cuda" and not torch.cuda.is_available():
        raise EditInputError("--device cuda: no CUDA device is available here; use --device cpu")
    if model is not None and not (Path(model) / "model_index.json").is_file():
        raise EditInputError(
            f"--model {model}: not a pipeline folder (no model_index.json; save one with save_pretrained)"
        )
    # diffusers' loading bars and notes would break the one-line contract of this command
    from diffusers.utils import logging as diffusers_logging

    bars, verbosity = diffusers_logging.is_progress_bar_enabled(), diffusers_logging.get_verbosity()
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    # bfloat16 on GPUs that have it (a Qwen-Image-sized model does not fit in float32); float32 otherwise
    half = device == "cuda" and torch.cuda.is_bf16_supported()
    try:
        pipe = UniRefEditPipeline.from_pretrained(model, **({"dtype": torch.bfloat16} if half else {}))
    except DefaultModelUnavailableError:
        raise EditInputError(
            "no --model given and the embedded default model is missing from this installation; pass --model DIR with a "
            "pipeline folder (UniRefEditPipeline.save_pretrained)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EditInputError(f"--model {model}: cannot load the pipeline ({first})") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if bars:
            diffusers_logging.enable_progress_bar()
    return pipe.to(device)


def _check_budget(pipe, images, budget: int, mode: str) -> None:
    try:
        pipe.plan_sizes([images], budget, mode, None, None)
    except ValueError as exc:
        raise EditInputError(f"--pixel-budget {budget}: {exc}; raise it or pass fewer --image") from None


def run_edit(args: argparse.Namespace) -> int:
    """Runs ``uniref edit``; returns the exit code (0, or 2 with one line on stderr)."""
    try:
        if not args.prompt.strip():
            raise EditInputError("--prompt is empty; describe the edit, e.g. --prompt 'make the sky red'")
        _check_output(args.output)
        images = [load_image(path) for path in args.image]
        pipe = _load_pipeline(args.model, args.device)
        budget = pipe.default_pixel_budget if args.pixel_budget is None else args.pixel_budget
        _check_budget(pipe, images, budget, args.budget_mode)
        pipe.set_progress_bar_config(desc="uniref edit", leave=False)
        try:
            result = pipe(
                images, args.prompt, true_cfg_scale=args.guidance, num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(args.seed), pixel_budget=budget, budget_mode=args.budget_mode,
            ).images[0]
        except ValueError as exc:  # the pipeline's argument checks, e.g. too few steps for the scheduler
            raise EditInputError(str(exc)) from None
    except EditInputError as exc:
        print(f"uniref edit: {exc}", file=sys.stderr)
        return 2
    write_image_atomic(result, args.output)
    print(f"wrote {args.output} ({result.width}x{result.height})")
    return 0
