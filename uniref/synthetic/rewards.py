"""Programmatic rewards: three judge axes computed exactly from a task's known scene.

For an output image Y and the task's target T (rendered from its spec), all in RGB units 0..255:

**Object evidence.** Each object is looked for in a window around its intended place (the place plus a
search radius of 3/64 of the side and room for a 1.3x larger object), with the boxes of the target's
other objects masked out. A pixel "shows the object's colour c" when, against the target's background B
at that pixel, ``alpha = <Y-B, c-B> / |c-B|^2 > 0.5`` (past the midpoint, so mild blur keeps the shape),
and Y lies within 60 of the B->c line and closer to it than to the line of any other palette colour
(palette colours are >= 100 apart). That colour mask is matched by IoU (over the whole window) against
every shape template: all `SHAPES`, sizes 0.7x..1.3x, every shift within the radius. The object is
*present* when its own shape matches best -- a square drawn for a circle matches the square template
better, so it is not a circle -- with IoU >= 0.6, which also bounds how far off its place it may be
(about the radius plus a quarter of its size). Its *fidelity* is the mean of: shape (its own template's
best IoU), size (1 within 1 px, falling to 0 at 25% off) and colour (the median distance of the pixels
under that template from the colour: 1 within 20, 0 beyond 80 RGB units).

**Pixel agreement.** A pixel agrees with the target when the 3x3 means of Y and T differ by less than
``30 + 0.2 * contrast``, the contrast being the target's colour range over the pixel's 5x5 neighbourhood:
strict on flat areas, lenient within 2 px of an edge, where a blur of sigma 1 px moves the 3x3 mean by
up to 12% of the edge's contrast.

The axes, each in [0, 1]:
    integration: the mean of the instruction's checks: each placed (recoloured, moved, added, composed)
        object present; each vacated (moved, removed) object absent from its old place, times the
        fraction of its old area agreeing with the target; for a background change, the fraction of
        background pixels agreeing.
    consistency: the mean fidelity of each placed object (for a background change: of every object);
        single-image edits other than background changes add one item, the fraction of pixels outside
        the edited boxes (`uniref.synthetic.tasks.edit_region`) that agree, i.e. untouched content kept.
    quality: on the target's background pixels (off the objects' boxes): (fraction that agree) x (1 -
        excess high-frequency energy / 40), the energy being the mean |Y - 3x3 mean of Y| there beyond the
        target's own, so noise and artifacts cost even where colours are right on average.
    overall = integration * (consistency + quality) / 2: an output that ignores the instruction earns
        nothing however clean it is; one that follows it earns by how faithful and clean it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from uniref.synthetic.tasks import Task, TaskSpec, edit_region
from uniref.synthetic.world import OBJECT_COLOURS, SHAPES, Obj, px, render_background, render_scene, shape_mask

__all__ = ["REWARD_NAMES", "combine", "score", "score_batch"]

REWARD_NAMES: tuple[str, ...] = ("integration", "consistency", "quality")

_ALPHA = 0.5
_RESIDUAL = 60.0
_PRESENT_IOU = 0.6
_MEASURABLE_IOU = 0.3  # below this there is no object to measure size or colour on
_SIZE_RANGE = (0.7, 1.3)
_AGREE_BASE, _AGREE_CONTRAST = 30.0, 0.2
_HF_SCALE = 40.0
_COLOUR_OK, _COLOUR_WRONG = 20.0, 80.0
_OBJ_RGB = {k: np.array(v, np.float32) for k, v in OBJECT_COLOURS.items()}
_PALETTE = np.stack(list(_OBJ_RGB.values()))  # (colours, 3)
_COLOUR_INDEX = {k: i for i, k in enumerate(OBJECT_COLOURS)}


# --- inputs --------------------------------------------------------------------------------------------


def _spec_of(task, name: str) -> TaskSpec:
    if isinstance(task, Task):
        return task.spec
    if isinstance(task, TaskSpec):
        return task
    raise TypeError(f"{name} must be a uniref.synthetic Task or TaskSpec, got {type(task).__name__}")


def _as_array(image, name: str, size: int) -> np.ndarray:
    """An output image as float32 ``(size, size, 3)`` in 0..255, or a clear error naming `name`.

    Accepts an RGB PIL image, a uint8 ``(H, W, 3)`` array, or a tensor ``(3, H, W)``: uint8, or float in
    [0, 1].
    """
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"{name} must be an RGB image, got mode {image.mode!r}; use image.convert('RGB')")
        arr = np.asarray(image)
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"{name} as a tensor must be (3, H, W), got shape {tuple(t.shape)}")
        if t.dtype == torch.uint8:
            arr = t.permute(1, 2, 0).numpy()
        elif t.is_floating_point():
            t = t.float()
            if not torch.isfinite(t).all() or t.min() < -0.01 or t.max() > 1.01:
                raise ValueError(f"{name} as a float tensor must hold finite values in [0, 1]")
            return np.ascontiguousarray(t.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0)
        else:
            raise ValueError(f"{name} as a tensor must be uint8 or floating point, got {t.dtype}")
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{name} as an array must be uint8 (H, W, 3), got {image.dtype} of shape {image.shape}")
        arr = image
    else:
        raise TypeError(f"{name} must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")
    if arr.shape[:2] != (size, size):
        raise ValueError(f"{name} must be {size}x{size} (the task's target size), got {arr.shape[0]}x{arr.shape[1]}")
    return arr.astype(np.float32)


# --- image statistics ----------------------------------------------------------------------------------


def _shifts(x: np.ndarray):
    """The 9 views of x shifted within its 3x3 neighbourhood (edges replicated); x is (H, W, C)."""
    h, w = x.shape[:2]
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return [p[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]


def _box3(x: np.ndarray) -> np.ndarray:
    return sum(_shifts(x)) / 9.0


def _high_freq(x: np.ndarray, x_smooth: np.ndarray, where: np.ndarray) -> float:
    """Mean Euclidean distance of x's pixels (where `where`) from their 3x3 mean: flat ~0, noise ~110."""
    return float(np.sqrt(((x - x_smooth) ** 2).sum(-1))[where].mean())


def _agree(y_smooth: np.ndarray, ref) -> np.ndarray:
    """Boolean (H, W): where the smoothed output agrees with the target (see module docstring)."""
    return ((y_smooth - ref.t_smooth) ** 2).sum(-1) < ref.tolerance_sq


class _Reference:
    """What scoring needs from a spec, computed once per spec (`_reference`)."""

    def __init__(self, spec: TaskSpec) -> None:
        size, target = spec.size, spec.target
        self.spec = spec
        t = render_scene(target, size).astype(np.float32)
        self.background = render_background(target.background, size, size, size).astype(np.float32)
        self.t_smooth = _box3(t)
        hi, lo = np.maximum.reduce(_shifts(t)), np.minimum.reduce(_shifts(t))
        hi, lo = np.maximum.reduce(_shifts(hi)), np.minimum.reduce(_shifts(lo))  # 5x5: blur spreads 2 px
        contrast = np.sqrt(((hi - lo) ** 2).sum(-1))
        self.tolerance_sq = (_AGREE_BASE + _AGREE_CONTRAST * contrast) ** 2
        # 2 px around each object's box: far enough that no 3x3 mean of a background pixel sees it
        pad = px(2, size)
        off_objects = np.ones((size, size), bool)
        for o in target.objects:
            off_objects[max(0, o.y - pad) : o.y + o.size + pad, max(0, o.x - pad) : o.x + o.size + pad] = False
        self.background_pixels = off_objects
        self.high_freq = _high_freq(t, self.t_smooth, off_objects)

        self.untouched = None
        if spec.kind not in ("compose", "background"):
            keep = np.ones((size, size), bool)
            for y0, y1, x0, x1 in edit_region(spec):
                keep[y0:y1, x0:x1] = False
            self.untouched = keep

        self.vacated = []
        for o in spec.vacated:
            m = np.zeros((size, size), bool)
            m[o.y : o.y + o.size, o.x : o.x + o.size] = shape_mask(o.shape, o.size)
            self.vacated.append(m)

        # Objects whose fidelity counts; they are also the presence checks, except in a background
        # change, where the objects are kept rather than placed.
        self.fidelity_checks = list(target.objects) if spec.new_background else [target.objects[i] for i in spec.placed]


@lru_cache(maxsize=128)  # ~120 KB each at 64 px; RL scores a group of rollouts against one task
def _reference(spec: TaskSpec) -> _Reference:
    return _Reference(spec)


# --- object evidence -----------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _template_bank(s: int, size: int):
    """Shape templates for an intended size s: sizes, canvas side, search radius and the (Kt, canvas^2)
    float32 matrix (rows: shape-major, then size), with each template's area."""
    sizes = tuple(range(max(1, round(_SIZE_RANGE[0] * s)), round(_SIZE_RANGE[1] * s) + 1))
    canvas = sizes[-1]
    radius = px(3, size)
    rows = []
    for shape in SHAPES:
        for sz in sizes:
            c = np.zeros((canvas, canvas), np.float32)
            o = (canvas - sz) // 2
            c[o : o + sz, o : o + sz] = shape_mask(shape, sz)
            rows.append(c.ravel())
    bank = np.stack(rows)
    return sizes, canvas, radius, bank, bank.sum(1)


def _colour_mask(ys: np.ndarray, bs: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """float32 (G, L, L): 1 where an output window ys shows palette colour `colour[g]` over the target
    background bs (both (G, L, L, 3)).

    Every palette colour c is tried as a mix of the background and c: alpha = <Y-B, c-B> / |c-B|^2 must
    pass 0.5 and the pixel's distance from the B->c line must be the smallest over the palette and under
    the residual bound. Choosing the best line rather than thresholding one keeps a dim purple on navy
    from passing for magenta, and blurred edges (which lie on their own line) with their object.
    """
    diff = ys - bs
    axis = _PALETTE[None, None, None, :, :] - bs[..., None, :]  # (G, L, L, colours, 3)
    norm2 = np.maximum((axis * axis).sum(-1), 1e-6)
    alpha = np.einsum("glwc,glwkc->glwk", diff, axis) / norm2
    resid2 = (diff * diff).sum(-1)[..., None] - alpha * alpha * norm2
    resid2 = np.where(alpha > _ALPHA, resid2, np.inf)
    best = resid2.argmin(-1)
    own = np.take_along_axis(resid2, colour[:, None, None, None], -1)[..., 0]
    return ((best == colour[:, None, None]) & (own < _RESIDUAL**2)).astype(np.float32)


class _Probe(NamedTuple):
    """Where to look for one object: the output and the target background, both `_padded`; the object
    as the target has it; the image side; and the target's other objects, whose boxes are masked out
    so that a neighbour of the same colour never counts for (or against) this one."""

    output: np.ndarray
    background: np.ndarray
    obj: Obj
    size: int
    others: tuple[Obj, ...]


def _object_evidence(probes: list[_Probe]) -> list[tuple[bool, float]]:
    """(present, fidelity) per probe (see the module docstring). Probes of objects of one size are
    matched against the template bank together."""
    out: list[tuple[bool, float]] = [(False, 0.0)] * len(probes)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(probes):
        groups.setdefault((p.obj.size, p.size), []).append(i)
    for (s, size), idx in groups.items():
        sizes, canvas, radius, bank, area = _template_bank(s, size)
        side = canvas + 2 * radius
        lead = (canvas - s) // 2 + radius  # window origin, up and left of the object's top-left
        ys = np.stack([_window(probes[i].output, probes[i].obj, lead, side, size) for i in idx])
        bs = np.stack([_window(probes[i].background, probes[i].obj, lead, side, size) for i in idx])
        mask = _colour_mask(ys, bs, np.array([_COLOUR_INDEX[probes[i].obj.colour] for i in idx]))
        for j, i in enumerate(idx):
            o = probes[i].obj
            for q in probes[i].others:
                y0, x0 = q.y - 1 - (o.y - lead), q.x - 1 - (o.x - lead)
                mask[j, max(0, y0) : max(0, y0 + q.size + 2), max(0, x0) : max(0, x0 + q.size + 2)] = 0.0

        patches = sliding_window_view(mask, (canvas, canvas), axis=(1, 2))  # (G, 2r+1, 2r+1, c, c)
        g, n_shift = len(idx), (2 * radius + 1) ** 2
        patches = patches.reshape(g, n_shift, canvas * canvas)
        # einsum's own loop rather than a BLAS product: these products are small, and BLAS worker
        # threads stall (10x slower) whenever the cores are shared with other work.
        inter = np.einsum("gpc,kc->gpk", patches, bank)  # (G, shifts, Kt)
        # The union counts the whole window's mask, so an object found off its place loses the part
        # that the template misses.
        union = mask.sum(axis=(1, 2))[:, None, None] + area - inter
        iou = (inter / np.maximum(union, 1e-6)).reshape(g, n_shift, len(SHAPES), len(sizes))
        best_per_shape = iou.max(axis=(1, 3))  # (G, shapes)

        for j, i in enumerate(idx):
            o = probes[i].obj
            k = SHAPES.index(o.shape)
            own = best_per_shape[j, k]
            rivals = np.delete(best_per_shape[j], k).max()
            present = bool(own >= _PRESENT_IOU and own >= rivals)
            if own >= _MEASURABLE_IOU:
                shift, size_i = np.unravel_index(int(iou[j, :, k, :].argmax()), (n_shift, len(sizes)))
                found = sizes[size_i]
                size_fid = float(np.clip(1.0 - max(0, abs(found - s) - px(1, size)) / (0.25 * s), 0.0, 1.0))
            else:
                shift, found, size_fid = n_shift // 2, s, 0.0
            dy, dx = divmod(int(shift), 2 * radius + 1)
            o0 = (canvas - found) // 2
            region = ys[j, dy + o0 : dy + o0 + found, dx + o0 : dx + o0 + found]
            dist = float(np.median(np.linalg.norm(region[shape_mask(o.shape, found)] - _OBJ_RGB[o.colour], axis=-1)))
            colour_fid = float(np.clip((_COLOUR_WRONG - dist) / (_COLOUR_WRONG - _COLOUR_OK), 0.0, 1.0))
            out[i] = (present, (float(own) + size_fid + colour_fid) / 3.0)
    return out


def _window(padded: np.ndarray, o: Obj, lead: int, side: int, size: int) -> np.ndarray:
    """The side x side window of a `_padded` image starting `lead` px above and left of o's box."""
    y, x = o.y + _pad(size) - lead, o.x + _pad(size) - lead
    return padded[y : y + side, x : x + side]


def _pad(size: int) -> int:
    """Padding that keeps every search window inside the padded image: a window reaches at most
    (1.3 - 1) / 2 of a 20/64 object plus the 3/64 search radius past the object's box."""
    return px(8, size)


def _padded(x: np.ndarray, size: int) -> np.ndarray:
    p = _pad(size)
    return np.pad(x, ((p, p), (p, p), (0, 0)))


# --- scores --------------------------------------------------------------------------------------------


def _scores(specs: Sequence[TaskSpec], outputs: Sequence[np.ndarray]) -> np.ndarray:
    refs = [_reference(s) for s in specs]
    items, first = [], []
    for ref, y in zip(refs, outputs):
        first.append(len(items))
        objs = ref.fidelity_checks + list(ref.spec.vacated)
        if objs:
            yp, bp = _padded(y, ref.spec.size), _padded(ref.background, ref.spec.size)
            everything = ref.spec.target.objects
            items += [_Probe(yp, bp, o, ref.spec.size, tuple(q for q in everything if q is not o)) for o in objs]
    evidence = _object_evidence(items)

    result = np.zeros((len(specs), 3), np.float64)
    for n, (ref, y) in enumerate(zip(refs, outputs)):
        ev = evidence[first[n] : first[n] + len(ref.fidelity_checks)]
        gone = evidence[first[n] + len(ref.fidelity_checks) : first[n] + len(ref.fidelity_checks) + len(ref.vacated)]
        y_smooth = _box3(y)
        agree = _agree(y_smooth, ref)
        background_agree = float(agree[ref.background_pixels].mean())
        # Placed objects are exactly the fidelity checks, except in background changes (none placed).
        checks = [] if ref.spec.new_background else [float(present) for present, _ in ev]
        checks += [(not present) * float(agree[m].mean()) for m, (present, _) in zip(ref.vacated, gone)]
        if ref.spec.new_background:
            checks.append(background_agree)
        items_c = [fidelity for _, fidelity in ev]
        if ref.untouched is not None:
            items_c.append(float(agree[ref.untouched].mean()))
        excess = max(0.0, _high_freq(y, y_smooth, ref.background_pixels) - ref.high_freq)
        quality = background_agree * max(0.0, 1.0 - excess / _HF_SCALE)
        result[n] = (np.mean(checks), np.mean(items_c), quality)
    return result


def combine(rewards: torch.Tensor | np.ndarray) -> torch.Tensor:
    """overall = integration * (consistency + quality) / 2, for ``(N, 3)`` rewards -> ``(N,)``."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.ndim != 2 or r.shape[1] != 3:
        raise ValueError(f"rewards must be (N, 3) [integration, consistency, quality], got {tuple(r.shape)}")
    return r[:, 0] * (r[:, 1] + r[:, 2]) / 2.0


def score_batch(tasks: Sequence, images) -> torch.Tensor:
    """Rewards of N outputs, one per task, for multi-source RL.

    Args:
        tasks: N `Task` or `TaskSpec` objects.
        images: N outputs, each ``size`` x ``size`` for its task: a list of RGB PIL images, uint8
            ``(H, W, 3)`` arrays or ``(3, H, W)`` tensors, or one tensor ``(N, 3, H, W)`` (uint8, or float in
            [0, 1]).

    Returns:
        float32 ``(N, 3)``: columns `REWARD_NAMES` (integration, consistency, quality), each in [0, 1].
        `combine` turns it into the overall score.
    """
    if isinstance(tasks, (Task, TaskSpec)) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a sequence of Task or TaskSpec, got {type(tasks).__name__}")
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images as a tensor must be (N, 3, H, W), got shape {tuple(images.shape)}")
        images = list(images.unbind(0))
    elif isinstance(images, (Image.Image, np.ndarray)) or not isinstance(images, Sequence):
        raise TypeError(f"images must be a sequence of images or an (N, 3, H, W) tensor, got {type(images).__name__}")
    if len(images) != len(tasks):
        raise ValueError(f"got {len(tasks)} tasks but {len(images)} images; pass one output per task")
    specs = [_spec_of(t, f"tasks[{i}]") for i, t in enumerate(tasks)]
    outputs = [_as_array(im, f"images[{i}]", s.size) for i, (im, s) in enumerate(zip(images, specs))]
    return torch.from_numpy(_scores(specs, outputs).astype(np.float32)) if specs else torch.zeros(0, 3)


def score(task, image) -> dict[str, float]:
    """Scores one output against a task's exact answer.

    Args:
        task: a `Task` (or its `TaskSpec`).
        image: the output, ``size`` x ``size``: an RGB PIL image, a uint8 ``(H, W, 3)`` array, or a
            ``(3, H, W)`` tensor (uint8, or float in [0, 1]).

    Returns:
        ``{"integration", "consistency", "quality", "overall"}``, floats in [0, 1] (see the module
        docstring for their definitions).

    Raises:
        TypeError / ValueError: naming ``task`` or ``image`` when it is not a task, not an image, not RGB,
            or not the task's size.
    """
    spec = _spec_of(task, "task")
    r = _scores([spec], [_as_array(image, "image", spec.size)])
    i, c, q = (float(v) for v in r[0])
    return {"integration": i, "consistency": c, "quality": q, "overall": i * (c + q) / 2.0}
