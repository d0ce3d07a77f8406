"""``task: vae``: a diffusers `AutoencoderKL` trained on the synthetic world's images.

Loss: mean squared reconstruction error of the posterior's sample, plus ``kl_weight`` x the posterior's
KL to N(0, I) (mean per latent element). The export records the latents' mean and std as the config's
``shift_factor`` and ``scaling_factor`` (the pipeline normalizes latents with them), so the diffusion
model sees roughly unit-variance latents.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from uniref.training.seeding import generator_for

__all__ = ["VAEModel", "build_vae", "latent_stats", "vae_images", "vae_loss"]


def build_vae(vae_cfg, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    blocks = len(vae_cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(vae_cfg.block_out_channels),
        layers_per_block=vae_cfg.layers_per_block,
        latent_channels=vae_cfg.latent_channels,
        norm_num_groups=vae_cfg.norm_num_groups,
    )


class VAEModel(nn.Module):
    """What DeepSpeed trains for ``task: vae``: images in [-1, 1] -> (reconstruction MSE, KL)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        recon = self.vae.decode(z, return_dict=False)[0]
        mse = torch.nn.functional.mse_loss(recon.float(), x.float())
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        return mse, kl


def vae_images(dataset, start: int, count: int, size: int) -> tuple[Tensor, int]:
    """``count`` images from the stream at item ``start`` (each item's target, then its references resized
    to ``size``), as ``(count, 3, size, size)`` in [-1, 1]; returns them and the item cursor after them."""
    images, cursor = [], start
    while len(images) < count:
        item = dataset[cursor % len(dataset)]
        cursor += 1
        for img in [item["target"], *item["references"]]:
            pil = Image.fromarray(img.permute(1, 2, 0).numpy())
            if pil.size != (size, size):
                pil = pil.resize((size, size), Image.BILINEAR)
            images.append(torch.from_numpy(np.asarray(pil)).permute(2, 0, 1))
    x = torch.stack(images[:count]).float() / 127.5 - 1
    return x, cursor


def vae_loss(engine, x: Tensor, seed: int, step: int, position: int, kl_weight: float) -> tuple[Tensor, dict]:
    g = generator_for(seed, "vae", step, position, device=x.device)
    mse, kl = engine(x, g)
    return mse + kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}


@torch.no_grad()
def latent_stats(vae, x: Tensor) -> tuple[float, float]:
    """Mean and std of the posterior means of ``x`` (for the pipeline's latent normalization)."""
    z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean.float()
    return float(z.mean()), float(z.std())
