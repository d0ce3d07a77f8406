"""Random-weight edit pipelines for tests and benchmarks: built locally from a seed, nothing downloaded.

Three geometries of the same architecture (`UniRefTransformer2DModel` + diffusers `AutoencoderKL` with 8x
downsampling + `ByteTextEncoder`, Qwen-Image's scheduler settings):

    tiny   tests: ~0.2M parameters in all, 64^2 outputs
    small  CPU benchmarks: 2.5M transformer parameters, 16-channel latents, 256^2 outputs
    mid    GPU benchmarks: 1.37B transformer parameters (16 blocks of width 1536, Qwen-Image's head dim
           128 and 16-channel latents), 1024^2 outputs
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

from uniref.models.transformer import UniRefTransformer2DModel
from uniref.pipelines.edit import UniRefEditPipeline
from uniref.pipelines.text_encoders import ByteTextEncoder

__all__ = ["CONFIGS", "qwenimage_scheduler", "random_edit_pipeline"]

CONFIGS = {
    "tiny": dict(
        transformer=dict(
            num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)
        ),
        latent_channels=4,
        vae_channels=(8, 8, 16, 16),
        text=dict(hidden_dim=32, num_layers=2, num_heads=2, max_length=256),
        target_pixels=64 * 64,
    ),
    "small": dict(
        transformer=dict(
            num_layers=4,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=64,
            axes_dims_rope=(8, 12, 12),
        ),
        latent_channels=16,
        vae_channels=(8, 8, 16, 16),
        text=dict(hidden_dim=64, num_layers=2, num_heads=2, max_length=256),
        target_pixels=256 * 256,
    ),
    "mid": dict(
        transformer=dict(
            num_layers=16,
            attention_head_dim=128,
            num_attention_heads=12,
            joint_attention_dim=512,
            axes_dims_rope=(16, 56, 56),
        ),
        latent_channels=16,
        vae_channels=(32, 64, 128, 128),
        text=dict(hidden_dim=512, num_layers=4, num_heads=8, max_length=512),
        target_pixels=1024 * 1024,
    ),
}


def qwenimage_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching scheduler configuration of Qwen-Image (dynamic, resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )


def random_edit_pipeline(
    size: str = "tiny", seed: int = 0, attention_backend: str = "auto", transformer_overrides: dict | None = None
) -> UniRefEditPipeline:
    """A `UniRefEditPipeline` with random weights (``size`` in `CONFIGS`), in eval mode on the CPU.

    ``transformer_overrides`` replace keys of the geometry's transformer config (e.g. ``num_layers``)."""
    if size not in CONFIGS:
        raise ValueError(f"size must be one of {tuple(CONFIGS)}, got {size!r}")
    cfg = CONFIGS[size]
    c = cfg["latent_channels"]
    torch.manual_seed(seed)
    transformer = UniRefTransformer2DModel(
        patch_size=2,
        in_channels=4 * c,
        out_channels=c,
        attention_backend=attention_backend,
        **{**cfg["transformer"], **(transformer_overrides or {})},
    )
    blocks = len(cfg["vae_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=cfg["vae_channels"],
        layers_per_block=1,
        latent_channels=c,
        norm_num_groups=8,
        scaling_factor=0.5,
        shift_factor=0.1,
    )
    text_encoder = ByteTextEncoder(
        embed_dim=cfg["transformer"]["joint_attention_dim"], attention_backend=attention_backend, **cfg["text"]
    )
    return UniRefEditPipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=qwenimage_scheduler(),
        text_encoder=text_encoder.eval(),
        target_pixels=cfg["target_pixels"],
    )
