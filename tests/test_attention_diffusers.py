"""diffusers' Qwen-Image MMDiT with its joint attention run by uniref.varlen_attention
(uniref.integrations.diffusers_attention) vs the same model with diffusers' own processor."""

import importlib.util

import pytest
import torch

import uniref
from uniref.integrations.diffusers_attention import VarlenJointAttnProcessor, use_varlen_attention
from uniref.testing.qwen import TINY_TRANSFORMER

# diffusers is imported when a test runs, not when pytest collects this module: importing it pulls in
# triton, and tests/test_grpo_triton.py must set TRITON_INTERPRET before triton's first import.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")

TINY = {**TINY_TRANSFORMER, **{"joint_attention_dim": 32}}


def tiny_model():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(**TINY).eval()


def padded_batch(text_lengths=(7, 4, 1), seed=0):
    """Three samples of 4x4 image tokens and prompts padded to 7 tokens, as a diffusers pipeline batches them."""
    g = torch.Generator().manual_seed(seed)
    batch, text = len(text_lengths), max(text_lengths)
    mask = torch.arange(text)[None] < torch.tensor(text_lengths)[:, None]
    return dict(
        hidden_states=torch.randn(batch, 16, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
        encoder_hidden_states_mask=mask.long(),
        timestep=torch.rand(batch, generator=g),
        img_shapes=[[(1, 4, 4)]] * batch,
    )


@pytest.mark.parametrize("backend", ["cpu", "sdpa", "auto"])
@pytest.mark.parametrize("masked", [True, False], ids=["text_mask", "no_mask"])
def test_model_matches_default_processor(backend, masked):
    model = tiny_model()
    inputs = padded_batch()
    if not masked:
        inputs["encoder_hidden_states_mask"] = None
    x = inputs.pop("hidden_states")
    x_default, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected = model(hidden_states=x_default, **inputs).sample
    expected.square().sum().backward()
    assert use_varlen_attention(model, backend=backend) == TINY["num_layers"]
    out = model(hidden_states=x_ours, **inputs).sample
    out.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_ours.grad, x_default.grad, rtol=1e-5, atol=1e-5)


def test_packed_streams_match_per_sample_default():
    """One attention layer on three samples packed into batch 1 (cu_seqlens) vs diffusers' processor run on
    each sample alone: per-sample RoPE frequencies, concatenated, make the packed layout exact."""
    model = tiny_model()
    attn = model.transformer_blocks[0].attn
    text_lengths, image_shapes = [5, 9, 3], [(4, 4), (2, 4), (3, 4)]
    g = torch.Generator().manual_seed(1)
    dim = TINY["num_attention_heads"] * TINY["attention_head_dim"]
    txt = [torch.randn(1, n, dim, generator=g) for n in text_lengths]
    img = [torch.randn(1, h * w, dim, generator=g) for h, w in image_shapes]
    freqs = [
        model.pos_embed([[(1, h, w)]], max_txt_seq_len=n, device="cpu") for (h, w), n in zip(image_shapes, text_lengths)
    ]

    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    default = QwenDoubleStreamAttnProcessor2_0()
    with torch.no_grad():
        expected = [default(attn, i, t, image_rotary_emb=f) for i, t, f in zip(img, txt, freqs)]
        cu = lambda lengths: torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)  # noqa: E731
        packed_freqs = (torch.cat([f[0] for f in freqs]), torch.cat([f[1] for f in freqs]))
        img_out, txt_out = VarlenJointAttnProcessor(backend="cpu")(
            attn, torch.cat(img, dim=1), torch.cat(txt, dim=1), image_rotary_emb=packed_freqs,
            cu_seqlens_text=cu(text_lengths), cu_seqlens_image=cu([h * w for h, w in image_shapes]),
        )  # fmt: skip
    torch.testing.assert_close(img_out[0], torch.cat([e[0][0] for e in expected]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt_out[0], torch.cat([e[1][0] for e in expected]), rtol=1e-5, atol=1e-5)


def test_errors():
    with pytest.raises(ValueError, match="no attention module running diffusers' QwenDoubleStreamAttnProcessor2_0"):
        use_varlen_attention(torch.nn.Linear(2, 2))
    attn = tiny_model().transformer_blocks[0].attn
    x, t = torch.randn(2, 4, 32), torch.randn(2, 3, 32)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    processor = VarlenJointAttnProcessor()
    with pytest.raises(ValueError, match="batch dimension 1"):
        processor(attn, x, t, cu_seqlens_text=cu, cu_seqlens_image=cu)
    with pytest.raises(ValueError, match="pass both cu_seqlens_text and cu_seqlens_image"):
        processor(attn, x, t, cu_seqlens_text=cu)
    with pytest.raises(ValueError, match="does not take an attention_mask"):
        processor(attn, x, t, attention_mask=torch.ones(2, 7))
    assert uniref.varlen_attention  # the processor's attention is the public function
