"""The `uniref` command line: `uniref edit`, `uniref eval` (synthetic benchmark), `uniref plan` (SELF demo),
`uniref info`."""

from __future__ import annotations

import argparse
import sys

import torch

# A composition request as a user would make it: a wide background, a portrait and a small object
# photo, each with its own size (height, width).
_DEMO_SIZES = [(768, 1360), (1024, 768), (320, 480)]


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must look like HEIGHTxWIDTH, e.g. 1024x768") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return h, w


def _cmd_plan(args: argparse.Namespace) -> int:
    from uniref.packing import pack_latents, plan_reference_sizes

    sizes = args.size or _DEMO_SIZES
    vae, patch = 8, 2
    multiple = vae * patch
    rows = [(mode, plan_reference_sizes(sizes, args.budget, multiple=multiple, mode=mode))
            for mode in ("global", "per_image")]
    print(f"{len(sizes)} reference(s), pixel budget {args.budget} ({args.budget ** 0.5:.0f}^2), "
          f"target {args.target[0]}x{args.target[1]}")
    for mode, plan in rows:
        print(f"\nmode={mode}")
        print(f"  {'ref':>3}  {'original':>11}  {'planned':>11}  {'tokens':>6}")
        for k, ((h0, w0), (h, w)) in enumerate(zip(sizes, plan), start=1):
            print(f"  {k:>3}  {h0:>5}x{w0:<5}  {h:>5}x{w:<5}  {(h // multiple) * (w // multiple):>6}")
        ref_tokens = sum((h // multiple) * (w // multiple) for h, w in plan)
        print(f"  reference tokens {ref_tokens}, reference pixels {sum(h * w for h, w in plan)}")

    # Pack one sample per mode (latents are random: the point is the layout) in one call.
    th, tw = args.target
    gen = torch.Generator().manual_seed(0)
    samples = [
        [torch.randn(16, th // vae, tw // vae, generator=gen)]
        + [torch.randn(16, h // vae, w // vae, generator=gen) for h, w in plan]
        for _, plan in rows
    ]
    packed = pack_latents(samples, patch_size=patch)
    print(f"\npacked batch (sample 0 = global, sample 1 = per_image): tokens {tuple(packed.tokens.shape)}, "
          f"cu_seqlens {packed.cu_seqlens.tolist()}, max_seqlen {packed.max_seqlen}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from uniref.info import info

    info()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="plan reference sizes under one pixel budget (SELF) and pack them")
    plan.add_argument("--size", action="append", type=_parse_size, metavar="HxW",
                      help="a reference's original size; repeat per reference (default: a 3-image example)")
    plan.add_argument("--budget", type=int, default=1024 * 1024, help="total reference pixels (default 1024^2)")
    plan.add_argument("--target", type=_parse_size, default=(1024, 1024), metavar="HxW",
                      help="output size, multiples of 16 (default 1024x1024)")
    plan.set_defaults(func=_cmd_plan)

    info = sub.add_parser("info", help="what this install was built with")
    info.set_defaults(func=_cmd_info)

    from uniref.edit_cli import add_edit_parser
    from uniref.synthetic.eval import add_eval_parser

    add_edit_parser(sub)
    add_eval_parser(sub)

    from uniref.demo import add_demo_parser  # gradio itself is imported only when the demo runs

    add_demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plan" and (args.target[0] % 16 or args.target[1] % 16):
        print(f"uniref plan: --target {args.target[0]}x{args.target[1]} must have sides that are multiples of 16",
              file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"uniref {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
