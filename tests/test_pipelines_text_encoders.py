"""The prompt encoders: ByteTextEncoder (packing, training, save/load) and QwenVLPromptEncoder against
diffusers' own Qwen-Image-Edit-Plus prompt encoding (tiny random models, CPU)."""

import PIL.Image
import pytest
import torch

from uniref.pipelines import ByteTextEncoder, UniRefEditPipeline


@pytest.fixture(scope="module")
def qwen_pipes():
    pytest.importorskip("transformers")
    from uniref.testing.qwen import tiny_qwen_edit_plus

    qwen = tiny_qwen_edit_plus()
    return qwen, UniRefEditPipeline.from_qwenimage_edit(qwen, target_pixels=64 * 64)


def test_byte_text_encoder_packs_without_cross_talk():
    enc = ByteTextEncoder(embed_dim=24, hidden_dim=32, num_layers=2, num_heads=4, max_length=16).eval()
    prompts = ["a red car", "", "ünïcødé ✓", "x" * 40]
    with torch.no_grad():
        embeds, lengths = enc.encode_prompts(prompts)
        alone = [enc.encode_prompts([p])[0] for p in prompts]
    assert lengths == [10, 1, 1 + len("ünïcødé ✓".encode()), 16]  # BOS + bytes, truncated at max_length
    assert embeds.shape == (sum(lengths), 24)
    torch.testing.assert_close(embeds, torch.cat(alone), atol=1e-6, rtol=1e-5)
    ids, _ = enc.tokenize(["ab"])
    assert ids.tolist() == [ByteTextEncoder.BOS, 97, 98]


def test_byte_text_encoder_is_trainable_and_round_trips(tmp_path):
    enc = ByteTextEncoder(embed_dim=8, hidden_dim=16, num_layers=1, num_heads=2, max_length=32)
    embeds, _ = enc.encode_prompts(["one", "two words"])
    embeds.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())
    enc.save_pretrained(tmp_path)
    back = ByteTextEncoder.from_pretrained(tmp_path)
    assert back.config.max_length == 32
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), back.state_dict().values()))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        ByteTextEncoder(hidden_dim=10, num_heads=4)


def test_qwen_prompt_encoder_packs_each_sample_as_diffusers_encodes_it(qwen_pipes):
    qwen, ours = qwen_pipes
    enc = ours.text_encoder
    assert enc.embed_dim == 16 and enc.text_encoder is qwen.text_encoder  # shared, not copied
    img = PIL.Image.new("RGB", (40, 30), (200, 30, 30))
    with torch.no_grad():
        embeds, lengths = enc.encode_prompts(["red", "two pictures"], [[img], [img, img]])
        alone = [enc.encode_prompts([p], [imgs])[0] for p, imgs in (("red", [img]), ("two pictures", [img, img]))]
    assert embeds.shape == (sum(lengths), 16) and [a.shape[0] for a in alone] == lengths
    torch.testing.assert_close(embeds, torch.cat(alone))
