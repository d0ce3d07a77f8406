"""Supervised fine-tuning: flow matching on the target tokens of packed SELF batches.

    x_t = (1 - t) x_0 + t eps,   loss = mean over target elements of (v_theta(x_t, t) - (eps - x_0))^2

with t logit-normal, then shifted exactly as the pipeline's scheduler shifts its sigmas for a sample of
that many target tokens (Qwen-Image's dynamic, resolution-dependent shift), so training spends its
timesteps where sampling will use them. Only the target slice of the sequence is predicted and scored.
"""

from __future__ import annotations

import torch
from torch import Tensor

from uniref.self import pack_latents
from uniref.training.data import MicroBatch, encode_micro_batch
from uniref.training.seeding import generator_for

__all__ = ["scheduler_shift", "sft_loss"]


def scheduler_shift(t: Tensor, target_tokens: list[int], scheduler_config) -> Tensor:
    """``t`` (N,) in (0, 1) mapped by the scheduler's shift for each sample's target token count."""
    from uniref.pipelines.edit import calculate_shift

    cfg = scheduler_config
    if cfg.get("use_dynamic_shifting", False):
        mu = torch.tensor([
            calculate_shift(n, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                            cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
            for n in target_tokens
        ], dtype=t.dtype)
        if cfg.get("time_shift_type", "exponential") == "exponential":
            return mu.exp() / (mu.exp() + (1 / t - 1))
        return mu / (mu + (1 / t - 1))
    s = float(cfg.get("shift", 1.0))
    return s * t / (1 + (s - 1) * t)


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
    t = scheduler_shift(torch.sigmoid(u), target_tokens, pipe.scheduler.config).clamp(1e-4, 1 - 1e-4)
    drop = torch.rand(n, generator=g) < sft_cfg.text_dropout
    prompts = ["" if d else it.prompt for d, it in zip(drop.tolist(), batch.items)]

    noisy = [(1 - ti) * z + ti * e for ti, z, e in zip(t.to(x0[0].dtype), x0, noise)]
    packed = pack_latents([[xt, *r] for xt, r in zip(noisy, refs)], patch_size=p)
    velocity = pack_latents([[e - z] for z, e in zip(x0, noise)], patch_size=p).tokens
    pred = engine(packed, prompts, t.to(packed.tokens.device, torch.float32), packed.tokens)
    loss = torch.nn.functional.mse_loss(pred.float(), velocity.float())
    stats = {"tokens": batch.tokens, "samples": n, "t_mean": float(t.mean()), "target_tokens": sum(target_tokens)}
    return loss, stats
