"""UniRefTransformer2DModel vs diffusers' QwenImageTransformer2DModel (the peer), sample by sample."""

import pytest
import torch

import uniref
from uniref.models import UniRefTransformer2DModel
from uniref.models.transformer import rope_positions
from uniref.testing.qwen import TINY_TRANSFORMER

diffusers = pytest.importorskip("diffusers")

TINY = {**TINY_TRANSFORMER, **{"joint_attention_dim": 32}}
# three samples with 2, 1 and 4 images (target first) of different sizes, and prompts of 5, 9, 3 tokens
LAYOUTS = [[(6, 4), (4, 4)], [(4, 8)], [(2, 2), (6, 6), (4, 2), (2, 8)]]
TEXT_LENGTHS = [5, 9, 3]


def make_inputs(seed=0, layouts=LAYOUTS, text_lengths=TEXT_LENGTHS):
    g = torch.Generator().manual_seed(seed)
    latents = [[torch.randn(4, h, w, generator=g) for h, w in s] for s in layouts]
    texts = [torch.randn(n, 32, generator=g) for n in text_lengths]
    t = torch.rand(len(layouts), generator=g)
    return latents, texts, t


def _args(latents, texts, text_lengths, t):
    """``forward``'s arguments for a packed batch of ``latents``."""
    tokens, layout = uniref.pack_latents(latents)
    return tokens, torch.cat(texts), t, layout, text_lengths


def diffusers_per_sample(ref, latents, texts, t):
    """diffusers' own forward, one sample at a time (batch 1), target rows only."""
    outs = []
    for i, sample in enumerate(latents):
        tokens, layout = uniref.pack_latents([sample])
        shapes = [[(1, x.shape[1] // 2, x.shape[2] // 2) for x in sample]]
        out = ref(
            hidden_states=tokens[None],
            encoder_hidden_states=texts[i][None],
            timestep=t[i : i + 1],
            img_shapes=shapes,
            return_dict=False,
        )[0][0]
        outs.append(out[: layout.target_lengths[0]])
    return torch.cat(outs)


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_packed_batch_matches_diffusers_per_sample(zero_cond_t):
    torch.manual_seed(0)
    ref = diffusers.QwenImageTransformer2DModel(**TINY, zero_cond_t=zero_cond_t).eval()
    ours = UniRefTransformer2DModel.from_qwenimage(ref, attention_backend="cpu").eval()
    latents, texts, t = make_inputs()
    with torch.no_grad():
        tokens, layout = uniref.pack_latents(latents)
        out = ours(tokens, torch.cat(texts), t, layout, TEXT_LENGTHS)
        expected = diffusers_per_sample(ref, latents, texts, t)
    assert out.shape == expected.shape == (6 + 8 + 1, 16)  # target tokens only
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_diffusers_batch_is_wrong_for_mixed_sizes():
    """Two samples with equally many tokens but different shapes stack in diffusers, which then
    computes RoPE from the first sample's shapes only (it warns): the second sample comes out wrong.
    Packed, each sample gets its own positions."""
    torch.manual_seed(0)
    ref = diffusers.QwenImageTransformer2DModel(**TINY).eval()
    ours = UniRefTransformer2DModel.from_qwenimage(ref, attention_backend="cpu").eval()
    layouts = [[(2, 16), (4, 4)], [(16, 2), (4, 4)]]
    latents, texts, t = make_inputs(1, layouts, [6, 6])
    with torch.no_grad():
        expected = diffusers_per_sample(ref, latents, texts, t)
        tokens = torch.stack([uniref.pack_latents([s]).tokens for s in latents])
        shapes = [[(1, x.shape[1] // 2, x.shape[2] // 2) for x in s] for s in latents]
        batched = ref(
            hidden_states=tokens,
            encoder_hidden_states=torch.stack(texts),
            timestep=t,
            img_shapes=shapes,
            return_dict=False,
        )[0][:, :8].reshape(16, -1)
        ours_out = ours(*_args(latents, texts, [6, 6], t))
    scale = expected.abs().max()
    assert (batched[:8] - expected[:8]).abs().max() <= 1e-4 * scale  # first sample: right
    assert (batched[8:] - expected[8:]).abs().max() > 1e-3 * scale  # second sample: wrong positions
    assert (ours_out - expected).abs().max() <= 1e-4 * scale


def test_from_qwenimage_local_folder(tmp_path):
    ref = diffusers.QwenImageTransformer2DModel(**TINY)
    ref.save_pretrained(tmp_path)
    ours = UniRefTransformer2DModel.from_qwenimage(tmp_path)
    for (name, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(ref.state_dict().items())):
        assert torch.equal(a, b), name


def test_save_and_load_round_trip(tmp_path):
    model = UniRefTransformer2DModel(**TINY, rope_scheme="corner", zero_cond_t=True)
    model.save_pretrained(tmp_path)
    loaded = UniRefTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.config.rope_scheme == "corner" and loaded.config.zero_cond_t
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert list(tmp_path.glob("*.safetensors"))


def test_gradients_reach_every_parameter():
    model = UniRefTransformer2DModel(**TINY, attention_backend="cpu")
    latents, texts, t = make_inputs()
    out = model(*_args(latents, texts, TEXT_LENGTHS, t))
    out.square().mean().backward()
    missing = {n for n, p in model.named_parameters() if p.grad is None}
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # Only image tokens leave the model, so the last block's text output path is unused, as in diffusers.
    last = f"transformer_blocks.{TINY['num_layers'] - 1}."
    assert missing == {
        n
        for n, _ in model.named_parameters()
        if n.startswith(last + "attn.to_add_out") or n.startswith(last + "txt_mlp")
    }


def test_rope_positions_msrope():
    _, layout = uniref.pack_latents([[torch.zeros(1, 4, 6), torch.zeros(1, 2, 2)]])  # grids 2x3 and 1x1
    img, txt = rope_positions(layout, [2])
    # target: rows -1..0, cols -2..0 (centred: row - ceil(h/2)); reference: frame 1, (-1, -1)
    assert img[:, 0].tolist() == [0] * 6 + [1]
    assert img[:6, 1].tolist() == [-1, -1, -1, 0, 0, 0]
    assert img[:6, 2].tolist() == [-2, -1, 0, -2, -1, 0]
    assert img[6].tolist() == [1, -1, -1]
    # text after the largest half-extent max(2//2, 3//2) = 1
    assert txt.tolist() == [[1, 1, 1], [2, 2, 2]]


def test_bad_inputs():
    model = UniRefTransformer2DModel(**TINY)
    latents, texts, t = make_inputs()
    tokens, layout = uniref.pack_latents(latents)
    with pytest.raises(ValueError, match="text_lengths"):
        model(tokens, torch.cat(texts), t, layout, [5, 9])
    with pytest.raises(ValueError, match="timestep must have shape"):
        model(tokens, torch.cat(texts), t[:2], layout, TEXT_LENGTHS)
    with pytest.raises(ValueError, match="hidden_states must be"):
        model(tokens[1:], torch.cat(texts), t, layout, TEXT_LENGTHS)
    with pytest.raises(ValueError, match="SequenceLayout"):
        model(tokens, torch.cat(texts), t, "layout", TEXT_LENGTHS)
    with pytest.raises(ValueError, match="axes_dims_rope"):
        UniRefTransformer2DModel(**{**TINY, "axes_dims_rope": (4, 4, 4)})
    with pytest.raises(ValueError, match="rope_scheme"):
        UniRefTransformer2DModel(**TINY, rope_scheme="spiral")


def test_layout_is_built_once_per_batch():
    """A sampling loop calls the model with the same layout every step: what the blocks derive from it
    (segments, offsets, RoPE tables) is reused, and the outputs are the same as with a fresh layout."""
    model = UniRefTransformer2DModel(**TINY, attention_backend="cpu").eval()
    latents, texts, t = make_inputs()
    tokens, layout = uniref.pack_latents(latents)
    with torch.no_grad():
        first = model(tokens, torch.cat(texts), t, layout, TEXT_LENGTHS)
        derived = model._derived_cache[2]
        again = model(tokens, torch.cat(texts), t, layout, TEXT_LENGTHS)
        assert model._derived_cache[2] is derived
        fresh = model(*_args(latents, texts, TEXT_LENGTHS, t))
        assert model._derived_cache[2] is not derived
    assert torch.equal(first, again) and torch.equal(first, fresh)


def test_deprecated_packed_signature_still_works():
    """``forward(packed, encoder_hidden_states, text_lengths, timestep[, hidden_states])`` (positional), the call
    before the layout had its own object, gives the same output (with a DeprecationWarning) for one release."""
    model = UniRefTransformer2DModel(**TINY, attention_backend="cpu").eval()
    latents, texts, t = make_inputs()
    packed = uniref.pack_latents(latents)
    with torch.no_grad():
        new = model(packed.tokens, torch.cat(texts), t, packed.layout, TEXT_LENGTHS)
        with pytest.warns(DeprecationWarning):
            old = model(packed, torch.cat(texts), TEXT_LENGTHS, t)
        with pytest.warns(DeprecationWarning):
            old_hidden = model(packed, torch.cat(texts), TEXT_LENGTHS, t, packed.tokens * 0)
        with_zeros = model(packed.tokens * 0, torch.cat(texts), t, packed.layout, TEXT_LENGTHS)
    assert torch.equal(new, old) and torch.equal(old_hidden, with_zeros)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_selective_gradient_checkpointing(every):
    """Checkpointing every k-th block recomputes blocks 0, k, 2k, ... and changes no gradient."""
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = UniRefTransformer2DModel(**{**TINY, "num_layers": 4}, attention_backend="cpu")
        if checkpointing:
            model.enable_gradient_checkpointing()
            model.checkpoint_every_k_blocks = every
            inner = model._gradient_checkpointing_func
            model._gradient_checkpointing_func = lambda block, *a: calls.append(block) or inner(block, *a)
        latents, texts, t = make_inputs()
        model(*_args(latents, texts, TEXT_LENGTHS, t)).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert len(calls) == len(range(0, 4, every))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)
