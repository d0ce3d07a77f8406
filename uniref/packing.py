"""SELF: Sequence-Extended Latent Fusion.

Any number of reference images share ONE pixel budget: they are resized by a common scale so that the
reference part of a sample's sequence has a bounded length whatever the number of references. Each
sample's latents -- the noisy target first, then the references in order -- are patchified and
serialized into one token sequence; a batch of such sequences is packed without padding and described
by int32 `cu_seqlens` offsets and per-token 3-D position ids (image index, patch row, patch col).

The kernels behind packing live in `csrc/packing/` (one launch for the whole batch on CPU and CUDA). The
data (tokens) and the layout (`SequenceLayout`: offsets, position ids, image sizes, target/reference
split) are separate objects: a model takes both, as diffusers' models take data first and layout as
metadata.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from uniref import ops as _ops_module  # noqa: F401  (registers the ops)

_ops = torch.ops.uniref

__all__ = [
    "BudgetMode",
    "PackedLatents",
    "SequenceLayout",
    "cu_seqlens_from_lengths",
    "fit_area",
    "concat_joint",
    "pack_latents",
    "plan_reference_sizes",
    "split_joint",
    "unpack_latents",
]

BudgetMode = Literal["global", "per_image"]
BUDGET_MODES: tuple[str, ...] = BudgetMode.__args__


def _round_side(x: float, multiple: int) -> int:
    """Nearest positive multiple of `multiple` (ties round up, never 0)."""
    return max(multiple, multiple * math.floor(x / multiple + 0.5))


def _scaled_side(side: int, scale: Fraction, multiple: int) -> int:
    """`_round_side(side * scale)` in exact arithmetic: where two sides reach a rounding tie at the same
    scale, float rounding could round one up and the other down, which no single scale does."""
    n = (2 * side * scale.numerator + multiple * scale.denominator) // (2 * multiple * scale.denominator)
    return max(multiple, multiple * n)


def fit_area(size: tuple[int, int], pixel_area: int, multiple: int = 16) -> tuple[int, int]:
    """``size`` ``(height, width)`` scaled to about ``pixel_area`` pixels with its aspect ratio, each side the
    nearest positive multiple of ``multiple``: how the pipeline sizes a default output."""
    ((h, w),) = _check_sizes([size])
    scale = math.sqrt(pixel_area / (h * w))
    return _round_side(h * scale, multiple), _round_side(w * scale, multiple)


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
    mode: BudgetMode = "global",
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
            ``pixel_budget`` area with its aspect ratio, exactly as the Qwen-Image-Edit-Plus pipeline sizes
            its references (diffusers' ``calculate_dimensions``: sides multiples of 32, or of
            ``lcm(32, multiple)``).

    Returns:
        ``[(height, width), ...]``, one pair per input. Each side is within one rounding step of the
        exactly scaled side (sides never drop below ``multiple``, or ``lcm(32, multiple)`` in
        ``"per_image"`` mode). Deterministic.

    Raises:
        ValueError: empty or non-positive sizes, a non-positive multiple, an unknown mode, or a budget
            smaller than one ``multiple x multiple`` tile per reference.
    """
    pairs = _check_sizes(sizes)
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple <= 0:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    if mode not in BUDGET_MODES:
        raise ValueError(f"mode must be one of {BUDGET_MODES}, got {mode!r}")
    if not isinstance(pixel_budget, int) or isinstance(pixel_budget, bool):
        raise ValueError(f"pixel_budget must be an int number of pixels, got {pixel_budget!r}")
    floor = (len(pairs) if mode == "global" else 1) * multiple * multiple
    if pixel_budget < floor:
        raise ValueError(
            f"pixel_budget={pixel_budget} is too small for {len(pairs)} reference(s) in {mode!r} mode: "
            f"each needs at least one {multiple}x{multiple} tile, so the budget must be >= {floor}"
        )

    if mode == "per_image":
        # Qwen-Image-Edit-Plus' own rule (diffusers' `calculate_dimensions`), float for float: the width from
        # the area and the aspect ratio, the height from the width, each rounded half-to-even to 32 pixels
        # (to a multiple of lcm(32, multiple) where the model needs coarser sides).
        step = math.lcm(32, multiple)
        out = []
        for h, w in pairs:
            ratio = w / h
            width = math.sqrt(pixel_budget * ratio)
            height = width / ratio
            out.append((max(step, round(height / step) * step), max(step, round(width / step) * step)))
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


def cu_seqlens_from_lengths(lengths: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """int32 ``(len(lengths) + 1,)`` offsets ``[0, l0, l0 + l1, ...]``: the one lengths-to-offsets helper."""
    return torch.tensor([0, *itertools.accumulate(int(n) for n in lengths)], dtype=torch.int32, device=device)


def _position_ids(image_sizes: Sequence[Sequence[tuple[int, int]]], patch_size: int, device) -> Tensor:
    """``(T, 3)`` int32 (image index in its sample, patch row, patch col): what `pack_latents`'s kernel
    writes beside the tokens, from the sizes alone (for layouts built without tokens)."""
    rows = []
    for sample in image_sizes:
        for k, (h, w) in enumerate(sample):
            hp, wp = h // patch_size, w // patch_size
            r = torch.arange(hp, dtype=torch.int32).repeat_interleave(wp)
            c = torch.arange(wp, dtype=torch.int32).repeat(hp)
            rows.append(torch.stack([torch.full_like(r, k), r, c], dim=1))
    if not rows:
        return torch.zeros(0, 3, dtype=torch.int32, device=device)
    return torch.cat(rows).to(device)


@dataclass(frozen=True, eq=False)
class SequenceLayout:
    """Where every image's tokens sit in a packed batch of SELF sequences: the metadata, not the data.

    Immutable and hashable by identity, so a model can cache what it derives from a layout (offsets,
    rotary tables) for as long as the same layout comes back -- every step of a sampling loop.

    Attributes:
        image_sizes: per sample, per image, the latent ``(h, w)``; image 0 of a sample is its target, the
            rest its references in order.
        channels: latent channels ``C``; a token has ``C * patch_size ** 2`` features.
        patch_size: side of the square patch that becomes one token.
        cu_seqlens: int32 ``(B + 1,)`` sample boundaries in the packed rows.
        position_ids: int32 ``(T, 3)``: (image index within the sample -- 0 for the target --, patch row,
            patch col).
    """

    image_sizes: tuple[tuple[tuple[int, int], ...], ...]
    channels: int
    patch_size: int
    cu_seqlens: Tensor
    position_ids: Tensor
    # what the properties derive, computed on first use (no functools.cached_property: its lock stops dynamo)
    _derived: dict = field(default_factory=dict, init=False, repr=False)

    def _once(self, key: str, fn):
        if key not in self._derived:
            self._derived[key] = fn()
        return self._derived[key]

    @classmethod
    def from_image_sizes(
        cls,
        image_sizes: Sequence[Sequence[tuple[int, int]]],
        channels: int,
        patch_size: int = 2,
        device: torch.device | str | None = None,
    ) -> "SequenceLayout":
        """The layout `pack_latents` would return for latents of these sizes, without any tokens."""
        sizes = tuple(tuple((int(h), int(w)) for h, w in sample) for sample in image_sizes)
        for b, sample in enumerate(sizes):
            for k, (h, w) in enumerate(sample):
                if h <= 0 or w <= 0 or h % patch_size or w % patch_size:
                    raise ValueError(
                        f"image_sizes[{b}][{k}] = {(h, w)}: latent sides must be positive multiples of "
                        f"patch_size={patch_size}"
                    )
        p = patch_size
        lengths = [sum((h // p) * (w // p) for h, w in sample) for sample in sizes]
        return cls(sizes, int(channels), p, cu_seqlens_from_lengths(lengths, device), _position_ids(sizes, p, device))

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    @property
    def batch_size(self) -> int:
        return len(self.image_sizes)

    @property
    def features(self) -> int:
        """Features of one token, ``channels * patch_size ** 2``."""
        return self.channels * self.patch_size**2

    def image_tokens(self, sample: int) -> list[int]:
        """Token count of each image of one sample, target first."""
        p = self.patch_size
        return [(h // p) * (w // p) for h, w in self.image_sizes[sample]]

    @property
    def seqlens(self) -> list[int]:
        """Tokens per sample (host ints)."""
        return self._once("seqlens", lambda: [sum(self.image_tokens(b)) for b in range(self.batch_size)])

    @property
    def max_seqlen(self) -> int:
        """The longest sample's token count (a host int, 0 for an empty batch)."""
        return max(self.seqlens, default=0)

    @property
    def total_tokens(self) -> int:
        return sum(self.seqlens)

    @property
    def target_lengths(self) -> list[int]:
        """Tokens of each sample's target (image 0)."""
        return self._once("target_lengths", lambda: [self.image_tokens(b)[0] for b in range(self.batch_size)])

    @property
    def reference_lengths(self) -> list[int]:
        """Tokens of each sample's references together."""
        return self._once("reference_lengths", lambda: [sum(self.image_tokens(b)[1:]) for b in range(self.batch_size)])

    @property
    def cu_targets(self) -> Tensor:
        """int32 ``(B + 1,)`` offsets of the targets alone: with `cu_references`, the split of every
        sample's ``[target ; references]`` that `uniref.split_joint` / `uniref.concat_joint` take."""
        return self._once("cu_targets", lambda: cu_seqlens_from_lengths(self.target_lengths, self.device))

    @property
    def cu_references(self) -> Tensor:
        """int32 ``(B + 1,)`` offsets of the references alone (see `cu_targets`)."""
        return self._once("cu_references", lambda: cu_seqlens_from_lengths(self.reference_lengths, self.device))

    def target_slices(self) -> list[slice]:
        """Per sample, the rows of the packed tokens holding its target (image 0)."""
        out, start = [], 0
        for n, total in zip(self.target_lengths, self.seqlens):
            out.append(slice(start, start + n))
            start += total
        return out

    def targets(self) -> "SequenceLayout":
        """The layout of the targets alone (one image per sample): how a sampling state is packed."""
        return SequenceLayout.from_image_sizes(
            [s[:1] for s in self.image_sizes], self.channels, self.patch_size, self.device
        )

    def repeat(self, copies: int) -> "SequenceLayout":
        """The batch repeated ``copies`` times, sample order ``[0..B-1, 0..B-1, ...]`` (e.g. the conditional
        and unconditional branches of classifier-free guidance)."""
        if copies == 1:
            return self
        return SequenceLayout.from_image_sizes(self.image_sizes * copies, self.channels, self.patch_size, self.device)

    def select(self, samples: Sequence[int]) -> "SequenceLayout":
        """The layout of the given samples alone, in the given order."""
        return SequenceLayout.from_image_sizes(
            [self.image_sizes[i] for i in samples], self.channels, self.patch_size, self.device
        )


class PackedLatents(NamedTuple):
    """What `pack_latents` returns: ``(tokens, layout)``; unpack it as a pair.

    Attributes:
        tokens: ``(T, C * p * p)`` -- every sample's images, patchified and concatenated; within a
            sample the target's tokens come first, then each reference's; within an image tokens are
            row-major and a token's features are ordered (channel, patch row, patch col), exactly as
            diffusers' Qwen-Image ``_pack_latents``.
        layout: the `SequenceLayout` (offsets, position ids, image sizes, target/reference split).

    The layout's attributes (``cu_seqlens``, ``max_seqlen``, ``position_ids``, ``image_sizes``, ``channels``,
    ``patch_size``, ``batch_size``, ``seqlens``, ``image_tokens``, ``target_slices``) are also readable
    here, as before the layout had its own object. Deprecated: read them from ``.layout``; they go in the
    next release.
    """

    tokens: Tensor
    layout: SequenceLayout

    def __getattr__(self, name: str):
        if name in _LAYOUT_FORWARDS:
            return getattr(self.layout, name)
        raise AttributeError(f"'PackedLatents' object has no attribute {name!r}")


_LAYOUT_FORWARDS = frozenset(
    {
        "cu_seqlens",
        "max_seqlen",
        "position_ids",
        "image_sizes",
        "channels",
        "patch_size",
        "batch_size",
        "seqlens",
        "image_tokens",
        "target_slices",
    }
)


def pack_latents(latents: Sequence[Sequence[Tensor]], patch_size: int = 2) -> PackedLatents:
    """Packs a batch of samples' latents into one token sequence (one kernel launch).

    Args:
        latents: ``latents[i]`` is sample i's list of images as latents ``(C, h, w)``: index 0 the (noisy)
            target, then the references in order. Samples may hold different numbers and sizes of
            images; all share C, dtype and device; h and w are multiples of ``patch_size``.
        patch_size: side of the square patch that becomes one token.

    Returns:
        `PackedLatents` ``(tokens (T, C * p * p), layout)``. Differentiable with respect to every latent.
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
    layout = SequenceLayout(
        sizes, int(flat[0].shape[0]), p, cu_seqlens_from_lengths(lengths, tokens.device), position_ids
    )
    return PackedLatents(tokens, layout)


def unpack_latents(tokens: Tensor, layout: SequenceLayout | PackedLatents) -> list[list[Tensor]]:
    """Inverse of `pack_latents` for ``tokens`` ``(T, C * p * p)`` laid out by ``layout`` (e.g. a model's
    output). A `PackedLatents` is accepted for its layout.

    Returns ``[[target, ref1, ...] per sample]`` as contiguous ``(C, h, w)`` tensors; the round trip
    ``unpack_latents(*pack_latents(x))`` is bitwise exact. Differentiable.
    """
    if isinstance(layout, PackedLatents):
        layout = layout.layout
    if tokens.dim() != 2 or tokens.shape != (layout.total_tokens, layout.features):
        raise ValueError(
            f"tokens must be ({layout.total_tokens}, {layout.features}) as the layout describes, "
            f"got {tuple(tokens.shape)}"
        )
    flat_sizes = [v for sample in layout.image_sizes for hw in sample for v in hw]
    images = _ops.unpack_latents(tokens, flat_sizes, layout.patch_size)
    out, k = [], 0
    for sample in layout.image_sizes:
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
