"""SELF: Sequence-Extended Latent Fusion.

Any number of reference images share ONE pixel budget: they are resized by a common scale so that the
reference part of a sample's sequence has a bounded length whatever the number of references. Each
sample's latents -- the noisy target first, then the references in order -- are patchified and
serialized into one token sequence; a batch of such sequences is packed without padding and described
by int32 `cu_seqlens` offsets and per-token 3-D position ids (image index, patch row, patch col).

The kernels behind packing live in `csrc/packing/` (one launch for the whole batch on CPU and CUDA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from uniref import ops as _ops_module  # noqa: F401  (registers the ops)

_ops = torch.ops.uniref

__all__ = [
    "PackedLatents",
    "concat_joint",
    "pack_latents",
    "plan_reference_sizes",
    "split_joint",
    "unpack_latents",
]

_MODES = ("global", "per_image")


def _round_side(x: float, multiple: int) -> int:
    """Nearest positive multiple of `multiple` (ties round up, never 0)."""
    return max(multiple, multiple * math.floor(x / multiple + 0.5))


def _scaled_side(side: int, scale: Fraction, multiple: int) -> int:
    """`_round_side(side * scale)` in exact arithmetic: where two sides reach a rounding tie at the same
    scale, float rounding could round one up and the other down, which no single scale does."""
    n = (2 * side * scale.numerator + multiple * scale.denominator) // (2 * multiple * scale.denominator)
    return max(multiple, multiple * n)


def _check_sizes(sizes) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(s) for s in sizes]
    except TypeError:
        raise ValueError(f"sizes must be a list of (height, width) pairs, got {sizes!r}") from None
    if not pairs:
        raise ValueError("sizes is empty: pass the (height, width) of at least one reference image")
    out = []
    for k, pair in enumerate(pairs):
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
            raise ValueError(f"sizes[{k}] must be a (height, width) pair of ints, got {pair!r}")
        if pair[0] <= 0 or pair[1] <= 0:
            raise ValueError(f"sizes[{k}] = {pair} must be positive; an image needs at least one pixel")
        out.append((int(pair[0]), int(pair[1])))
    return out


def plan_reference_sizes(
    sizes: Sequence[tuple[int, int]],
    pixel_budget: int,
    multiple: int = 16,
    mode: str = "global",
) -> list[tuple[int, int]]:
    """Plans the resized (height, width) of each reference image.

    Args:
        sizes: the references' original `(height, width)` in pixels, in order.
        pixel_budget: the pixel area available. In ``"global"`` mode it bounds the *total* area of all
            references (SELF); in ``"per_image"`` mode it is the target area of *each* reference.
        multiple: every output side is a positive multiple of this (VAE factor 8 x patch 2 = 16).
        mode: ``"global"`` -- one common scale for all references, the largest for which
            ``sum(h * w) <= pixel_budget`` after rounding (it scales up as well as down, keeping relative
            sizes and aspect ratios); ``"per_image"`` -- each reference resized on its own to about
            ``pixel_budget`` area with its aspect ratio, as the Qwen-Image-Edit-Plus pipeline does.

    Returns:
        ``[(height, width), ...]``, one pair per input. Each side is within one rounding step of the
        exactly scaled side (sides never drop below ``multiple``). Deterministic.

    Raises:
        ValueError: empty or non-positive sizes, a non-positive multiple, an unknown mode, or a budget
            smaller than one ``multiple x multiple`` tile per reference.
    """
    pairs = _check_sizes(sizes)
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple <= 0:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not isinstance(pixel_budget, int) or isinstance(pixel_budget, bool):
        raise ValueError(f"pixel_budget must be an int number of pixels, got {pixel_budget!r}")
    floor = (len(pairs) if mode == "global" else 1) * multiple * multiple
    if pixel_budget < floor:
        raise ValueError(
            f"pixel_budget={pixel_budget} is too small for {len(pairs)} reference(s) in {mode!r} mode: "
            f"each needs at least one {multiple}x{multiple} tile, so the budget must be >= {floor}"
        )

    if mode == "per_image":
        out = []
        for h, w in pairs:
            scale = math.sqrt(pixel_budget / (h * w))
            out.append((_round_side(h * scale, multiple), _round_side(w * scale, multiple)))
        return out

    def sized(scale: float) -> list[tuple[int, int]]:
        exact = Fraction(scale)
        return [(_scaled_side(h, exact, multiple), _scaled_side(w, exact, multiple)) for h, w in pairs]

    def area(plan) -> int:
        return sum(h * w for h, w in plan)

    # Rounded sides never shrink as the scale grows, so the total area is a non-decreasing step
    # function of the scale: bisect for the last step that fits.
    lo = 0.0  # every side at its minimum: fits, as checked above
    hi = 2.0 * math.sqrt(pixel_budget / sum(h * w for h, w in pairs)) + 2.0 * multiple / min(min(p) for p in pairs)
    while area(sized(hi)) <= pixel_budget:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if area(sized(mid)) <= pixel_budget:
            lo = mid
        else:
            hi = mid
    return sized(lo)


@dataclass(frozen=True)
class PackedLatents:
    """A batch of SELF sequences packed without padding.

    Attributes:
        tokens: ``(T, C * p * p)`` -- every sample's images, patchified and concatenated; within a
            sample the target's tokens come first, then each reference's; within an image tokens are
            row-major and a token's features are ordered (channel, patch row, patch col), exactly as
            diffusers' Qwen-Image ``_pack_latents``.
        cu_seqlens: int32 ``(B + 1,)`` sample boundaries in ``tokens``, on the tokens' device.
        max_seqlen: the longest sample, a Python int.
        position_ids: int32 ``(T, 3)``: (image index within the sample -- 0 for the target --, patch
            row, patch col).
        image_sizes: per sample, per image, the latent ``(h, w)``; with ``channels`` and
            ``patch_size`` it is all `unpack_latents` needs.
    """

    tokens: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    position_ids: Tensor
    image_sizes: tuple[tuple[tuple[int, int], ...], ...]
    channels: int
    patch_size: int

    @property
    def batch_size(self) -> int:
        return len(self.image_sizes)

    @property
    def seqlens(self) -> list[int]:
        """Tokens per sample (host ints)."""
        return [sum(self.image_tokens(b)) for b in range(self.batch_size)]

    def image_tokens(self, sample: int) -> list[int]:
        """Token count of each image of one sample, target first."""
        p = self.patch_size
        return [(h // p) * (w // p) for h, w in self.image_sizes[sample]]

    def target_slices(self) -> list[slice]:
        """Per sample, the rows of ``tokens`` holding its target (image 0)."""
        out, start = [], 0
        for b in range(self.batch_size):
            counts = self.image_tokens(b)
            out.append(slice(start, start + counts[0]))
            start += sum(counts)
        return out


def _offsets(lengths: Sequence[int], device) -> Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def pack_latents(latents: Sequence[Sequence[Tensor]], patch_size: int = 2) -> PackedLatents:
    """Packs a batch of samples' latents into one token sequence (one kernel launch).

    Args:
        latents: ``latents[i]`` is sample i's list of images as latents ``(C, h, w)``: index 0 the (noisy)
            target, then the references in order. Samples may hold different numbers and sizes of
            images; all share C, dtype and device; h and w are multiples of ``patch_size``.
        patch_size: side of the square patch that becomes one token.

    Returns:
        A `PackedLatents`. Differentiable with respect to every latent.
    """
    if isinstance(latents, Tensor) or not all(isinstance(s, (list, tuple)) and s for s in latents) or not latents:
        raise ValueError(
            "latents must be a non-empty list of samples, each a non-empty list of (C, h, w) tensors "
            "(target first, then references); wrap a single sample as [[target, ref1, ...]]"
        )
    flat = [x for sample in latents for x in sample]
    for k, x in enumerate(flat):
        if not isinstance(x, Tensor):
            raise ValueError(f"latents hold a {type(x).__name__} at flat position {k}; expected a (C, h, w) tensor")
    tokens, position_ids = _ops.pack_latents(flat, [len(s) for s in latents], patch_size)
    sizes = tuple(tuple((int(x.shape[1]), int(x.shape[2])) for x in sample) for sample in latents)
    p = patch_size
    lengths = [sum((h // p) * (w // p) for h, w in sample) for sample in sizes]
    return PackedLatents(
        tokens=tokens,
        cu_seqlens=_offsets(lengths, tokens.device),
        max_seqlen=max(lengths),
        position_ids=position_ids,
        image_sizes=sizes,
        channels=int(flat[0].shape[0]),
        patch_size=p,
    )


def unpack_latents(tokens: Tensor, packed: PackedLatents) -> list[list[Tensor]]:
    """Inverse of `pack_latents` for ``tokens`` laid out as ``packed.tokens`` (e.g. a model's output).

    Returns ``[[target, ref1, ...] per sample]`` as contiguous ``(C, h, w)`` tensors; the round trip
    ``unpack_latents(pack_latents(x).tokens, ...)`` is bitwise exact. Differentiable.
    """
    if tokens.dim() != 2 or tokens.shape[1] != packed.tokens.shape[1]:
        raise ValueError(
            f"tokens must be (T, {packed.tokens.shape[1]}) like packed.tokens, got {tuple(tokens.shape)}"
        )
    flat_sizes = [v for sample in packed.image_sizes for hw in sample for v in hw]
    images = _ops.unpack_latents(tokens, flat_sizes, packed.patch_size)
    out, k = [], 0
    for sample in packed.image_sizes:
        out.append(list(images[k : k + len(sample)]))
        k += len(sample)
    return out


def concat_joint(
    text: Tensor, cu_seqlens_text: Tensor, image: Tensor, cu_seqlens_image: Tensor
) -> tuple[Tensor, Tensor]:
    """Interleaves two packed streams per sample into the joint MMDiT sequence ``[text_b ; image_b]``.

    Args:
        text: ``(Tt, ...)`` packed text stream; image: ``(Ti, ...)`` packed image stream with the same
            trailing shape (e.g. ``(T, heads, head_dim)`` for q/k/v).
        cu_seqlens_text, cu_seqlens_image: int32 ``(B + 1,)`` offsets of each stream.

    Returns:
        ``(joint (Tt + Ti, ...), cu_seqlens_joint)`` with ``cu_seqlens_joint = cu_seqlens_text +
        cu_seqlens_image``. Differentiable in both streams.
    """
    joint = _ops.joint_concat(text, image, cu_seqlens_text, cu_seqlens_image)
    return joint, cu_seqlens_text + cu_seqlens_image


def split_joint(
    joint: Tensor, cu_seqlens_text: Tensor, cu_seqlens_image: Tensor, text_total: int | None = None
) -> tuple[Tensor, Tensor]:
    """Inverse of `concat_joint`: returns ``(text, image)`` packed streams.

    ``text_total`` (the text stream's row count) sizes the outputs; when omitted it is read from
    ``cu_seqlens_text[-1]``, which synchronizes with the device -- pass it in hot loops and under
    ``torch.compile``.
    """
    if text_total is None:
        text_total = int(cu_seqlens_text[-1])
    return _ops.joint_split(joint, cu_seqlens_text, cu_seqlens_image, text_total)
