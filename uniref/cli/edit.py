"""`uniref edit`: edit or compose images from the command line.

    uniref edit --image A.png [--image B.png ...] --prompt TEXT --output OUT.png [--model DIR] [--steps N]
                [--seed S] [--guidance G] [--pixel-budget P] [--budget-mode global|per_image] [--device cpu|cuda]

Every problem with the request -- a bad number, a missing, unreadable, empty, truncated, oversized or
unsupported image, more references than the pixel budget holds, an unusable output path or model folder --
is reported as ONE line on stderr with exit code 2, before the model is loaded where it can be (the output
folder is probed for a writable file before any compute). A result that is not finite (NaN or infinite
latents, e.g. from broken weights) is reported with exit code 1 and nothing is written.

The output is written atomically: a temporary file in the output's folder, fsync, then `os.replace`, so
OUT is either the old file or the complete new one. Overwriting keeps the existing file's permission
bits; an OUT that is a symbolic link is written through: the file it points to is replaced (atomically,
in that file's folder) and the link is kept.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import stat
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from PIL import ImageOps

__all__ = [
    "EditInputError",
    "MAX_GUIDANCE",
    "MAX_INPUT_BYTES",
    "MAX_INPUT_PIXELS",
    "MAX_PIXEL_BUDGET",
    "add_parser",
    "load_image",
    "run_edit",
    "write_image_atomic",
]

# Decompression-bomb guard: a 64-megapixel input (e.g. 8192 x 8192) is far above any size the model uses
# (references are resized to the pixel budget), while a few hundred bytes of PNG can claim gigapixels.
MAX_INPUT_PIXELS = 64 * 1024 * 1024
# Files are checked against this size before anything is read: 8 bytes per pixel of the largest accepted
# image is an uncompressed 16-bit RGBA file, the largest any supported format needs.
MAX_INPUT_BYTES = 8 * MAX_INPUT_PIXELS
# The references are resized to the pixel budget, so it bounds the compute and the memory of a run: the
# same 64 megapixels as the inputs (64x the 1024^2 Qwen-Image is trained at).
MAX_PIXEL_BUDGET = MAX_INPUT_PIXELS
# Far above useful scales (Qwen-Image uses 4); larger values only overflow the guided velocity.
MAX_GUIDANCE = 100.0
# torch.Generator.manual_seed takes a 64-bit seed.
MAX_SEED = 2**64 - 1

# PIL modes converted to RGB, and how: 8-bit colour and grey as they are, CMYK/YCbCr by PIL's conversion,
# alpha composited on white, 16-bit grey scaled to 8 bits.
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_DIRECT_MODES = {"RGB", "L", "1", "CMYK", "YCbCr"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_OUTPUT_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


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
        EditInputError: missing, not a regular file (device, FIFO), larger than ``MAX_INPUT_BYTES`` (checked
            before reading), unreadable, empty, not an image, truncated or corrupt, larger than
            ``max_pixels`` (decompression-bomb guard, checked from the header before decoding), or an
            unsupported mode (e.g. 32-bit float).
    """
    where = f"--image {path}"
    p = Path(path)
    try:
        st = p.stat()  # follows links: what is read is the file they point to
    except FileNotFoundError:
        raise EditInputError(f"{where}: no such file") from None
    except OSError as exc:
        raise EditInputError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise EditInputError(f"{where}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        # a FIFO would block forever and a device (/dev/zero) never ends
        raise EditInputError(f"{where}: is not a regular file (a device, FIFO or socket); pass an image file")
    if st.st_size == 0:
        raise EditInputError(f"{where}: is empty (0 bytes)")
    if st.st_size > MAX_INPUT_BYTES:
        raise EditInputError(
            f"{where}: is {st.st_size} bytes, above the limit of {MAX_INPUT_BYTES} bytes for an image of at most "
            f"{MAX_INPUT_PIXELS / 1e6:.0f} megapixels"
        )
    try:
        data = p.read_bytes()
    except PermissionError:
        raise EditInputError(f"{where}: cannot be read (permission denied)") from None
    except OSError as exc:
        raise EditInputError(f"{where}: cannot be read ({exc.strerror or exc})") from None
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


def _destination(path: Path) -> Path:
    """The file a write to ``path`` replaces: ``path`` itself, or the file a symbolic link points to."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def write_image_atomic(image: PIL.Image.Image, path: str | os.PathLike) -> None:
    """Writes ``image`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    The format follows the extension (see ``_OUTPUT_FORMATS``). A new file gets the permissions a plain
    ``open()`` would give it (``0o666 & ~umask``); an existing file keeps its permission bits. A ``path``
    that is a symbolic link is written through: its target is replaced and the link kept. On any failure
    the temp file is removed and the destination is untouched.
    """
    path = Path(path)
    fmt = _OUTPUT_FORMATS[path.suffix.lower()]
    dest = _destination(path)
    try:
        mode = stat.S_IMODE(dest.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp creates the file 0600
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # make the rename itself durable
    dir_fd = os.open(dest.parent, os.O_RDONLY)
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
    dest = _destination(p)
    if dest.is_dir():
        raise EditInputError(f"--output {path}: links to the directory {dest}; give a file name")
    parent = dest.parent
    if not parent.is_dir():
        raise EditInputError(f"--output {path}: folder {parent} does not exist")
    # A real probe (not os.access, which root always passes and which ignores read-only mounts, quotas
    # and ACLs): the write that comes after minutes of compute makes the same temporary file here.
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{dest.name}.", suffix=".tmp")
    except OSError as exc:
        raise EditInputError(f"--output {path}: folder {parent} is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


# --------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------


def _int_at_least(lo: int, what: str, hi: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer ({what})") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{value} is too small: {what}")
        if hi is not None and value > hi:
            raise argparse.ArgumentTypeError(f"{value} is too large: {what}")
        return value

    return parse


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not 1 <= value <= MAX_GUIDANCE:
        raise argparse.ArgumentTypeError(
            f"{text} must be a finite number >= 1 (1 disables guidance) and <= {MAX_GUIDANCE:g} (Qwen-Image uses 4)"
        )
    return value


def _one_line_error():
    # argparse would print the usage block first; every error of this command is one line
    def error(message: str):
        print(f"uniref edit: {message}", file=sys.stderr)
        sys.exit(2)

    return error


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``edit`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``); ``args.func(args)`` runs it."""
    p = subparsers.add_parser(
        "edit",
        help="edit or compose images from 1..N references and an instruction",
        description="Edit or compose images: the references share one pixel budget (SELF) and are fused by "
        "the model into one output image.",
    )
    p.add_argument(
        "--image",
        action="append",
        required=True,
        metavar="PATH",
        help="a reference image; repeat for several, in the order the prompt refers to them",
    )
    p.add_argument("--prompt", required=True, help="the edit instruction")
    p.add_argument("--output", required=True, metavar="OUT", help="where to write the result (.png, .jpg, .webp, ...)")
    p.add_argument(
        "--model", metavar="DIR", help="a local pipeline folder (save_pretrained); default: the embedded default model"
    )
    p.add_argument(
        "--steps", type=_int_at_least(1, "--steps must be >= 1"), default=50, help="denoising steps (default 50)"
    )
    p.add_argument(
        "--seed",
        type=_int_at_least(0, f"--seed must be >= 0 and <= {MAX_SEED} (2^64 - 1)", MAX_SEED),
        default=0,
        help="random seed of the initial noise (default 0)",
    )
    p.add_argument(
        "--guidance",
        type=_guidance,
        default=4.0,
        help="classifier-free guidance scale, >= 1; 1 disables it (default 4.0)",
    )
    p.add_argument(
        "--pixel-budget",
        type=_int_at_least(
            16 * 16,
            f"--pixel-budget must be >= 256 (one 16x16 tile) and <= {MAX_PIXEL_BUDGET} (8192^2)",
            MAX_PIXEL_BUDGET,
        ),
        metavar="P",
        help="reference pixels: the total in global mode, per image in per_image mode "
        "(default: the budget the model was trained with, else its target size: 1024^2 for Qwen-Image-sized "
        "models)",
    )
    p.add_argument(
        "--budget-mode",
        choices=("global", "per_image"),
        default="global",
        help="global: all references share the budget (SELF, default); per_image: each gets it",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where to run (default cpu); cuda runs in bfloat16 where supported",
    )
    p.error = _one_line_error()
    p.set_defaults(func=run_edit)
    return p


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def _load_pipeline(model: str | None, device: str):
    if device == "cuda" and not torch.cuda.is_available():
        raise EditInputError("--device cuda: no CUDA device is available here; use --device cpu")
    if model is not None and not (Path(model) / "model_index.json").is_file():
        raise EditInputError(
            f"--model {model}: not a pipeline folder (no model_index.json; save one with save_pretrained)"
        )
    # diffusers is imported only once the request has passed every check that does not need it
    from diffusers.utils import logging as diffusers_logging

    from uniref.pipelines.edit import DefaultModelUnavailableError, PipelineLoadError, UniRefEditPipeline

    # diffusers' loading bars would break the one-line contract of this command; its warnings are not
    # muted (a folder that does not fit the model is a PipelineLoadError, raised by the loader's checks)
    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    # bfloat16 on GPUs that have it (a Qwen-Image-sized model does not fit in float32); float32 otherwise
    half = device == "cuda" and torch.cuda.is_bf16_supported()
    try:
        pipe = UniRefEditPipeline.from_pretrained(model, **({"dtype": torch.bfloat16} if half else {}))
    except DefaultModelUnavailableError:
        raise EditInputError(
            "no --model given and the embedded default model is missing from this installation; pass --model DIR "
            "with a pipeline folder (UniRefEditPipeline.save_pretrained)"
        ) from None
    except PipelineLoadError as exc:  # its message names the folder and says what is wrong
        raise EditInputError(f"--model: {_first_line(exc)}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EditInputError(f"--model {model}: cannot load the pipeline ({_first_line(exc)})") from None
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
    return pipe.to(device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def pixel_limit(pipe, memory: int | None = None) -> tuple[int, str]:
    """The most image pixels (planned references + output) one call of ``pipe`` can hold in ``memory`` bytes
    (default: this machine's RAM, or the GPU's for a pipeline on CUDA), and how that was derived: the VAE's
    widest full-resolution activations (its first block's channels, input, output and norm, float32) plus the
    transformer's per-token activations (its width, 8 values a block in flight) over the pixels of a token."""
    if memory is None:
        device = pipe.transformer.device
        if device.type == "cuda":
            memory, where = torch.cuda.get_device_properties(device).total_memory, "GPU memory"
        else:
            memory, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"
    else:
        where = "memory"
    vae = pipe.vae.config
    first = vae.block_out_channels[0] if "block_out_channels" in vae else vae.base_dim
    width = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    token_pixels = (pipe.vae_scale_factor * pipe.patch_size) ** 2
    per_pixel = 4 * 3 * first + 4 * 8 * width / token_pixels
    return int(memory // per_pixel), f"{where} {memory / 2**30:.1f} GiB at about {per_pixel:.0f} bytes per pixel"


def _check_budget(pipe, images, budget: int, mode: str, memory: int | None = None) -> None:
    try:
        plans = pipe.plan_sizes([images], budget, mode, None, None)
    except ValueError as exc:
        raise EditInputError(f"--pixel-budget {budget}: {exc}; raise it or pass fewer --image") from None
    (th, tw), refs = plans[0]
    pixels = th * tw + sum(h * w for h, w in refs)
    limit, why = pixel_limit(pipe, memory)
    if pixels > limit:
        raise EditInputError(
            f"--pixel-budget {budget}: the planned images hold {pixels} pixels, over this machine's limit of {limit} "
            f"for this model ({why}); lower --pixel-budget or use --budget-mode global"
        )


def _check_steps(pipe, steps: int) -> None:
    # the scheduler decides what a step count means (Qwen-Image's shift_terminal has no 1-step schedule):
    # ask it now, on one token, rather than after the prompts and references are encoded
    from uniref.sampling import make_schedule

    try:
        make_schedule(pipe.scheduler, [1], steps, "cpu")
    except ValueError as exc:
        raise EditInputError(f"--steps {steps}: this model's scheduler cannot run it ({_first_line(exc)})") from None


def _check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise EditInputError("--prompt is empty; describe the edit, e.g. --prompt 'make the sky red'")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes the locale could not decode arrive as lone surrogates
        raise EditInputError("--prompt is not valid UTF-8 text; pass the instruction as UTF-8") from None


def run_edit(args: argparse.Namespace) -> int:
    """Runs ``uniref edit``; returns the exit code: 0, 2 for a bad request or 1 for a non-finite result or a
    failed write (one line on stderr)."""
    try:
        _check_prompt(args.prompt)
        _check_output(args.output)
        images = [load_image(path) for path in args.image]
        pipe = _load_pipeline(args.model, args.device)
        budget = pipe.default_pixel_budget if args.pixel_budget is None else args.pixel_budget
        _check_budget(pipe, images, budget, args.budget_mode)
        _check_steps(pipe, args.steps)
        pipe.set_progress_bar_config(desc="uniref edit", leave=False)
        try:
            result = pipe(
                images,
                args.prompt,
                true_cfg_scale=args.guidance,
                num_inference_steps=args.steps,
                generator=torch.Generator().manual_seed(args.seed),
                pixel_budget=budget,
                budget_mode=args.budget_mode,
            ).images[0]
        except ValueError as exc:  # the pipeline's argument checks
            raise EditInputError(str(exc)) from None
    except EditInputError as exc:
        print(f"uniref edit: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # non-finite latents or image: nothing is written
        print(f"uniref edit: {_first_line(exc)}", file=sys.stderr)
        return 1
    try:
        write_image_atomic(result, args.output)
    except OSError as exc:
        print(
            f"uniref edit: --output {args.output}: the result could not be written ({exc.strerror or exc})",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {args.output} ({result.width}x{result.height})")
    return 0
