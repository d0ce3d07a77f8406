"""The synthetic world's palettes, shapes and rendering."""

import itertools

import numpy as np
import pytest

from uniref.synthetic.world import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    BLANK_COLOUR,
    OBJECT_COLOURS,
    SHAPES,
    Background,
    Obj,
    Scene,
    describe_background,
    px,
    render_background,
    render_scene,
    shape_mask,
)


def _dist(a, b) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def _naive_background(bg: Background, h: int, w: int, size: int) -> np.ndarray:
    """The background by its definition, per pixel (the reference for the cached, separable renderer)."""
    c1 = np.array(BACKGROUND_COLOURS[bg.colours[0]], np.float32)
    c2 = np.array(BACKGROUND_COLOURS[bg.colours[1]], np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    p = px(bg.period, size)
    if bg.kind == "solid":
        t = np.zeros((h, w))
    elif bg.kind == "gradient":
        t = yy / (h - 1) if bg.vertical else xx / (w - 1)
    elif bg.kind == "stripes":
        t = ((yy if bg.vertical else xx) // p) % 2
    else:
        t = ((yy // p) + (xx // p)) % 2
    return np.rint(c1 + (c2 - c1) * t[..., None].astype(np.float32)).astype(np.uint8)


def test_world_has_the_required_variety():
    assert len(SHAPES) >= 6 and len(set(SHAPES)) == len(SHAPES)
    assert len(OBJECT_COLOURS) >= 8
    assert len(BACKGROUND_KINDS) >= 4


def test_palettes_stay_apart():
    # The rewards classify colours after blur and JPEG; these gaps are what makes that unambiguous.
    obj, bg = list(OBJECT_COLOURS.values()), list(BACKGROUND_COLOURS.values())
    assert min(_dist(a, b) for a, b in itertools.combinations(obj, 2)) >= 100
    assert min(_dist(a, b) for a, b in itertools.combinations(bg, 2)) >= 60
    assert min(_dist(a, b) for a in obj for b in bg) >= 85
    assert min(_dist(BLANK_COLOUR, c) for c in obj + bg) >= 70
    assert not set(OBJECT_COLOURS) & set(BACKGROUND_COLOURS)


@pytest.mark.parametrize("size", [8, 12, 16, 20])
def test_shapes_are_distinct_and_fill_their_box(size):
    masks = {s: shape_mask(s, size) for s in SHAPES}
    for s, m in masks.items():
        assert m.shape == (size, size) and m.dtype == bool and not m.flags.writeable
        rows, cols = np.nonzero(m)
        assert cols.min() == 0 and cols.max() == size - 1, s  # every shape spans its box's width
    for a, b in itertools.combinations(SHAPES, 2):
        inter = (masks[a] & masks[b]).sum()
        union = (masks[a] | masks[b]).sum()
        assert inter / union < 0.9, (a, b)


def test_shape_mask_rejects_unknown_shape():
    with pytest.raises(ValueError, match="shape must be one of"):
        shape_mask("hexagon", 10)


@pytest.mark.parametrize("kind", BACKGROUND_KINDS)
@pytest.mark.parametrize("vertical", [False, True])
@pytest.mark.parametrize("period", [8, 16])
@pytest.mark.parametrize("hw", [(64, 64), (48, 96), (96, 48), (128, 80)])
def test_background_matches_its_definition(kind, vertical, period, hw):
    bg = Background(kind, ("navy", "beige"), vertical, period)
    out = render_background(bg, *hw, size=64)
    assert out.dtype == np.uint8 and out.shape == (*hw, 3) and out.flags.writeable
    np.testing.assert_array_equal(out, _naive_background(bg, *hw, 64))


def test_background_rejects_unknown_kind():
    with pytest.raises(ValueError, match="background kind"):
        render_background(Background("waves", ("navy", "white")), 64, 64)


def test_scene_draws_objects_exactly_and_in_order():
    bg = Background("solid", ("white", "black"))
    a = Obj("square", "red", 10, 5, 5)
    b = Obj("circle", "blue", 10, 10, 10)  # overlaps a, drawn on top
    img = render_scene(Scene(64, 64, bg, (a, b)))
    assert tuple(img[6, 6]) == OBJECT_COLOURS["red"]
    assert tuple(img[15, 15]) == OBJECT_COLOURS["blue"]
    assert tuple(img[40, 40]) == BACKGROUND_COLOURS["white"]
    red = (img == np.array(OBJECT_COLOURS["red"], np.uint8)).all(-1)
    assert red.sum() == 100 - (shape_mask("circle", 10)[:5, :5]).sum()


def test_scene_rejects_objects_outside_the_image():
    with pytest.raises(ValueError, match="does not fit"):
        render_scene(Scene(32, 32, Background("solid", ("white", "black")), (Obj("ring", "red", 12, 25, 0),)))


def test_geometry_scales_with_size():
    assert px(8, 64) == 8 and px(8, 128) == 16 and px(12, 32) == 6 and px(0.1, 32) == 1
    bg = Background("stripes", ("white", "black"), False, 8)
    np.testing.assert_array_equal(render_background(bg, 64, 64, 64), render_background(bg, 128, 128, 128)[::2, ::2])


def test_background_phrases_pin_the_pattern_down():
    assert describe_background(Background("solid", ("navy", "white"))) == "plain navy"
    assert describe_background(Background("gradient", ("navy", "white"), True)) == (
        "a top-to-bottom gradient from navy to white"
    )
    assert describe_background(Background("stripes", ("navy", "white"), False, 16)) == (
        "wide vertical navy and white stripes"
    )
    assert describe_background(Background("checks", ("navy", "white"), False, 8)) == (
        "a narrow navy and white checkerboard"
    )
    phrases = {
        describe_background(Background(k, c, v, p))
        for k in BACKGROUND_KINDS
        if k != "solid"
        for c in [("navy", "white"), ("white", "navy")]
        for v in (False, True)
        for p in (8, 16)
        if not (k == "checks" and v) and not (k == "gradient" and p == 16)
    }
    assert len(phrases) == 2 * (2 * 1 + 2 * 2 + 2)  # every distinct pattern has its own phrase
