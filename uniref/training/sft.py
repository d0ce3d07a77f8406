"""Supervised fine-tuning: flow matching on the target tokens of packed SELF batches.

    x_t = (1 - t) x_0 + t eps,   loss = mean over target elements of (v_theta(x_t, t) - (eps - x_0))^2

with t logit-normal, then shifted exactly as the pipeline's scheduler shifts its sigmas for a sample of
that many target tokens (Qwen-Image's dynamic, resolution-dependent shift), so training spends its
timesteps where sampling will use them. Only the target slice of the sequence is predicted and scored.

With ``sft.change_weight = w > 0`` the mean is weighted: latent cells whose pixels differ from the first
reference's (where it has the target's size) weigh 1 + w, the rest 1. An edit changes a few percent of
the pixels, so an unweighted loss is mostly about copying the background.
"""

from __future__ import annotations

import torch
from torch import Tensor

from uniref.packing import pack_latents
from uniref.sampling import shift_time
from uniref.training.data import MicroBatch, encode_micro_batch
from uniref.training.modules import PromptBatch
from uniref.training.seeding import generator_for

__all__ = ["change_weights", "sft_loss"]

# A pixel has changed when a channel moves by more than this (of 255): above JPEG and resampling noise.
_CHANGE_THRESHOLD = 8


def change_weights(target: Tensor, first_reference: Tensor, latent_hw: tuple[int, int], weight: float) -> Tensor:
    """``(h, w)`` float32 loss weights of one sample's target latent: ``1 + weight`` on the cells (each
    the square of pixels the VAE maps to one latent position) where any pixel of the uint8 ``(3, H, W)``
    target differs from the first reference by more than `_CHANGE_THRESHOLD`; 1 everywhere when the
    reference's size differs from the target's (nothing to compare against)."""
    h, w = latent_hw
    if first_reference.shape != target.shape or weight == 0:
        return torch.ones(h, w)
    changed = (target.int() - first_reference.int()).abs().amax(0) > _CHANGE_THRESHOLD
    cells = torch.nn.functional.adaptive_max_pool2d(changed[None, None].float(), (h, w))[0, 0]
    return 1.0 + weight * cells


def sft_loss(engine, pipe, batch: MicroBatch, sft_cfg, seed: int, step: int) -> tuple[Tensor, dict]:
    """The flow-matching loss of one packed micro-batch (a graph through ``engine``'s parameters).

    Noise, timesteps and prompt dropout come from a generator keyed by (seed, step, micro-batch
    position), so the loss does not depend on the number of ranks or on where a run was resumed.
    """
    x0, refs = encode_micro_batch(pipe, batch)
    g = generator_for(seed, "sft", step, batch.position)
    n = len(batch.items)
    noise = [torch.randn(z.shape, generator=g, dtype=z.dtype).to(z.device) for z in x0]
    u = torch.randn(n, generator=g, dtype=torch.float64) * sft_cfg.logit_std + sft_cfg.logit_mean
    p = pipe.patch_size
    target_tokens = [(z.shape[1] // p) * (z.shape[2] // p) for z in x0]
    t = shift_time(torch.sigmoid(u), target_tokens, pipe.scheduler.config).clamp(1e-4, 1 - 1e-4)
    drop = torch.rand(n, generator=g) < sft_cfg.text_dropout
    prompts = ["" if d else it.prompt for d, it in zip(drop.tolist(), batch.items)]

    noisy = [(1 - ti) * z + ti * e for ti, z, e in zip(t.to(x0[0].dtype), x0, noise)]
    tokens, layout = pack_latents([[xt, *r] for xt, r in zip(noisy, refs)], patch_size=p)
    velocity = pack_latents([[e - z] for z, e in zip(x0, noise)], patch_size=p).tokens
    # encoded inside the forward: one call per micro-batch, with gradients when the text encoder trains
    pred = engine(tokens, t.to(tokens.device, torch.float32), layout, PromptBatch(prompts, [[] for _ in prompts]))
    err = (pred.float() - velocity.float()) ** 2
    if sft_cfg.change_weight > 0:
        maps = [
            # a sample without references (text to image) has nothing to compare against: weight 1
            change_weights(
                it.target, it.references[0] if it.references else it.target, tuple(z.shape[1:]), sft_cfg.change_weight
            ).expand_as(z)
            for it, z in zip(batch.items, x0)
        ]
        # packed like the velocity, so every element of err gets its own cell's weight
        w = pack_latents([[m.to(z)] for m, z in zip(maps, x0)], patch_size=p).tokens.float()
        loss = (w * err).sum() / w.sum()
    else:
        loss = err.mean()
    stats = {"tokens": batch.tokens, "samples": n, "t_mean": float(t.mean()), "target_tokens": sum(target_tokens)}
    return loss, stats
