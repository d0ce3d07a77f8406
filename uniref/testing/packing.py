"""Plain-torch references for the packing ops (reshape/permute/cat), shared by tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def patchify(x: Tensor, p: int) -> Tensor:
    """(C, h, w) -> (h/p * w/p, C*p*p), features ordered (channel, patch row, patch col), as diffusers'
    Qwen-Image `_pack_latents`."""
    c, h, w = x.shape
    return x.reshape(c, h // p, p, w // p, p).permute(1, 3, 0, 2, 4).reshape((h // p) * (w // p), c * p * p)


def unpatchify(tokens: Tensor, h: int, w: int, p: int) -> Tensor:
    """Inverse of `patchify` for one image: (h/p * w/p, C*p*p) -> (C, h, w)."""
    c = tokens.shape[1] // (p * p)
    return tokens.reshape(h // p, w // p, c, p, p).permute(2, 0, 3, 1, 4).reshape(c, h, w)


def pack_reference(latents: Sequence[Sequence[Tensor]], p: int) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (tokens, position_ids int32 (T, 3), cu_seqlens int32) for a batch of samples."""
    tokens, pos, lengths = [], [], []
    for sample in latents:
        n = 0
        for k, x in enumerate(sample):
            hp, wp = x.shape[1] // p, x.shape[2] // p
            tokens.append(patchify(x, p))
            rows, cols = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
            pos.append(torch.stack([torch.full_like(rows, k), rows, cols], dim=-1).reshape(-1, 3))
            n += hp * wp
        lengths.append(n)
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    device = tokens[0].device
    return torch.cat(tokens), torch.cat(pos).to(device=device, dtype=torch.int32), cu.to(device)


def unpack_reference(tokens: Tensor, image_sizes: Sequence[Sequence[tuple[int, int]]], p: int) -> list[list[Tensor]]:
    out, start = [], 0
    for sample in image_sizes:
        images = []
        for h, w in sample:
            n = (h // p) * (w // p)
            images.append(unpatchify(tokens[start : start + n], h, w, p))
            start += n
        out.append(images)
    return out


def concat_joint_reference(text: Tensor, cu_text: Tensor, image: Tensor, cu_image: Tensor) -> Tensor:
    ct, ci = cu_text.tolist(), cu_image.tolist()
    parts = []
    for b in range(len(ct) - 1):
        parts += [text[ct[b] : ct[b + 1]], image[ci[b] : ci[b + 1]]]
    return torch.cat(parts)


def split_joint_reference(joint: Tensor, cu_text: Tensor, cu_image: Tensor) -> tuple[Tensor, Tensor]:
    ct, ci = cu_text.tolist(), cu_image.tolist()
    texts, images, start = [], [], 0
    for b in range(len(ct) - 1):
        lt, li = ct[b + 1] - ct[b], ci[b + 1] - ci[b]
        texts.append(joint[start : start + lt])
        images.append(joint[start + lt : start + lt + li])
        start += lt + li
    return torch.cat(texts), torch.cat(images)
