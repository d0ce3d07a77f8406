"""GPU check of the SELF packing kernels: correctness vs the torch reference on the card, then
bandwidth vs a plain device-to-device copy. Usage: python benchmarks/gpu/packing.py [--smoke]

--smoke runs everything at tiny shapes on whatever device is present (CPU here), to keep the script
working between GPU sessions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared batch

from test_packing import realistic_batch  # noqa: E402

import uniref  # noqa: E402
from uniref.testing.packing import concat_joint_reference, pack_reference  # noqa: E402

from common import bench_ms, card_header, copy_bandwidth_gbs  # noqa: E402


def check(device, dtype, samples, row_shape):
    batch = [[x.to(device=device, dtype=dtype) for x in s] for s in realistic_batch(samples=samples)]
    packed = uniref.pack_latents(batch)
    tokens, pos, cu = pack_reference(batch, 2)
    assert torch.equal(packed.tokens, tokens), "pack_latents tokens differ from the reference"
    assert torch.equal(packed.layout.position_ids, pos) and torch.equal(packed.layout.cu_seqlens, cu)
    back = uniref.unpack_latents(*packed)
    assert all(torch.equal(a, b) for s, t in zip(batch, back) for a, b in zip(s, t)), "unpack is not exact"
    # joint [text ; image] streams with rows shaped like the model's q/k/v (heads, head_dim)
    lens_t = [77 + 13 * b for b in range(samples)]
    cu_t = torch.tensor([0] + lens_t, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    text = torch.randn(sum(lens_t), *row_shape, device=device, dtype=dtype)
    image = torch.randn(packed.tokens.shape[0], *row_shape, device=device, dtype=dtype)
    joint, _ = uniref.concat_joint(text, cu_t, image, packed.layout.cu_seqlens)
    expected = concat_joint_reference(text, cu_t, image, packed.layout.cu_seqlens)
    assert torch.equal(joint, expected), "joint_concat differs"
    return batch, packed, (text, cu_t, image)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the available device")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    samples, row_shape = (2, (2, 16)) if args.smoke else (8, (24, 128))
    print(card_header("SELF packing (8 samples x 1-6 refs, 16-ch latents @1024^2)"))
    print("| dtype | op | tokens | ours ms | ours GB/s | copy GB/s | ours / copy |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        batch, packed, (text, cu_t, image) = check(device, dtype, samples, row_shape)
        flat = [x for s in batch for x in s]
        counts = [len(s) for s in batch]
        sizes = [v for x in flat for v in x.shape[1:]]
        nbytes = packed.tokens.numel() * packed.tokens.element_size()
        copy = copy_bandwidth_gbs(nbytes, device)
        for name, fn in (
            ("pack", lambda: torch.ops.uniref.pack_latents(flat, counts, 2)),
            ("unpack", lambda: torch.ops.uniref.unpack_latents(packed.tokens, sizes, 2)),
        ):
            ms = bench_ms(fn)
            gbs = 2 * nbytes / ms / 1e6  # every element read once and written once
            print(
                f"| {str(dtype).split('.')[-1]} | {name} | {packed.tokens.shape[0]} | {ms:.4f} | {gbs:.0f} | "
                f"{copy:.0f} | {gbs / copy:.2f} |"
            )
        joint_bytes = (text.numel() + image.numel()) * text.element_size()
        joint_copy = copy_bandwidth_gbs(joint_bytes, device)
        ms = bench_ms(lambda: torch.ops.uniref.joint_concat(text, image, cu_t, packed.layout.cu_seqlens))
        gbs = 2 * joint_bytes / ms / 1e6
        print(
            f"| {str(dtype).split('.')[-1]} | joint_concat {tuple(row_shape)} | {text.shape[0] + image.shape[0]} | "
            f"{ms:.4f} | {gbs:.0f} | {joint_copy:.0f} | {gbs / joint_copy:.2f} |"
        )
    print("\ncorrectness: pack, unpack (bitwise) and joint concat match the torch reference on this device")


if __name__ == "__main__":
    main()
