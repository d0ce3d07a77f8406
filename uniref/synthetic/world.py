"""The synthetic world: a structured scene description and its exact rendering.

A scene is a background (solid, gradient, stripes or checks in one or two colours) with coloured shapes
on it. Everything is rendered with numpy from cached masks and index maps, without anti-aliasing, so a
scene description determines its pixels exactly and the same description always gives the same bytes.

Geometry is authored at 64 px and scaled with the image (`px`), so a 128-px world is the 64-px world
drawn twice as large. Object and background palettes are far apart in RGB (objects >= 100 apart,
objects >= 85 from any background colour, backgrounds >= 60 apart) so that colours stay unambiguous after
mild blur or JPEG, and the rewards can classify them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "BACKGROUND_COLOURS",
    "BACKGROUND_KINDS",
    "BLANK_COLOUR",
    "OBJECT_COLOURS",
    "SHAPES",
    "Background",
    "Obj",
    "Scene",
    "describe_background",
    "px",
    "render_background",
    "render_scene",
    "shape_mask",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "bar", "cross", "ring")

OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "green": (40, 175, 60),
    "blue": (30, 90, 235),
    "yellow": (240, 230, 60),
    "cyan": (30, 205, 215),
    "magenta": (215, 45, 200),
    "orange": (250, 140, 0),
    "purple": (110, 40, 180),
}

BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (242, 242, 236),
    "light grey": (180, 180, 180),
    "dark grey": (85, 85, 90),
    "black": (20, 20, 20),
    "beige": (225, 200, 140),
    "navy": (25, 40, 100),
    "pale blue": (150, 185, 240),
    "brown": (130, 85, 45),
}

# The "blank" baseline's colour: >= 70 from every palette colour, so a blank canvas never passes for a
# background or an object.
BLANK_COLOUR: tuple[int, int, int] = (128, 128, 128)

BACKGROUND_KINDS: tuple[str, ...] = ("solid", "gradient", "stripes", "checks")

_OBJECT_RGB = {k: np.array(v, np.uint8) for k, v in OBJECT_COLOURS.items()}
_BACKGROUND_RGB = {k: np.array(v, np.float32) for k, v in BACKGROUND_COLOURS.items()}


def px(value: float, size: int) -> int:
    """A length authored for a 64-px image, scaled to an image of side `size` (at least 1 px)."""
    return max(1, int(round(value * size / 64.0)))


@dataclass(frozen=True)
class Obj:
    """One object: a `shape` of `size` x `size` px whose top-left pixel is at (`x`, `y`)."""

    shape: str
    colour: str
    size: int
    x: int
    y: int

    @property
    def name(self) -> str:
        """How instructions refer to it, e.g. ``"red circle"``."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Background:
    """A background pattern.

    Attributes:
        kind: one of `BACKGROUND_KINDS`.
        colours: two `BACKGROUND_COLOURS` names; a solid background uses only the first.
        vertical: gradients run top -> bottom and stripes are horizontal bands when True; gradients run
            left -> right and stripes are vertical bands when False. Ignored by solid and checks.
        period: the width of one stripe or check cell, in 64-px units (8 "narrow" or 16 "wide").
    """

    kind: str
    colours: tuple[str, str]
    vertical: bool = False
    period: int = 8


@dataclass(frozen=True)
class Scene:
    """An image: `height` x `width` px, a background and objects drawn in order (later on top)."""

    height: int
    width: int
    background: Background
    objects: tuple[Obj, ...] = ()


@lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """The boolean ``(size, size)`` mask of `shape` filling its bounding box (read-only, cached).

    Pixel centres are sampled on [-1, 1]^2: circle and ring are inscribed discs (the ring's hole has 45%
    of the radius), the triangle points up with its base on the bottom edge, the bar is the middle half
    of the box's height, and the cross has arms one third of the side thick. (No diamond: blurred at
    12 px a cross becomes one, and the rewards could no longer tell them apart.)
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1 px, got {size}")
    t = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    v, u = np.meshgrid(t, t, indexing="ij")  # v: down, u: right
    r2 = u * u + v * v
    if shape == "circle":
        m = r2 <= 1.0
    elif shape == "square":
        m = np.ones((size, size), bool)
    elif shape == "triangle":
        m = np.abs(u) <= (v + 1.0) / 2.0
    elif shape == "bar":
        m = np.abs(v) <= 0.5
    elif shape == "cross":
        m = (np.abs(u) <= 1.0 / 3.0) | (np.abs(v) <= 1.0 / 3.0)
    else:  # ring
        m = (r2 <= 1.0) & (r2 >= 0.45**2)
    m.setflags(write=False)
    return m


@lru_cache(maxsize=4096)
def _pattern_lines(bg: Background, period_px: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The colours along the pattern's varying axis (n px): ``line`` (n, 3) and ``rows`` (2, n, 3), uint8,
    read-only; ``rows`` holds the line and its complement (checks' odd rows swap the two colours).
    Cached: backgrounds repeat."""
    c1, c2 = _BACKGROUND_RGB[bg.colours[0]], _BACKGROUND_RGB[bg.colours[1]]
    if bg.kind == "gradient":
        t = (np.arange(n, dtype=np.float32) / max(1, n - 1))[:, None]
        line = np.rint(c1 + (c2 - c1) * t).astype(np.uint8)
        other = line
    else:
        table = np.stack([c1, c2]).astype(np.uint8)
        band = (np.arange(n) // period_px) % 2
        line, other = table[band], table[1 - band]
    rows = np.stack([line, other])
    line.setflags(write=False)
    rows.setflags(write=False)
    return line, rows


@lru_cache(maxsize=None)
def _row_parity(period_px: int, n: int) -> np.ndarray:
    idx = (np.arange(n) // period_px) % 2
    idx.setflags(write=False)
    return idx


def render_background(bg: Background, height: int, width: int, size: int | None = None) -> np.ndarray:
    """Renders a background alone.

    Args:
        bg: the pattern.
        height, width: the image size in px.
        size: the side the 64-px geometry scales to (stripe/check periods); defaults to ``min(height,
            width)``, which callers override so that a reference shares its target's scale.

    Returns:
        ``(height, width, 3)`` uint8, a fresh writable array.
    """
    if bg.kind not in BACKGROUND_KINDS:
        raise ValueError(f"background kind must be one of {BACKGROUND_KINDS}, got {bg.kind!r}")
    out = np.empty((height, width, 3), np.uint8)
    if bg.kind == "solid":
        out[...] = _BACKGROUND_RGB[bg.colours[0]]
        return out
    period_px = px(bg.period, size if size is not None else min(height, width))
    # Every pattern is separable: a function of the row, of the column, or (checks) of both parities,
    # so it is copied from one cached line of colours instead of being computed per pixel.
    along_rows = bg.vertical and bg.kind != "checks"
    line, rows = _pattern_lines(bg, period_px, height if along_rows else width)
    if along_rows:
        out[...] = line[:, None, :]
    elif bg.kind == "checks":
        out[...] = rows[_row_parity(period_px, height)]
    else:
        out[...] = line[None, :, :]
    return out


def render_scene(scene: Scene, size: int | None = None) -> np.ndarray:
    """Renders a scene exactly.

    Args:
        scene: the description; objects must lie inside the image.
        size: the 64-px geometry's scale, as in `render_background`.

    Returns:
        ``(scene.height, scene.width, 3)`` uint8.
    """
    img = render_background(scene.background, scene.height, scene.width, size)
    for ob in scene.objects:
        if ob.x < 0 or ob.y < 0 or ob.x + ob.size > scene.width or ob.y + ob.size > scene.height:
            raise ValueError(f"{ob} does not fit in a {scene.height}x{scene.width} image")
        region = img[ob.y : ob.y + ob.size, ob.x : ob.x + ob.size]
        region[shape_mask(ob.shape, ob.size)] = _OBJECT_RGB[ob.colour]
    return img


def describe_background(bg: Background) -> str:
    """The phrase an instruction uses for a background, e.g. ``"wide vertical navy and white stripes"``.

    The phrase determines the pattern exactly: colour order, orientation and (for stripes and checks)
    width, so that a change-the-background instruction has one right answer.
    """
    a, b = bg.colours
    width = "narrow" if bg.period == 8 else "wide"
    if bg.kind == "solid":
        return f"plain {a}"
    if bg.kind == "gradient":
        return f"a {'top-to-bottom' if bg.vertical else 'left-to-right'} gradient from {a} to {b}"
    if bg.kind == "stripes":
        return f"{width} {'horizontal' if bg.vertical else 'vertical'} {a} and {b} stripes"
    return f"a {width} {a} and {b} checkerboard"
