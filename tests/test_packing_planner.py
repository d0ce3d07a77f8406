"""SELF's global pixel-budget planner."""

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uniref import plan_reference_sizes
from uniref.packing import fit_area

sizes_st = st.lists(st.tuples(st.integers(1, 4000), st.integers(1, 4000)), min_size=1, max_size=8)
multiple_st = st.sampled_from([1, 8, 16, 32])


def exact_scale_bound(sizes, budget):
    return math.sqrt(budget / sum(h * w for h, w in sizes))


@settings(max_examples=300, deadline=None)
@given(sizes=sizes_st, budget=st.integers(64 * 64, 2048 * 2048), multiple=multiple_st)
def test_global_plan_invariants(sizes, budget, multiple):
    if budget < len(sizes) * multiple * multiple:
        with pytest.raises(ValueError, match="pixel_budget"):
            plan_reference_sizes(sizes, budget, multiple)
        return
    plan = plan_reference_sizes(sizes, budget, multiple)
    assert len(plan) == len(sizes)
    # budget respected, sides positive multiples
    assert sum(h * w for h, w in plan) <= budget
    assert all(h % multiple == 0 and w % multiple == 0 and h >= multiple and w >= multiple for h, w in plan)
    # one common scale: each side within one rounding step of scale * original
    scale = plan_scale(sizes, plan, multiple)
    for (h0, w0), (h, w) in zip(sizes, plan):
        assert abs(h - h0 * scale) <= multiple and abs(w - w0 * scale) <= multiple
    # as large as possible: growing every side by one step cannot fit, unless the scale is at its floor
    assert deterministic(sizes, budget, multiple, plan)


def plan_scale(sizes, plan, multiple):
    """A common scale consistent with the plan (the midpoint of each side's rounding interval)."""
    lo, hi = 0.0, math.inf
    for (h0, w0), (h, w) in zip(sizes, plan):
        for x0, x in ((h0, h), (w0, w)):
            if x > multiple:  # sides at the floor constrain only from above
                lo = max(lo, (x - multiple / 2) / x0)
            hi = min(hi, (x + multiple / 2) / x0)
    assert lo <= hi + 1e-12, "no single scale explains the plan"
    return lo if math.isinf(hi) else (lo + hi) / 2


def deterministic(sizes, budget, multiple, plan):
    return plan_reference_sizes(sizes, budget, multiple) == plan


@settings(max_examples=200, deadline=None)
@given(sizes=sizes_st, budget=st.integers(64 * 64, 2048 * 2048), extra=st.integers(1, 1024 * 1024))
def test_global_plan_monotone_in_budget(sizes, budget, extra):
    if budget < len(sizes) * 256:
        return
    small = plan_reference_sizes(sizes, budget)
    large = plan_reference_sizes(sizes, budget + extra)
    assert all(hs <= hl and ws <= wl for (hs, ws), (hl, wl) in zip(small, large))


def brute_force_global(sizes, budget, multiple):
    """Independent reference in exact arithmetic: rounded sides change only where x * s / m reaches
    n + 1/2 (ties round up), so the best plan is the one at the largest such breakpoint that still fits
    (or the all-minimum plan)."""

    def sized(scale):
        return [
            tuple(max(multiple, multiple * math.floor(x * scale / multiple + Fraction(1, 2))) for x in (h, w))
            for h, w in sizes
        ]

    def area(plan):
        return sum(a * b for a, b in plan)

    best = sized(Fraction(0))
    max_side = budget // multiple  # a side can grow this far while the other stays at the floor
    for h, w in sizes:
        for x in (h, w):
            for n in range(max_side // multiple + 1):
                plan = sized(Fraction(2 * n + 1, 2) * multiple / x)
                if area(plan) <= budget and area(plan) > area(best):
                    best = plan
    return best


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=5),
    budget=st.integers(16 * 16 * 5, 200 * 200),
)
def test_global_plan_is_the_largest_that_fits(sizes, budget):
    assert plan_reference_sizes(sizes, budget) == brute_force_global(sizes, budget, 16)


def test_global_bounds_total_tokens_whatever_the_count():
    budget = 1024 * 1024
    for k in range(1, 9):
        plan = plan_reference_sizes([(1024, 768)] * k, budget)
        tokens = sum((h // 16) * (w // 16) for h, w in plan)
        assert tokens <= 4096
        per_image = plan_reference_sizes([(1024, 768)] * k, budget, mode="per_image")
        assert sum((h // 16) * (w // 16) for h, w in per_image) >= 3800 * k


def test_global_keeps_relative_sizes_and_scales_up():
    plan = plan_reference_sizes([(256, 256), (128, 128)], 1024 * 1024)
    (h1, w1), (h2, w2) = plan
    assert h1 == w1 and h2 == w2 and abs(h1 - 2 * h2) <= 16  # equal up to rounding
    assert h1 > 256  # scaled up to fill the budget
    assert sum(h * w for h, w in plan) <= 1024 * 1024


def test_per_image_matches_qwen_rule():
    # each reference on its own at ~budget area, aspect kept, sides rounded to the multiple
    plan = plan_reference_sizes([(1024, 768), (300, 900)], 1024 * 1024, mode="per_image")
    for (h0, w0), (h, w) in zip([(1024, 768), (300, 900)], plan):
        assert abs(h * w - 1024 * 1024) / (1024 * 1024) < 0.05
        assert abs(h / w - h0 / w0) < 0.05
    assert plan_reference_sizes([(512, 512)], 1024 * 1024, mode="per_image") == [(1024, 1024)]


@pytest.mark.parametrize(
    "size",
    [(480, 640), (640, 480), (1080, 1920), (1920, 1080), (768, 1360), (333, 1000), (1000, 333), (17, 4000), (512, 512)],
)
@pytest.mark.parametrize("area", [1024 * 1024, 384 * 384, 1536 * 1536])
def test_per_image_equals_diffusers_calculate_dimensions(size, area):
    """Per-image planning is Qwen-Image-Edit-Plus' own `calculate_dimensions`, on non-square references too
    (480x640 plans to 896x1184 there, where rounding each side to 16 would give 880x1184)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    h, w = size
    width, height = calculate_dimensions(area, w / h)
    assert plan_reference_sizes([size], area, mode="per_image") == [(height, width)]
    assert plan_reference_sizes([(480, 640)], 1024 * 1024, mode="per_image") == [(896, 1184)]


def test_fit_area_keeps_the_aspect_at_the_multiple():
    assert fit_area((480, 640), 64 * 64) == (48, 80)
    assert fit_area((1024, 768), 1024 * 1024, 16) == (1184, 880)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(sizes=[], pixel_budget=4096), "sizes is empty"),
        (dict(sizes=[(0, 10)], pixel_budget=4096), r"sizes\[0\].*must be positive"),
        (dict(sizes=[(10, -1)], pixel_budget=4096), "must be positive"),
        (dict(sizes=[(10, 10, 3)], pixel_budget=4096), r"sizes\[0\] must be a \(height, width\) pair"),
        (dict(sizes=[(10.5, 10)], pixel_budget=4096), "pair of ints"),
        (dict(sizes=5, pixel_budget=4096), "list of"),
        (dict(sizes=[(10, 10)] * 3, pixel_budget=700), "must be >= 768"),
        (dict(sizes=[(10, 10)], pixel_budget=4096, multiple=0), "multiple must be a positive int"),
        (dict(sizes=[(10, 10)], pixel_budget=4096, mode="area"), "mode must be one of"),
        (dict(sizes=[(10, 10)], pixel_budget=4096.0), "pixel_budget must be an int"),
    ],
)
def test_planner_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_reference_sizes(**kwargs)
