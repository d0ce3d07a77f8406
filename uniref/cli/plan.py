"""`uniref plan`: plan reference sizes under one pixel budget (SELF) and pack them."""

from __future__ import annotations

import argparse

# A composition request as a user would make it: a wide background, a portrait and a small object
# photo, each with its own size (height, width).
_DEMO_SIZES = [(768, 1360), (1024, 768), (320, 480)]
_VAE, _PATCH = 8, 2
_MULTIPLE = _VAE * _PATCH

# The demo allocates the target's and the planned references' latents (16 channels at 1/8 size, float32:
# 1 byte per pixel of the image) and packs them (a second copy), so 4 bytes per pixel bound its memory:
# this machine's RAM over that is the most pixels it may plan.
PLAN_BYTES_PER_PIXEL = 4


def max_plan_pixels() -> int:
    """The most pixels `uniref plan` may allocate on this machine (its RAM / `PLAN_BYTES_PER_PIXEL`)."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // PLAN_BYTES_PER_PIXEL


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like HEIGHTxWIDTH, e.g. 1024x768") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return h, w


def run_plan(args: argparse.Namespace) -> int:
    """Prints the global and per-image plans of ``args.size`` and packs one sample of each; returns 0.

    Raises:
        ValueError: a budget the planner refuses (reported as one line by `uniref.cli.main`).
    """
    import torch

    from uniref.packing import pack_latents, plan_reference_sizes

    th, tw = args.target
    if th % _MULTIPLE or tw % _MULTIPLE:
        raise ValueError(f"--target {th}x{tw} must have sides that are multiples of {_MULTIPLE}")
    limit = max_plan_pixels()
    for flag, pixels in (("--target", th * tw), ("--budget", args.budget)):
        if pixels > limit:
            raise ValueError(
                f"{flag}: {pixels} pixels is above this machine's limit of {limit} (its RAM at "
                f"{PLAN_BYTES_PER_PIXEL} bytes per pixel); lower it"
            )
    sizes = args.size or _DEMO_SIZES
    rows = [
        (mode, plan_reference_sizes(sizes, args.budget, multiple=_MULTIPLE, mode=mode))
        for mode in ("global", "per_image")
    ]
    print(
        f"{len(sizes)} reference(s), pixel budget {args.budget} ({args.budget**0.5:.0f}^2), "
        f"target {args.target[0]}x{args.target[1]}"
    )
    for mode, plan in rows:
        print(f"\nmode={mode}")
        print(f"  {'ref':>3}  {'original':>11}  {'planned':>11}  {'tokens':>6}")
        for k, ((h0, w0), (h, w)) in enumerate(zip(sizes, plan), start=1):
            print(f"  {k:>3}  {h0:>5}x{w0:<5}  {h:>5}x{w:<5}  {(h // _MULTIPLE) * (w // _MULTIPLE):>6}")
        ref_tokens = sum((h // _MULTIPLE) * (w // _MULTIPLE) for h, w in plan)
        print(f"  reference tokens {ref_tokens}, reference pixels {sum(h * w for h, w in plan)}")

    # Pack one sample per mode (latents are random: the point is the layout) in one call.
    gen = torch.Generator().manual_seed(0)
    samples = [
        [torch.randn(16, th // _VAE, tw // _VAE, generator=gen)]
        + [torch.randn(16, h // _VAE, w // _VAE, generator=gen) for h, w in plan]
        for _, plan in rows
    ]
    tokens, layout = pack_latents(samples, patch_size=_PATCH)
    print(
        f"\npacked batch (sample 0 = global, sample 1 = per_image): tokens {tuple(tokens.shape)}, "
        f"cu_seqlens {layout.cu_seqlens.tolist()}, max_seqlen {layout.max_seqlen}"
    )
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``plan`` to ``subparsers``."""
    p = subparsers.add_parser("plan", help="plan reference sizes under one pixel budget (SELF) and pack them")
    p.add_argument(
        "--size",
        action="append",
        type=_parse_size,
        metavar="HxW",
        help="a reference's original size; repeat per reference (default: a 3-image example)",
    )
    p.add_argument(
        "--budget",
        type=int,
        default=1024 * 1024,
        help="total reference pixels (default 1024^2; at most this machine's RAM / 4)",
    )
    p.add_argument(
        "--target",
        type=_parse_size,
        default=(1024, 1024),
        metavar="HxW",
        help="output size, multiples of 16 (default 1024x1024, at most 8192^2 pixels)",
    )
    p.set_defaults(func=run_plan)
    return p
