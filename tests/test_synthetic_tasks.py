"""Task sampling, instructions, disjoint splits and the training dataset."""

import collections
import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import uniref
from uniref.synthetic import (
    EDIT_KINDS,
    FAMILIES,
    SPLITS,
    SyntheticEditDataset,
    collate_samples,
    sample_task,
    split_combinations,
    split_of,
)
from uniref.synthetic.tasks import compose_layout
from uniref.synthetic.world import OBJECT_COLOURS, SHAPES, render_background


def _bytes(task):
    return [im.tobytes() for im in task.images], task.prompt, task.target.tobytes()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(min_value=-(2**63), max_value=2**63),
    kind=st.sampled_from(FAMILIES + ("edit",)),
    split=st.sampled_from(SPLITS),
)
def test_same_seed_gives_identical_bytes(seed, kind, split):
    a, b = sample_task(seed, kind, split=split), sample_task(seed, kind, split=split)
    assert _bytes(a) == _bytes(b)
    assert a.spec == b.spec


def test_different_seeds_give_different_tasks():
    for kind in FAMILIES:
        assert len({_bytes(sample_task(s, kind))[2] for s in range(20)}) >= 18, kind


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("size", [32, 64, 96])
def test_task_structure(kind, size):
    for seed in range(10):
        t = sample_task(seed, kind, size=size)
        assert t.spec.kind == kind and t.spec.size == size
        assert isinstance(t.target, Image.Image) and t.target.mode == "RGB" and t.target.size == (size, size)
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in t.images)
        assert t.images[0].size == (size, size)  # the edited image / the background image
        assert t.prompt.endswith(".") and len(t.prompt.split()) >= 2
        if kind == "compose":
            assert 2 <= len(t.images) <= 6 and len(t.spec.target.objects) == len(t.images) - 1
            for k in range(2, len(t.images) + 1):
                assert f"image {k}" in t.prompt
        else:
            assert len(t.images) == 1


def test_composition_references_vary_in_size_and_aspect():
    shapes = {sample_task(s, "compose", 6).images[k].size for s in range(20) for k in range(1, 6)}
    assert len(shapes) >= 5 and len({w / h for w, h in shapes}) >= 3


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_composition_target_places_each_named_object(k):
    for seed in range(8):
        t = sample_task(seed, "compose", k)
        spec = t.spec
        assert len(t.images) == k
        centres = compose_layout(k - 1, spec.size)
        bg = render_background(spec.target.background, spec.size, spec.size, spec.size)
        np.testing.assert_array_equal(np.asarray(t.images[0]), bg)  # image 1: the background alone
        for j, obj in enumerate(spec.target.objects):
            ref = spec.references[j + 1]
            same = [o for o in ref.objects if (o.shape, o.colour) == (obj.shape, obj.colour)]
            assert len(same) == 1 and same[0].size == obj.size  # named object: unique in its image, size kept
            assert f"the {obj.colour} {obj.shape} from image {j + 2}" in t.prompt
            assert (obj.x + obj.size // 2, obj.y + obj.size // 2) == centres[j]
        # reading order: rows top to bottom, left to right within a row
        assert centres == sorted(centres, key=lambda c: (c[1], c[0]))


def test_layouts_keep_objects_apart():
    from uniref.synthetic.tasks import _compose_max_size

    for n in range(1, 6):
        cs = compose_layout(n, 64)
        s = _compose_max_size(n)
        for a, b in itertools.combinations(cs, 2):
            assert max(abs(a[0] - b[0]), abs(a[1] - b[1])) - s >= 5


def _diff_mask(a: Image.Image, b: Image.Image) -> np.ndarray:
    return (np.asarray(a) != np.asarray(b)).any(-1)


def _box(o):
    m = np.zeros((64, 64), bool)
    m[o.y : o.y + o.size, o.x : o.x + o.size] = True
    return m


def test_single_image_edits_change_only_what_they_say():
    for seed in range(15):
        t = sample_task(seed, "recolor")
        src, dst = t.spec.references[0].objects[0], t.spec.target.objects[0]
        assert (src.shape, src.x, src.y, src.size) == (
            dst.shape,
            dst.x,
            dst.y,
            dst.size,
        ) and src.colour != dst.colour
        assert f"the {src.colour} {src.shape}" in t.prompt and dst.colour in t.prompt
        changed = _diff_mask(t.images[0], t.target)
        assert changed.any() and not (changed & ~_box(src)).any()

        t = sample_task(seed, "remove")
        gone = t.spec.vacated[0]
        assert gone not in t.spec.target.objects and len(t.spec.target.objects) >= 1
        assert not (_diff_mask(t.images[0], t.target) & ~_box(gone)).any()

        t = sample_task(seed, "move")
        old, new = t.spec.vacated[0], t.spec.target.objects[0]
        assert (old.shape, old.colour, old.size) == (new.shape, new.colour, new.size) and (old.x, old.y) != (
            new.x,
            new.y,
        )
        assert not (_diff_mask(t.images[0], t.target) & ~(_box(old) | _box(new))).any()

        t = sample_task(seed, "add")
        added = t.spec.target.objects[t.spec.placed[0]]
        assert added not in t.spec.references[0].objects and f"{added.colour} {added.shape}" in t.prompt
        assert not (_diff_mask(t.images[0], t.target) & ~_box(added)).any()

        t = sample_task(seed, "background")
        assert t.spec.references[0].objects == t.spec.target.objects and t.spec.new_background
        assert _diff_mask(t.images[0], t.target).mean() > 0.5


def test_named_objects_are_unambiguous():
    for kind in EDIT_KINDS:
        for seed in range(30):
            for scene in (*sample_task(seed, kind).spec.references, sample_task(seed, kind).spec.target):
                names = [(o.shape, o.colour) for o in scene.objects]
                assert len(names) == len(set(names)), (kind, seed)


def test_instructions_come_in_several_phrasings():
    for kind in FAMILIES:
        used = {sample_task(s, kind).spec.phrasing for s in range(40)}
        assert len(used) >= 3, kind


# --- splits ---------------------------------------------------------------------------------------------


def test_splits_partition_every_family_and_keep_each_shape_and_colour_in_training():
    for fam in FAMILIES:
        parts = [set(split_combinations(sp, fam)) for sp in SPLITS]
        assert sum(map(len, parts)) == len(SHAPES) * len(OBJECT_COLOURS)
        assert all(not (a & b) for a, b in itertools.combinations(parts, 2))
        train = parts[0]
        assert {s for s, _ in train} == set(SHAPES) and {c for _, c in train} == set(OBJECT_COLOURS)
        assert len(parts[1]) >= 6 and len(parts[2]) >= 6
        for sp, part in zip(SPLITS, parts):
            assert all(split_of(s, c, fam) == sp for s, c in part)
    # held-out combinations differ across families: a pair held out for compose is trained on elsewhere
    assert set(split_combinations("test", "compose")) != set(split_combinations("test", "recolor"))


@pytest.mark.parametrize("kind", FAMILIES)
def test_split_tasks_are_disjoint_by_construction(kind):
    seen = {}
    for split in SPLITS:
        for seed in range(60):
            spec = sample_task(seed, kind, split=split).spec
            assert spec.keyed and all(split_of(s, c, f) == split for s, c, f in spec.keyed)
            seen.setdefault(split, set()).update(spec.keyed)
            if split == "train":
                # a training task shows no held-out combination of its family anywhere
                for scene in (*spec.references, spec.target):
                    assert all(split_of(o.shape, o.colour, kind) == "train" for o in scene.objects)
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])


# --- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"seed": 1.5}, TypeError, "seed"),
        ({"seed": "1"}, TypeError, "seed"),
        ({"kind": "rotate"}, ValueError, "kind"),
        ({"kind": "compose", "num_refs": 7}, ValueError, "num_refs"),
        ({"kind": "compose", "num_refs": 1}, ValueError, "num_refs"),
        ({"kind": "move", "num_refs": 2}, ValueError, "num_refs"),
        ({"size": 16}, ValueError, "size"),
        ({"size": 64.0}, ValueError, "size"),
        ({"split": "dev"}, ValueError, "split"),
    ],
)
def test_sample_task_rejects_bad_arguments(kwargs, exc, words):
    args = {"seed": 0, "kind": "compose", **kwargs}
    with pytest.raises(exc, match=words):
        sample_task(**args)


# --- dataset --------------------------------------------------------------------------------------------


def test_dataset_items_and_determinism():
    ds = SyntheticEditDataset("train", length=50, compose_ratio=0.5)
    assert len(ds) == 50
    for i in (0, 7, 49):
        a, b = ds[i], ds[i]
        assert torch.equal(a["target"], b["target"]) and a["prompt"] == b["prompt"]
        assert a["target"].dtype == torch.uint8 and a["target"].shape == (3, 64, 64)
        assert [tuple(r.shape[1:]) for r in a["references"]] == a["reference_sizes"]
        task = ds.task(i)
        assert task.prompt == a["prompt"]
        np.testing.assert_array_equal(np.asarray(task.target), a["target"].permute(1, 2, 0).numpy())
    other = SyntheticEditDataset("train", length=50, seed=1)
    assert any(other[i]["prompt"] != ds[i]["prompt"] for i in range(5))
    with pytest.raises(IndexError):
        ds[50]


def test_dataset_mixing_ratio_and_kinds():
    kinds = collections.Counter(
        SyntheticEditDataset("val", length=400, compose_ratio=0.25)[i]["kind"] for i in range(400)
    )
    assert 70 <= kinds["compose"] <= 130 and all(kinds[k] > 30 for k in EDIT_KINDS)
    only = SyntheticEditDataset("train", length=30, compose_ratio=0.0, edit_kinds=["move"])
    assert {only[i]["kind"] for i in range(30)} == {"move"}
    comp = SyntheticEditDataset("train", length=30, compose_ratio=1.0, num_refs=(4, 4))
    assert all(len(comp[i]["references"]) == 4 for i in range(30))


def test_dataset_feeds_the_reference_planner_and_a_dataloader():
    ds = SyntheticEditDataset("train", length=8, compose_ratio=1.0, num_refs=(6, 6))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_samples)))
    assert batch["target"].shape == (4, 3, 64, 64) and len(batch["prompt"]) == 4
    for sizes in batch["reference_sizes"]:
        plan = uniref.plan_reference_sizes(sizes, 128 * 128)
        assert len(plan) == 6 and sum(h * w for h, w in plan) <= 128 * 128


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"split": "dev"}, "split"),
        ({"compose_ratio": 1.5}, "compose_ratio"),
        ({"num_refs": (1, 3)}, "num_refs"),
        ({"num_refs": (4, 3)}, "num_refs"),
        ({"edit_kinds": ["compose"]}, "edit_kinds"),
        ({"length": -1}, "length"),
        ({"size": 8}, "size"),
    ],
)
def test_dataset_rejects_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SyntheticEditDataset(**kwargs)


def test_bytes_do_not_depend_on_the_process():
    """Seeding hashes a string with sha512 (not Python's salted hash), so other processes agree."""
    code = (
        "import hashlib; from uniref.synthetic import sample_task; h = hashlib.sha256(); "
        "[h.update(b''.join(i.tobytes() for i in t.images) + t.prompt.encode() + t.target.tobytes()) "
        "for t in (sample_task(s, k) for s in range(5) for k in ('compose', 'edit'))]; print(h.hexdigest())"
    )
    repo = str(Path(__file__).resolve().parents[1])
    digests = set()
    for hash_seed in ("1", "2"):
        env = {
            **os.environ,
            "PYTHONHASHSEED": hash_seed,
            "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
        }
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        digests.add(out.stdout.strip())
    assert len(digests) == 1
