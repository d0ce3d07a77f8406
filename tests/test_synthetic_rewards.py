"""The programmatic rewards discriminate what they claim to, and reject what they cannot score."""

import dataclasses
import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFilter

from uniref.synthetic import FAMILIES, REWARD_NAMES, combine, sample_task, score, score_batch
from uniref.synthetic.bench import BASELINES
from uniref.synthetic.world import OBJECT_COLOURS, SHAPES, render_background, render_scene, shape_mask

SEEDS = range(12)


def _render(spec, objects=None, **target_changes) -> Image.Image:
    """The task's target scene with its objects (or others) swapped in."""
    scene = dataclasses.replace(spec.target, **target_changes)
    if objects is not None:
        scene = dataclasses.replace(scene, objects=tuple(objects))
    return Image.fromarray(render_scene(scene, spec.size))


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("size", [48, 64, 96])
def test_exact_target_scores_at_least_095(kind, size):
    for seed in SEEDS:
        t = sample_task(seed, kind, size=size, split="test")
        s = score(t, t.target)
        assert s["overall"] >= 0.95, (seed, s)
        assert set(s) == {*REWARD_NAMES, "overall"}


@pytest.mark.parametrize("baseline", ["copy_first", "blank", "noise"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_trivial_outputs_score_low(baseline, kind):
    overall = [
        score(t, BASELINES[baseline](t))["overall"] for t in (sample_task(s, kind, split="test") for s in range(20))
    ]
    assert np.mean(overall) < 0.1 and max(overall) < 0.5, overall


@pytest.mark.parametrize("k", [3, 4, 5, 6])
def test_dropping_one_of_k_objects_lowers_integration_by_one_kth(k):
    for seed in SEEDS:
        t = sample_task(seed, "compose", k, split="test")
        objs = t.spec.target.objects
        n = len(objs)
        for j in range(n):
            s = score(t, _render(t.spec, objs[:j] + objs[j + 1 :]))
            assert s["integration"] == pytest.approx(1 - 1 / n, abs=1e-6)
            assert s["quality"] > 0.9  # what is left is clean


def test_recolouring_an_object_lowers_consistency():
    for seed in SEEDS:
        t = sample_task(seed, "compose", 4, split="test")
        objs = list(t.spec.target.objects)
        other = "red" if objs[0].colour != "red" else "blue"
        s = score(t, _render(t.spec, [dataclasses.replace(objs[0], colour=other)] + objs[1:]))
        assert s["consistency"] <= score(t, t.target)["consistency"] - 0.5 / len(objs)


def test_colour_drift_keeps_the_object_but_costs_consistency():
    for seed in SEEDS:
        t = sample_task(seed, "compose", 2, split="test")
        o = t.spec.target.objects[0]
        rgb = np.array(OBJECT_COLOURS[o.colour], np.float64)
        bg = render_background(t.spec.target.background, 64, 64, 64).astype(np.float64)
        img = np.asarray(t.target).copy()
        on = np.zeros((64, 64), bool)
        on[o.y : o.y + o.size, o.x : o.x + o.size] = shape_mask(o.shape, o.size)
        fade = (bg[on] - rgb) / np.linalg.norm(bg[on] - rgb, axis=-1, keepdims=True)
        img[on] = np.rint(rgb + 35.0 * fade).astype(np.uint8)  # the object fades 35 units into the background
        s = score(t, Image.fromarray(img))
        assert s["integration"] == 1.0 and s["consistency"] < 0.97, s


def test_a_square_drawn_for_a_circle_is_not_a_circle():
    swaps = {
        "circle": "square",
        "square": "circle",
        "ring": "circle",
        "triangle": "square",
        "bar": "square",
        "cross": "circle",
    }
    checked = set()
    for seed in range(40):
        t = sample_task(seed, "compose", 2, split="train")
        o = t.spec.target.objects[0]
        wrong = dataclasses.replace(o, shape=swaps[o.shape])
        s = score(t, _render(t.spec, [wrong]))
        assert s["integration"] == 0.0, (o, s)
        checked.add(o.shape)
    assert checked == set(SHAPES)


def test_near_the_intended_place_counts_and_far_does_not():
    for seed in SEEDS:
        t = sample_task(seed, "compose", 2, split="test")
        o = t.spec.target.objects[0]
        near = score(t, _render(t.spec, [dataclasses.replace(o, x=o.x + 2, y=o.y - 2)]))
        far = score(t, _render(t.spec, [dataclasses.replace(o, x=o.x + 10 if o.x < 32 else o.x - 10)]))
        assert near["integration"] == 1.0 and far["integration"] == 0.0


def test_wrong_size_costs_consistency_not_integration():
    for seed in SEEDS:
        t = sample_task(seed, "compose", 2, split="test")
        o = t.spec.target.objects[0]
        s2 = round(o.size * 0.75)
        smaller = dataclasses.replace(o, size=s2, x=o.x + (o.size - s2) // 2, y=o.y + (o.size - s2) // 2)
        s = score(t, _render(t.spec, [smaller]))
        assert s["integration"] == 1.0 and s["consistency"] < 0.8


def test_moving_without_erasing_earns_half_integration():
    for seed in SEEDS:
        t = sample_task(seed, "move", split="test")
        both = _render(t.spec, list(t.spec.target.objects) + [t.spec.vacated[0]])
        assert score(t, both)["integration"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("kind", FAMILIES)
def test_mild_blur_and_jpeg_barely_move_the_score(kind):
    deltas = []
    for seed in SEEDS:
        t = sample_task(seed, kind, split="test")
        exact = score(t, t.target)["overall"]
        for degraded in (t.target.filter(ImageFilter.GaussianBlur(0.7)), _jpeg(t.target, 90)):
            deltas.append(exact - score(t, degraded)["overall"])
    assert np.mean(deltas) < 0.04 and max(deltas) < 0.12, deltas


def test_noise_costs_quality():
    t = sample_task(3, "compose", 3, split="test")
    img = np.asarray(t.target).astype(np.float32)
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 25, img.shape), 0, 255).astype(np.uint8)
    assert score(t, Image.fromarray(noisy))["quality"] < 0.8 * score(t, t.target)["quality"]


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    kind=st.sampled_from(FAMILIES),
    mix=st.floats(0, 1),
    noise_seed=st.integers(0, 2**32 - 1),
)
def test_scores_stay_in_unit_interval(seed, kind, mix, noise_seed):
    t = sample_task(seed, kind, split="val")
    noise = np.random.default_rng(noise_seed).integers(0, 256, (64, 64, 3))
    img = np.rint((1 - mix) * np.asarray(t.target) + mix * noise).astype(np.uint8)
    s = score(t, Image.fromarray(img))
    assert all(0.0 <= v <= 1.0 for v in s.values()), s
    assert s["overall"] == pytest.approx(s["integration"] * (s["consistency"] + s["quality"]) / 2)


def test_batch_form_matches_single_scores_for_every_input_type():
    tasks = [sample_task(s, k, split="test") for s, k in zip(range(12), FAMILIES * 2)]
    outs = [
        BASELINES["oracle" if i % 3 == 0 else "copy_first" if i % 3 == 1 else "noise"](t) for i, t in enumerate(tasks)
    ]
    expected = torch.tensor([[score(t, o)[k] for k in REWARD_NAMES] for t, o in zip(tasks, outs)])
    arrays = [np.asarray(o) for o in outs]
    u8 = torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays])
    for images in (outs, arrays, u8, u8.float() / 255.0, list(u8)):
        got = score_batch(tasks, images)
        assert got.shape == (12, 3) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        combine(expected), torch.tensor([score(t, o)["overall"] for t, o in zip(tasks, outs)]), atol=1e-5, rtol=0
    )
    assert score_batch([t.spec for t in tasks], outs).shape == (12, 3)  # specs work as well as tasks
    assert score_batch([], []).shape == (0, 3)


@pytest.mark.parametrize(
    "image, exc, words",
    [
        (Image.new("RGB", (32, 32)), ValueError, r"image must be 64x64"),
        (Image.new("RGB", (64, 48)), ValueError, r"image must be 64x64"),
        (Image.new("L", (64, 64)), ValueError, r"image must be an RGB image, got mode 'L'"),
        (Image.new("RGBA", (64, 64)), ValueError, r"image must be an RGB image"),
        ("target.png", TypeError, r"image must be a PIL image"),
        (None, TypeError, r"image must be a PIL image"),
        (np.zeros((64, 64, 3), np.float32), ValueError, r"image as an array must be uint8"),
        (np.zeros((64, 64), np.uint8), ValueError, r"image as an array must be uint8 \(H, W, 3\)"),
        (torch.zeros(64, 64, 3), ValueError, r"image as a tensor must be \(3, H, W\)"),
        (torch.full((3, 64, 64), 2.0), ValueError, r"image as a float tensor must hold finite values in \[0, 1\]"),
        (torch.full((3, 64, 64), float("nan")), ValueError, r"finite"),
        (torch.zeros(3, 64, 64, dtype=torch.int32), ValueError, r"uint8 or floating point"),
    ],
)
def test_invalid_images_raise_clear_errors(image, exc, words):
    t = sample_task(0, "compose", 2)
    with pytest.raises(exc, match=words):
        score(t, image)


def test_invalid_tasks_and_batches_raise_clear_errors():
    t = sample_task(0, "compose", 2)
    with pytest.raises(TypeError, match="task must be a uniref.synthetic Task"):
        score("task", t.target)
    with pytest.raises(ValueError, match="got 1 tasks but 2 images"):
        score_batch([t], [t.target, t.target])
    with pytest.raises(TypeError, match="tasks must be a sequence"):
        score_batch(t, [t.target])
    with pytest.raises(TypeError, match="images must be a sequence"):
        score_batch([t], t.target)
    with pytest.raises(ValueError, match=r"images\[1\] must be 64x64"):
        score_batch([t, t], [t.target, Image.new("RGB", (8, 8))])
    with pytest.raises(ValueError, match=r"images as a tensor must be \(N, 3, H, W\)"):
        score_batch([t], torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"rewards must be \(N, 3\)"):
        combine(torch.zeros(4))
