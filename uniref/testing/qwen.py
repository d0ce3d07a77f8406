"""A tiny random diffusers Qwen-Image-Edit-Plus pipeline, built offline from real configs: the peer that
uniref's Qwen path is tested against."""

from __future__ import annotations

import torch

from uniref.presets import qwenimage_scheduler

__all__ = ["QWEN_SPECIAL_TOKENS", "TINY_TRANSFORMER", "tiny_qwen_edit_plus"]

#: A tiny Qwen-Image transformer geometry (diffusers' `QwenImageTransformer2DModel` / ours): 4-channel
#: latents, 2 blocks of 2 heads x 16; tests override what they vary (``{**TINY_TRANSFORMER, "num_layers": 3}``).
TINY_TRANSFORMER = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=16,
    axes_dims_rope=(4, 6, 6),
)

QWEN_SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


def tiny_qwen_edit_plus():
    """A real diffusers `QwenImageEditPlusPipeline` of tiny random modules, built offline.

    Qwen2.5-VL's vocabulary cannot be downloaded here, so the tokenizer is byte-level BPE with no merges
    plus Qwen's special tokens at their real ids. transformers refuses to build a `Qwen2VLProcessor`
    without torchvision (for its video processor, which image prompts never use), so its class check is
    bypassed while constructing it.
    """
    from diffusers import AutoencoderKLQwenImage, QwenImageEditPlusPipeline, QwenImageTransformer2DModel
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2Tokenizer,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab.update(QWEN_SPECIAL_TOKENS)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    extra = [t for t in QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    check = Qwen2VLProcessor.check_argument_for_proper_class
    Qwen2VLProcessor.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer)
    finally:
        Qwen2VLProcessor.check_argument_for_proper_class = check

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**TINY_TRANSFORMER)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.0, 0.3],
        latents_std=[1.5, 2.0, 1.0, 0.5],
    )
    text = dict(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        rope_theta=1e6,
        vocab_size=151657,
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16,
        vocab_size=151657,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        vision_token_id=151654,
        image_token_id=151655,
    )
    pipe = QwenImageEditPlusPipeline(
        scheduler=qwenimage_scheduler(),
        vae=vae.eval(),
        text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(),
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
