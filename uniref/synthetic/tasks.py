"""Tasks of the synthetic world: an instruction over reference images with its exact answer.

Six task families: five single-image edits (``recolor``, ``move``, ``remove``, ``add``,
``background``), where the one reference is the image to edit, and ``compose``, where image 1 gives the
background and images 2..K each give one named object (among distractors) to place on it in a fixed
layout. Instructions come in several phrasings.

Splits are disjoint by construction. Every (shape, colour, family) triple belongs to exactly one split
(`split_of`); a task's *keyed* objects -- those its instruction names or creates -- are drawn only from
its split's triples, and the other objects in its images from the training triples. So no validation or
test instruction ever names a combination that training shows for that family, while each shape and each
colour still appears in training for every family (`split_combinations`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from uniref.synthetic.world import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    OBJECT_COLOURS,
    SHAPES,
    Background,
    Obj,
    Scene,
    describe_background,
    px,
    render_scene,
)

__all__ = [
    "EDIT_KINDS",
    "FAMILIES",
    "KINDS",
    "SPLITS",
    "SyntheticEditDataset",
    "Task",
    "TaskSpec",
    "collate_samples",
    "compose_layout",
    "edit_region",
    "sample_task",
    "split_combinations",
    "split_of",
]

EDIT_KINDS: tuple[str, ...] = ("recolor", "move", "remove", "add", "background")
FAMILIES: tuple[str, ...] = EDIT_KINDS + ("compose",)
KINDS: tuple[str, ...] = FAMILIES + ("edit",)  # "edit": one of EDIT_KINDS, chosen by the seed
SPLITS: tuple[str, ...] = ("train", "val", "test")
MIN_SIZE = 32  # below this a 12-px (64-scale) object is under 6 px and shapes stop being tellable apart

_COLOURS = tuple(OBJECT_COLOURS)
_BG_COLOURS = tuple(BACKGROUND_COLOURS)

# Single-image scenes put objects on a 3x3 grid of slots; objects are at most 16/64 of the side, so
# neighbours stay >= 5/64 apart and the rewards' search windows never reach a neighbour.
_SLOT_NAMES = (
    "top left", "top middle", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom middle", "bottom right",
)  # fmt: skip
_EDIT_SIZES = (12, 16)  # inclusive range, 64-px units
_ADD_SIZES = {"small": 12, "medium": 14, "large": 16}
# Composition references: (height, width) in 64-px units, square and not, so that planning their sizes
# under one pixel budget is not trivial.
_REF_SHAPES = ((64, 64), (48, 64), (64, 48), (64, 96), (96, 64), (80, 80), (48, 96), (96, 48))

_PHRASINGS = {
    "recolor": (
        "Make the {obj} {new}.",
        "Change the colour of the {obj} to {new}.",
        "Recolor the {obj} {new}.",
        "Paint the {obj} {new} and leave everything else as it is.",
    ),
    "move": (
        "Move the {obj} to the {pos}.",
        "Place the {obj} at the {pos} of the image.",
        "Shift the {obj} so that it sits at the {pos}.",
        "Relocate the {obj} to the {pos} position.",
    ),
    "remove": (
        "Remove the {obj}.",
        "Delete the {obj} from the image.",
        "Erase the {obj} and fill its place with the background.",
        "Take out the {obj}.",
    ),
    "add": (
        "Add a {sz} {obj} at the {pos}.",
        "Draw a {sz} {obj} at the {pos} of the image.",
        "Insert a {sz} {obj} in the {pos} position.",
        "Put a {sz} {obj} at the {pos}.",
    ),
    "background": (
        "Change the background to {bg}.",
        "Replace the background with {bg}.",
        "Keep the objects but make the background {bg}.",
        "Give the image {bg} as its background.",
    ),
    "compose": (
        "Put {objs} on the background of image 1, {layout}.",
        "On the background of image 1, place {objs}, {layout}.",
        "Using image 1 as the background, arrange {objs} {layout}.",
        "Combine {objs} over the background of image 1, {layout}.",
    ),
}


def split_of(shape: str, colour: str, family: str) -> str:
    """The split that owns the (shape, colour, family) triple.

    For family index f, shape index i and colour index j: ``(j - i - 2 f) mod 8`` = 0 -> ``"test"``,
    1 -> ``"val"``, else ``"train"``. Each shape thus loses exactly one colour to test and one to val per
    family, and the held-out colours rotate across shapes and families.
    """
    offset = (_COLOURS.index(colour) - SHAPES.index(shape) - 2 * FAMILIES.index(family)) % len(_COLOURS)
    return "test" if offset == 0 else "val" if offset == 1 else "train"


def split_combinations(split: str, family: str) -> tuple[tuple[str, str], ...]:
    """The (shape, colour) pairs that `split` owns for `family`, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return _COMBOS[(split, family)]


_COMBOS = {
    (sp, fam): tuple((s, c) for s in SHAPES for c in _COLOURS if split_of(s, c, fam) == sp)
    for sp in SPLITS
    for fam in FAMILIES
}


@dataclass(frozen=True)
class TaskSpec:
    """The structured description of a task: everything the rewards need, nothing rendered.

    Attributes:
        kind: the family, one of `FAMILIES`.
        split, seed, size: how it was sampled (`sample_task` with these arguments returns it again).
        references: the input scenes, in order (image 1 first).
        target: the answer's scene, ``size`` x ``size``.
        placed: indices into ``target.objects`` of the objects the instruction puts in place (the edited,
            moved or added object; every composed object); integration checks each one.
        vacated: source objects whose area must show the background afterwards (moved, removed).
        new_background: the instruction replaces the background (integration checks it).
        keyed: the (shape, colour, family) triples the instruction names or creates; all in ``split``.
        phrasing: which phrasing template the prompt used.
    """

    kind: str
    split: str
    seed: int
    size: int
    references: tuple[Scene, ...]
    target: Scene
    placed: tuple[int, ...]
    vacated: tuple[Obj, ...]
    new_background: bool
    keyed: tuple[tuple[str, str, str], ...]
    phrasing: int


@dataclass
class Task:
    """One sample: ``images`` (references, RGB PIL), ``prompt``, the exact ``target`` (RGB PIL,
    ``size`` x ``size``) and the ``spec`` that generated them."""

    images: list[Image.Image]
    prompt: str
    target: Image.Image
    spec: TaskSpec


def edit_region(spec: TaskSpec) -> list[tuple[int, int, int, int]]:
    """Boxes ``(y0, y1, x0, x1)`` (clipped) that a single-image edit may change: the placed and vacated
    objects' boxes grown by 3/64 of the side. Everything else must stay as in the reference."""
    pad = px(3, spec.size)
    objs = [spec.target.objects[i] for i in spec.placed] + list(spec.vacated)
    h, w = spec.target.height, spec.target.width
    return [
        (max(0, o.y - pad), min(h, o.y + o.size + pad), max(0, o.x - pad), min(w, o.x + o.size + pad)) for o in objs
    ]


# --- sampling ------------------------------------------------------------------------------------------


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _random_background(rng: random.Random, avoid: frozenset[str] = frozenset()) -> Background:
    colours = [c for c in _BG_COLOURS if c not in avoid]
    a, b = rng.sample(colours, 2)
    return Background(rng.choice(BACKGROUND_KINDS), (a, b), rng.random() < 0.5, rng.choice((8, 16)))


def _used_colours(bg: Background) -> frozenset[str]:
    return frozenset(bg.colours[:1] if bg.kind == "solid" else bg.colours)


def _slot_centres(size: int) -> list[tuple[int, int]]:
    """(x, y) pixel centres of the 3x3 slots, row-major (top left first)."""
    c = [int(round((i + 0.5) * size / 3.0)) for i in range(3)]
    return [(cx, cy) for cy in c for cx in c]


def _at(shape: str, colour: str, size_px: int, centre: tuple[int, int]) -> Obj:
    return Obj(shape, colour, size_px, centre[0] - size_px // 2, centre[1] - size_px // 2)


def _context(rng: random.Random, family: str, n: int, exclude: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """n distinct training combinations not in `exclude` (the objects an instruction does not name)."""
    pool = [c for c in _COMBOS[("train", family)] if c not in exclude]
    return rng.sample(pool, n)


def _edit_task(rng: random.Random, kind: str, split: str, size: int):
    """A single-image edit of a scene with 1-3 objects on the 3x3 slots. Returns (source scene, target
    scene, placed, vacated, keyed, whether the background changes, fields for the prompt)."""
    slots = _slot_centres(size)
    keyed_pool = _COMBOS[(split, kind)]
    bg = _random_background(rng)

    def sized() -> int:
        return px(rng.randint(*_EDIT_SIZES), size)

    if kind == "recolor":
        shape, new = rng.choice(keyed_pool)
        old = rng.choice([c for s, c in _COMBOS[("train", kind)] if s == shape and c != new])
        others = _context(rng, kind, rng.randint(0, 2), {(shape, new), (shape, old)})
        combos = [(shape, old)] + others
    elif kind in ("move", "remove"):
        combos = [rng.choice(keyed_pool)]
        combos += _context(rng, kind, rng.randint(1 if kind == "remove" else 0, 2), {combos[0]})
    elif kind == "add":
        added = rng.choice(keyed_pool)
        combos = _context(rng, kind, rng.randint(1, 2), {added})
    else:  # background: every object is keyed, none is context
        combos = rng.sample(keyed_pool, rng.randint(1, 2))

    where = rng.sample(range(9), len(combos) + 1)  # the last slot is a free destination
    src = [_at(s, c, sized(), slots[k]) for (s, c), k in zip(combos, where)]
    fields: dict[str, str] = {}
    placed: tuple[int, ...] = ()
    vacated: tuple[Obj, ...] = ()
    new_bg = bg
    dst = list(src)
    if kind == "recolor":
        dst[0] = Obj(shape, new, src[0].size, src[0].x, src[0].y)
        placed, keyed = (0,), [(shape, new)]
        fields = {"obj": src[0].name, "new": new}
    elif kind == "move":
        dst[0] = _at(src[0].shape, src[0].colour, src[0].size, slots[where[-1]])
        placed, vacated, keyed = (0,), (src[0],), [combos[0]]
        fields = {"obj": src[0].name, "pos": _SLOT_NAMES[where[-1]]}
    elif kind == "remove":
        dst = dst[1:]
        vacated, keyed = (src[0],), [combos[0]]
        fields = {"obj": src[0].name}
    elif kind == "add":
        word = rng.choice(tuple(_ADD_SIZES))
        dst.append(_at(added[0], added[1], px(_ADD_SIZES[word], size), slots[where[-1]]))
        placed, keyed = (len(dst) - 1,), [added]
        name = f"{added[1]} {added[0]}"
        fields = {"sz": word, "obj": name, "pos": _SLOT_NAMES[where[-1]]}
    else:
        new_bg = _random_background(rng, avoid=_used_colours(bg))
        keyed = combos
        fields = {"bg": describe_background(new_bg)}
    source = Scene(size, size, bg, tuple(src))
    target = Scene(size, size, new_bg, tuple(dst))
    return source, target, placed, vacated, keyed, new_bg is not bg, fields


def compose_layout(n: int, size: int) -> list[tuple[int, int]]:
    """(x, y) pixel centres of the n composed objects, in instruction order: one row left to right for
    n <= 3; for n = 4, 5 two rows (top row first), the top one holding ``ceil(n / 2)``."""
    rows = [n] if n <= 3 else [(n + 1) // 2, n // 2]
    out = []
    for r, count in enumerate(rows):
        cy = int(round((r + 0.5) * size / len(rows)))
        out += [(int(round((i + 0.5) * size / count)), cy) for i in range(count)]
    return out


def _compose_max_size(n: int) -> int:
    """Largest object (64-px units) for n composed objects: keeps neighbours >= 5/64 apart."""
    return 16 if n in (3, 5) else 20


def _place_free(rng: random.Random, h: int, w: int, s: int, taken: list[Obj], gap: int, margin: int):
    """A random top-left (x, y) for an s-px object inside h x w, >= gap px from every taken box, or None."""
    span_x, span_y = w - s - 2 * margin + 1, h - s - 2 * margin + 1
    for _ in range(30):
        # random() is several times cheaper than randint(), and placement is the hot loop of sampling
        x = margin + int(rng.random() * span_x)
        y = margin + int(rng.random() * span_y)
        if all(
            x >= o.x + o.size + gap or o.x >= x + s + gap or y >= o.y + o.size + gap or o.y >= y + s + gap
            for o in taken
        ):
            return x, y
    return None


def _compose_task(rng: random.Random, num_refs: int, split: str, size: int):
    """Image 1: a background at the target's size; images 2..K: one named object each, at its own size
    and place, among up to two distractors, on another background, in an image of another shape.
    Returns (reference scenes, target scene, placed, keyed, fields for the prompt)."""
    n = num_refs - 1
    keyed = [rng.choice(_COMBOS[(split, "compose")]) for _ in range(n)]
    base = Scene(size, size, _random_background(rng))
    refs = [base]
    sizes = []
    gap, margin = px(4, size), px(2, size)
    for shape, colour in keyed:
        h, w = (px(v, size) for v in rng.choice(_REF_SHAPES))
        s = px(rng.randint(12, _compose_max_size(n)), size)
        x, y = _place_free(rng, h, w, s, [], gap, margin)
        objs = [Obj(shape, colour, s, x, y)]
        for dshape, dcolour in _context(rng, "compose", rng.randint(0, 2), {(shape, colour)}):
            ds = px(rng.randint(12, 18), size)
            spot = _place_free(rng, h, w, ds, objs, gap, margin)
            if spot is not None:
                objs.append(Obj(dshape, dcolour, ds, *spot))
        refs.append(Scene(h, w, _random_background(rng), tuple(objs)))
        sizes.append(s)
    centres = compose_layout(n, size)
    placed_objs = tuple(_at(sh, co, s, c) for (sh, co), s, c in zip(keyed, sizes, centres))
    target = Scene(size, size, base.background, placed_objs)
    names = [f"the {co} {sh} from image {k + 2}" for k, (sh, co) in enumerate(keyed)]
    if n == 1:
        layout = "in the center"
    elif n <= 3:
        layout = "from left to right"
    else:
        layout = "in two rows, left to right, top row first"
    return refs, target, tuple(range(n)), keyed, {"objs": _join(names), "layout": layout}


def _generate(seed: int, kind: str, num_refs: int | None, size: int, split: str):
    """Samples a task without making PIL images: (reference arrays, prompt, target array, spec)."""
    rng = random.Random(f"{split}|{kind}|{num_refs}|{size}|{seed}")
    family = rng.choice(EDIT_KINDS) if kind == "edit" else kind
    if family == "compose":
        k = num_refs if num_refs is not None else rng.randint(2, 6)
        refs, target, placed, keyed, fields = _compose_task(rng, k, split, size)
        vacated, new_bg = (), False
    else:
        source, target, placed, vacated, keyed, new_bg, fields = _edit_task(rng, family, split, size)
        refs = [source]
    phrasing = rng.randrange(len(_PHRASINGS[family]))
    prompt = _PHRASINGS[family][phrasing].format(**fields)
    spec = TaskSpec(
        kind=family,
        split=split,
        seed=seed,
        size=size,
        references=tuple(refs),
        target=target,
        placed=placed,
        vacated=vacated,
        new_background=new_bg,
        keyed=tuple((s, c, family) for s, c in keyed),
        phrasing=phrasing,
    )
    arrays = [render_scene(r, size) for r in refs]
    # An edit's target shares untouched pixels with its source; rendering it afresh keeps them exact.
    return arrays, prompt, render_scene(target, size), spec


def _check_args(seed, kind, num_refs, size, split) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_SIZE:
        raise ValueError(f"size must be an int >= {MIN_SIZE} (the target's side in px), got {size!r}")
    if kind == "compose":
        if num_refs is not None and (not isinstance(num_refs, int) or not 2 <= num_refs <= 6):
            raise ValueError(f"num_refs for a composition must be an int in 2..6 (or None), got {num_refs!r}")
    elif num_refs not in (None, 1):
        raise ValueError(f"num_refs for a single-image edit ({kind!r}) must be 1 or None, got {num_refs!r}")


def sample_task(
    seed: int,
    kind: str = "compose",
    num_refs: int | None = None,
    size: int = 64,
    split: str = "train",
) -> Task:
    """Samples one task, deterministically.

    Args:
        seed: any int; the same arguments always give identical bytes.
        kind: a family in `FAMILIES`, or ``"edit"`` for a single-image edit family chosen by the seed.
        num_refs: for ``"compose"`` the number of references K in 2..6 (None: chosen by the seed, image 1
            being the background and images 2..K giving one object each); for edits 1 or None.
        size: the target's side in px (>= 32). References of a composition have other sizes and aspect
            ratios (image 1 always has the target's size); geometry scales with `size`.
        split: ``"train"``, ``"val"`` or ``"test"``: which (shape, colour, family) triples the
            instruction may name (see `split_of`).

    Returns:
        A `Task`: ``images`` (K RGB PIL images), ``prompt``, ``target`` (RGB PIL, size x size), ``spec``.
    """
    _check_args(seed, kind, num_refs, size, split)
    arrays, prompt, target, spec = _generate(int(seed), kind, num_refs, size, split)
    return Task([Image.fromarray(a) for a in arrays], prompt, Image.fromarray(target), spec)


# --- training data -------------------------------------------------------------------------------------


_DEFAULT_LENGTH = {"train": 100_000, "val": 1_000, "test": 1_000}


class SyntheticEditDataset(torch.utils.data.Dataset):
    """A deterministic map-style dataset of synthetic tasks for training and validation.

    Item ``i`` is a dict:
        ``target``: uint8 ``(3, size, size)``;
        ``references``: list of K uint8 ``(3, h_k, w_k)`` at their original sizes (plan them with
        `uniref.plan_reference_sizes`); ``reference_sizes``: ``[(h_k, w_k), ...]``;
        ``prompt``: str; ``kind``: the family; ``index``: ``i``.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint by construction, see `split_of`).
        length: number of items (default 100 000 for train, 1 000 otherwise); item i does not depend on it.
        size: the target side in px.
        compose_ratio: the probability that an item is a composition rather than a single-image edit.
        num_refs: inclusive (min, max) of K for compositions, within 2..6, drawn uniformly.
        edit_kinds: the single-image edit families to draw from, uniformly.
        seed: selects a different but equally deterministic stream of items.
    """

    def __init__(
        self,
        split: str = "train",
        length: int | None = None,
        size: int = 64,
        compose_ratio: float = 0.5,
        num_refs: tuple[int, int] = (2, 6),
        edit_kinds: Sequence[str] = EDIT_KINDS,
        seed: int = 0,
    ) -> None:
        _check_args(seed, "compose", None, size, split)
        if not 0.0 <= float(compose_ratio) <= 1.0:
            raise ValueError(f"compose_ratio must be in [0, 1], got {compose_ratio!r}")
        lo, hi = num_refs
        if not (isinstance(lo, int) and isinstance(hi, int) and 2 <= lo <= hi <= 6):
            raise ValueError(f"num_refs must be an inclusive (min, max) range within 2..6, got {num_refs!r}")
        kinds = tuple(edit_kinds)
        if compose_ratio < 1.0 and (not kinds or any(k not in EDIT_KINDS for k in kinds)):
            raise ValueError(f"edit_kinds must be a non-empty subset of {EDIT_KINDS}, got {edit_kinds!r}")
        self.split, self.size, self.seed = split, size, int(seed)
        self.length = _DEFAULT_LENGTH[split] if length is None else int(length)
        if self.length < 0:
            raise ValueError(f"length must be >= 0, got {length!r}")
        self.compose_ratio, self.num_refs, self.edit_kinds = float(compose_ratio), (lo, hi), kinds

    def __len__(self) -> int:
        return self.length

    def _draw(self, index: int) -> tuple[int, str, int | None]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of {self.length} items")
        rng = random.Random(f"dataset|{self.seed}|{self.split}|{index}")
        if rng.random() < self.compose_ratio:
            return rng.getrandbits(62), "compose", rng.randint(*self.num_refs)
        return rng.getrandbits(62), rng.choice(self.edit_kinds), None

    def task(self, index: int) -> Task:
        """Item `index` as a `Task` (PIL images and spec), for inspection and scoring."""
        seed, kind, k = self._draw(index)
        return sample_task(seed, kind, k, self.size, self.split)

    def __getitem__(self, index: int) -> dict:
        seed, kind, k = self._draw(index)
        arrays, prompt, target, spec = _generate(seed, kind, k, self.size, self.split)
        refs = [torch.from_numpy(a).permute(2, 0, 1) for a in arrays]
        return {
            "target": torch.from_numpy(target).permute(2, 0, 1),
            "references": refs,
            "reference_sizes": [(a.shape[0], a.shape[1]) for a in arrays],
            "prompt": prompt,
            "kind": spec.kind,
            "index": index,
        }


def collate_samples(batch: list[dict]) -> dict:
    """`torch.utils.data.DataLoader` collate for `SyntheticEditDataset`: stacks the targets into uint8
    ``(B, 3, size, size)`` and keeps the variable-size references as a list (per sample) of lists."""
    return {
        "target": torch.stack([b["target"] for b in batch]),
        "references": [b["references"] for b in batch],
        "reference_sizes": [b["reference_sizes"] for b in batch],
        "prompt": [b["prompt"] for b in batch],
        "kind": [b["kind"] for b in batch],
        "index": [b["index"] for b in batch],
    }
