"""SELF packing ops vs the plain-torch reference (reshape/permute/cat)."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import uniref
from uniref.testing import DEVICES
from uniref.testing.packing import (
    concat_joint_reference,
    pack_reference,
    split_joint_reference,
    unpack_reference,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def make_batch(layout, channels=16, p=2, dtype=torch.float32, device="cpu", seed=0):
    """layout: per sample, a list of (h, w) in patches."""
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(channels, h * p, w * p, generator=g).to(dtype=dtype, device=device) for h, w in sample]
        for sample in layout
    ]


LAYOUTS = {
    "single_1x1_patch": [[(1, 1)]],
    "one_sample_two_images": [[(3, 5), (2, 2)]],
    "mixed": [[(4, 4), (2, 6)], [(1, 1)], [(5, 3), (1, 7), (3, 3)]],
    "seven_references": [[(2, 3)] + [(1 + k % 3, 2 + k % 4) for k in range(7)]],
    "very_unequal": [[(1, 1), (40, 48)], [(64, 1), (1, 64)]],
}


def assert_same(packed, latents, p):
    tokens, pos, cu = pack_reference(latents, p)
    assert torch.equal(packed.tokens, tokens)
    assert torch.equal(packed.layout.position_ids, pos)
    assert torch.equal(packed.layout.cu_seqlens, cu)
    assert packed.layout.max_seqlen == int((cu[1:] - cu[:-1]).max())
    # the same layout from the sizes alone, without tokens
    sizes = [[tuple(x.shape[1:]) for x in sample] for sample in latents]
    alone = uniref.SequenceLayout.from_image_sizes(sizes, latents[0][0].shape[0], p, tokens.device)
    assert torch.equal(alone.position_ids, pos) and torch.equal(alone.cu_seqlens, cu)
    assert alone.image_sizes == packed.layout.image_sizes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_pack_unpack_matches_reference(layout, dtype, device, poison):
    latents = make_batch(layout, dtype=dtype, device=device)
    packed = uniref.pack_latents(latents)
    assert_same(packed, latents, 2)
    back = uniref.unpack_latents(*packed)
    for sample_in, sample_out in zip(latents, back):
        assert len(sample_in) == len(sample_out)
        for a, b in zip(sample_in, sample_out):
            assert torch.equal(a, b)  # bitwise round trip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [1, 2, 4])
def test_patch_sizes_and_channels(p, device, poison):
    latents = make_batch([[(3, 2), (1, 4)], [(2, 2)]], channels=3, p=p, device=device)
    packed = uniref.pack_latents(latents, patch_size=p)
    assert packed.tokens.shape[1] == 3 * p * p
    assert_same(packed, latents, p)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = torch.randn(8, 12, 16, device=device)
    views = [base.transpose(1, 2), base[:, ::2, :4], base.permute(0, 2, 1)[:, :6]]
    packed = uniref.pack_latents([views])
    assert_same(packed, [[v.contiguous() for v in views]], 2)


def test_layout_matches_diffusers_qwenimage():
    pipeline = pytest.importorskip("diffusers.pipelines.qwenimage.pipeline_qwenimage")
    x = torch.randn(16, 10, 6)
    ours = uniref.pack_latents([[x]]).tokens
    theirs = pipeline.QwenImagePipeline._pack_latents(x[None], 1, 16, 10, 6)
    assert torch.equal(ours, theirs[0])


def test_packed_metadata():
    latents = make_batch([[(2, 3), (1, 1)], [(4, 4)]])
    tokens, layout = uniref.pack_latents(latents)
    assert layout.batch_size == 2
    assert layout.seqlens == [7, 16]
    assert layout.image_tokens(0) == [6, 1]
    assert layout.target_slices() == [slice(0, 6), slice(7, 23)]
    assert layout.cu_seqlens.dtype == torch.int32
    assert layout.image_sizes == (((4, 6), (2, 2)), ((8, 8),))
    assert layout.target_lengths == [6, 16] and layout.reference_lengths == [1, 0]
    assert layout.cu_targets.tolist() == [0, 6, 22] and layout.cu_references.tolist() == [0, 1, 1]
    assert layout.targets().image_sizes == (((4, 6),), ((8, 8),))
    assert layout.repeat(2).seqlens == [7, 16, 7, 16] and layout.select([1]).seqlens == [16]
    assert uniref.cu_seqlens_from_lengths([3, 0, 2]).tolist() == [0, 3, 3, 5]


def test_packed_latents_still_reads_as_before():
    """The attributes `PackedLatents` had before the layout had its own object still read (deprecated)."""
    latents = make_batch([[(2, 3), (1, 1)], [(4, 4)]])
    packed = uniref.pack_latents(latents)
    assert packed.batch_size == packed.layout.batch_size and packed.seqlens == packed.layout.seqlens
    assert packed.image_tokens(0) == [6, 1] and packed.target_slices() == packed.layout.target_slices()
    assert torch.equal(packed.cu_seqlens, packed.layout.cu_seqlens) and packed.max_seqlen == 16
    assert [tuple(x.shape[1:]) for x in uniref.unpack_latents(packed.tokens, packed)[0]] == [(4, 6), (2, 2)]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        packed.nope


@settings(max_examples=30, deadline=None)
@given(
    layout=st.lists(
        st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=7), min_size=1, max_size=5
    ),
    channels=st.integers(1, 5),
    p=st.integers(1, 3),
)
def test_round_trip_property(layout, channels, p):
    latents = make_batch(layout, channels=channels, p=p)
    packed = uniref.pack_latents(latents, patch_size=p)
    assert_same(packed, latents, p)
    back = uniref.unpack_latents(*packed)
    assert all(torch.equal(a, b) for s, t in zip(latents, back) for a, b in zip(s, t))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_flow_through_pack_and_unpack(device):
    latents = [
        [x.requires_grad_() for x in sample]
        for sample in make_batch([[(2, 2), (1, 3)], [(3, 1)]], channels=2, dtype=torch.float64, device=device)
    ]
    flat = [x for s in latents for x in s]
    packed = uniref.pack_latents(latents)
    weight = torch.randn_like(packed.tokens)
    (packed.tokens * weight).sum().backward()
    expected = unpack_reference(weight, packed.layout.image_sizes, 2)
    for x, g in zip(flat, [g for s in expected for g in s]):
        assert torch.equal(x.grad, g)


def test_gradcheck_pack_unpack():
    latents = make_batch([[(2, 1), (1, 2)], [(1, 1)]], channels=2, dtype=torch.float64)
    flat = [x.requires_grad_() for s in latents for x in s]
    counts = [2, 1]

    def pack(*xs):
        return torch.ops.uniref.pack_latents(list(xs), counts, 2)[0]

    torch.autograd.gradcheck(pack, flat)
    tokens = pack(*flat).detach().requires_grad_()
    sizes = [v for x in flat for v in x.shape[1:]]
    torch.autograd.gradcheck(lambda t: tuple(torch.ops.uniref.unpack_latents(t, sizes, 2)), (tokens,))
    # An unused output still needs a (zero) gradient for its token rows.
    torch.autograd.gradcheck(lambda t: torch.ops.uniref.unpack_latents(t, sizes, 2)[1], (tokens,))


def test_opcheck_packing_ops():
    latents = [x for s in make_batch([[(2, 3), (1, 1)], [(2, 2)]], channels=3) for x in s]
    torch.library.opcheck(torch.ops.uniref.pack_latents.default, (latents, [2, 1], 2))
    tokens = torch.randn(11, 12)
    torch.library.opcheck(torch.ops.uniref.unpack_latents.default, (tokens, [4, 6, 2, 2, 4, 4], 2))
    text, image = torch.randn(5, 3, 4), torch.randn(7, 3, 4)
    cu_t, cu_i = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 4, 7], dtype=torch.int32)
    torch.library.opcheck(torch.ops.uniref.joint_concat.default, (text, image, cu_t, cu_i))
    joint = torch.randn(12, 3, 4)
    torch.library.opcheck(torch.ops.uniref.joint_split.default, (joint, cu_t, cu_i, 5))


def test_torch_compile_pack_unpack():
    latents = make_batch([[(2, 3), (1, 1)], [(2, 2)]], channels=4)

    def round_trip(xs):
        tokens, layout = uniref.pack_latents(xs)
        return uniref.unpack_latents(tokens * 2, layout)

    compiled = torch.compile(round_trip, fullgraph=True, backend="inductor")
    out = compiled(latents)
    for s, t in zip(latents, out):
        for a, b in zip(s, t):
            assert torch.equal(a * 2, b)


def random_joint(batch, trailing=(3, 4), seed=0, dtype=torch.float32, device="cpu", empty_ok=True):
    rng = random.Random(seed)
    lo = 0 if empty_ok else 1
    lt = [rng.randint(lo, 9) for _ in range(batch)]
    li = [rng.randint(lo, 9) for _ in range(batch)]
    text = torch.randn(sum(lt), *trailing).to(dtype=dtype, device=device)
    image = torch.randn(sum(li), *trailing).to(dtype=dtype, device=device)
    return text, uniref.cu_seqlens_from_lengths(lt, device), image, uniref.cu_seqlens_from_lengths(li, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,trailing", [(1, (1,)), (3, (3, 4)), (17, (2, 5)), (6, (24, 128))])
def test_joint_concat_split(batch, trailing, dtype, device, poison):
    text, cu_t, image, cu_i = random_joint(batch, trailing, dtype=dtype, device=device)
    joint, cu_j = uniref.concat_joint(text, cu_t, image, cu_i)
    assert torch.equal(joint, concat_joint_reference(text, cu_t, image, cu_i))
    assert torch.equal(cu_j, cu_t + cu_i)
    t2, i2 = uniref.split_joint(joint, cu_t, cu_i, text.shape[0])
    assert torch.equal(t2, text) and torch.equal(i2, image)
    t3, i3 = uniref.split_joint(joint, cu_t, cu_i)  # text_total read from cu_seqlens_text
    assert torch.equal(t3, t2) and torch.equal(i3, i2)
    rt, ri = split_joint_reference(joint, cu_t, cu_i)
    assert torch.equal(rt, text) and torch.equal(ri, image)


def test_joint_gradients():
    text, cu_t, image, cu_i = random_joint(4, (2, 3), dtype=torch.float64, empty_ok=False)
    text.requires_grad_()
    image.requires_grad_()
    torch.autograd.gradcheck(lambda t, i: torch.ops.uniref.joint_concat(t, i, cu_t, cu_i), (text, image))
    joint = torch.randn(text.shape[0] + image.shape[0], 2, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda j: torch.ops.uniref.joint_split(j, cu_t, cu_i, text.shape[0]), (joint,))
    torch.autograd.gradcheck(lambda j: torch.ops.uniref.joint_split(j, cu_t, cu_i, text.shape[0])[1], (joint,))


class TestErrors:
    def test_pack_rejects_bad_latents(self):
        good = torch.randn(4, 4, 4)
        cases = [
            ([[torch.randn(4, 3, 4)]], "not a positive multiple of patch_size"),
            ([[good, torch.randn(5, 4, 4)]], "channels"),
            ([[good, good.double()]], "dtype"),
            ([[torch.randn(4, 4)]], r"\(C, h, w\)"),
            ([[good, torch.randn(4, 0, 4)]], "positive multiple"),
        ]
        for latents, message in cases:
            with pytest.raises(RuntimeError, match=message):
                uniref.pack_latents(latents)
        with pytest.raises(ValueError, match="non-empty list of samples"):
            uniref.pack_latents([])
        with pytest.raises(ValueError, match="non-empty list of samples"):
            uniref.pack_latents([[]])
        with pytest.raises(ValueError, match="non-empty list of samples"):
            uniref.pack_latents(good)
        with pytest.raises(ValueError, match="expected a \\(C, h, w\\) tensor"):
            uniref.pack_latents([[good, "image"]])

    def test_pack_op_rejects_inconsistent_counts(self):
        x = torch.randn(4, 4, 4)
        with pytest.raises(RuntimeError, match="sums to 3 but 2 latents"):
            torch.ops.uniref.pack_latents([x, x], [1, 2], 2)
        with pytest.raises(RuntimeError, match="at least one image"):
            torch.ops.uniref.pack_latents([x, x], [2, 0], 2)
        with pytest.raises(RuntimeError, match="patch_size must be >= 1"):
            torch.ops.uniref.pack_latents([x], [1], 0)

    def test_unpack_rejects_mismatch(self):
        packed = uniref.pack_latents(make_batch([[(2, 2)]]))
        with pytest.raises(ValueError, match="tokens must be"):
            uniref.unpack_latents(packed.tokens[:, :5], packed)
        with pytest.raises(RuntimeError, match="describe 4 tokens but tokens has 3 rows"):
            torch.ops.uniref.unpack_latents(packed.tokens[:3], [4, 4], 2)
        with pytest.raises(RuntimeError, match="not a positive multiple"):
            torch.ops.uniref.unpack_latents(packed.tokens, [3, 4], 2)

    @pytest.mark.parametrize(
        "cu_text,message",
        [
            (torch.tensor([0, 2, 5], dtype=torch.int64), "must be int32"),
            (torch.tensor([1, 2, 5], dtype=torch.int32), r"\[0\] must be 0"),
            (torch.tensor([0, 4, 3], dtype=torch.int32), "non-decreasing"),
            (torch.tensor([0, 2, 4], dtype=torch.int32), "must equal the number of rows"),
            (torch.tensor([0, 5], dtype=torch.int32), "both need B\\+1"),
            (torch.tensor([[0, 2, 5]], dtype=torch.int32), "1-D"),
        ],
    )
    def test_joint_rejects_bad_cu_seqlens(self, cu_text, message):
        text, image = torch.randn(5, 3), torch.randn(7, 3)
        cu_i = torch.tensor([0, 4, 7], dtype=torch.int32)
        with pytest.raises(RuntimeError, match=message):
            uniref.concat_joint(text, cu_text, image, cu_i)

    def test_joint_rejects_bad_streams(self):
        cu_t, cu_i = torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0, 7], dtype=torch.int32)
        with pytest.raises(RuntimeError, match="trailing shape"):
            uniref.concat_joint(torch.randn(5, 3), cu_t, torch.randn(7, 4), cu_i)
        with pytest.raises(RuntimeError, match="text is Float but image is Double"):
            uniref.concat_joint(torch.randn(5, 3), cu_t, torch.randn(7, 3).double(), cu_i)
        with pytest.raises(RuntimeError, match="text_total=13 must lie in"):
            uniref.split_joint(torch.randn(12, 3), cu_t, cu_i, 13)
        with pytest.raises(RuntimeError, match="must equal the number of rows"):
            uniref.split_joint(torch.randn(12, 3), cu_t, cu_i, 4)
