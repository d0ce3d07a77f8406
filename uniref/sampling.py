"""Sampling: the flow-matching schedule, guidance, the batch being sampled and ONE denoising loop.

Inference (`UniRefEditPipeline`) runs `denoise` with Euler steps; MSGRPO runs the same loop with the
SDE step (`sde_step_with_logprob`) inside its training window and records each step's log-probability
through the step function. SFT draws its training times through the same shift (`shift_time`).

Shapes: a sampling *state* is every sample's target tokens packed without padding, ``(T_target, F)``
with ``F = C * p * p``, laid out by ``batch.targets``. The model sees every sample's
``[target ; references]``, repeated ``copies`` times for classifier-free guidance (conditional rows,
then unconditional ones); the references' tokens never change and are packed once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from uniref.grpo import sde_step_with_logprob
from uniref.packing import SequenceLayout, concat_joint, pack_latents

__all__ = [
    "ModelFn",
    "SamplingBatch",
    "Schedule",
    "StepFn",
    "calculate_shift",
    "denoise",
    "euler_step",
    "guided_velocity",
    "make_schedule",
    "sde_step_with_logprob",
    "shift_time",
]

# model_fn(hidden_states (T, F), timestep (rows,), layout) -> velocity of every row's target (T_target * copies, F)
ModelFn = Callable[[Tensor, Tensor, SequenceLayout], Tensor]


# --------------------------------------------------------------------------------------------
# Time shift and schedules
# --------------------------------------------------------------------------------------------


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Qwen-Image's dynamic shift ``mu``: linear in the target's token count.

    The same function as diffusers' Qwen-Image pipelines; theirs lives in modules that import
    transformers, which the default (non-Qwen) path does not need.
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _mu(scheduler_config, target_tokens: int) -> float:
    cfg = scheduler_config
    return calculate_shift(
        target_tokens,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )


def shift_time(t: Tensor, target_tokens: Sequence[int], scheduler_config) -> Tensor:
    """``t`` ``(N,)`` in (0, 1) mapped by the scheduler's shift for each sample's target token count: the
    same map the scheduler applies to its sigmas, so training draws times where sampling uses them.

    Dynamic shifting (Qwen-Image): ``e^mu / (e^mu + 1/t - 1)`` (``"exponential"``) or ``mu / (mu + 1/t - 1)``
    (``"linear"``), ``mu`` from `calculate_shift`; static: ``s t / (1 + (s - 1) t)`` with ``shift = s``.
    """
    cfg = scheduler_config
    if cfg.get("use_dynamic_shifting", False):
        mu = torch.tensor([_mu(cfg, n) for n in target_tokens], dtype=t.dtype)
        if cfg.get("time_shift_type", "exponential") == "exponential":
            return mu.exp() / (mu.exp() + (1 / t - 1))
        return mu / (mu + (1 / t - 1))
    s = float(cfg.get("shift", 1.0))
    return s * t / (1 + (s - 1) * t)


@dataclass(frozen=True)
class Schedule:
    """Per-sample flow-matching schedules of one sampling run.

    Attributes:
        sigmas: float32 ``(N, steps + 1)``: sample i goes from ``sigmas[i, 0]`` (pure noise) to
            ``sigmas[i, -1]`` (0, clean), each sample with its own dynamic shift.
        timesteps: float32 ``(N, steps)``: the model's time input at each step, the scheduler's
            timestep divided by its ``num_train_timesteps`` (in [0, 1]).
    """

    sigmas: Tensor
    timesteps: Tensor

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[1]


def make_schedule(scheduler, target_tokens: Sequence[int], num_steps: int, device) -> Schedule:
    """The `Schedule` of a diffusers flow-matching ``scheduler`` for samples of ``target_tokens`` tokens:
    sigmas ``linspace(1, 1 / num_steps, num_steps)`` shifted per sample with Qwen-Image's ``mu``.

    Raises:
        ValueError: the scheduler has no finite schedule with this many steps.
    """
    cfg = scheduler.config
    base = np.linspace(1.0, 1 / num_steps, num_steps)
    sigmas, timesteps = [], []
    for n in target_tokens:
        s = scheduler.__class__.from_config(cfg)
        with np.errstate(divide="ignore", invalid="ignore"):  # a degenerate schedule is reported below
            s.set_timesteps(sigmas=base, device=device, mu=_mu(cfg, n))
        if not torch.isfinite(s.sigmas).all():
            # e.g. shift_terminal (Qwen-Image: 0.02) stretches the schedule by its last step: one step
            # alone leaves nothing to stretch and diffusers returns NaN sigmas
            raise ValueError(
                f"num_inference_steps={num_steps} gives no valid schedule for this scheduler "
                f"(shift_terminal={cfg.get('shift_terminal')}); use more steps"
            )
        sigmas.append(s.sigmas.float())
        # t / num_train in float32, cast by the caller: in bfloat16, t itself (~1000) would round to a multiple of 4
        timesteps.append(s.timesteps.float() / cfg.num_train_timesteps)
    return Schedule(torch.stack(sigmas).to(device), torch.stack(timesteps).to(device))


# --------------------------------------------------------------------------------------------
# Guidance and the batch being sampled
# --------------------------------------------------------------------------------------------


def guided_velocity(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance as Qwen-Image-Edit-Plus: the combination rescaled, per token, to the
    conditional prediction's norm."""
    comb = uncond + scale * (cond - uncond)
    return comb * (cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))


@dataclass(frozen=True)
class SamplingBatch:
    """The packed model batch of a sampling loop, built once: every sample's ``[target ; references]``,
    repeated ``copies`` times (2 with guidance: conditional rows, then unconditional).

    Attributes:
        layout: the model's `SequenceLayout` (all copies); only the target tokens change from step to step.
        targets: the layout of the sampling state (the targets alone, one copy).
        reference_tokens: ``(T_ref * copies, F)`` every copy's references, packed once.
        copies: 1, or 2 with classifier-free guidance.
    """

    layout: SequenceLayout
    targets: SequenceLayout
    reference_tokens: Tensor
    copies: int

    @classmethod
    def build(
        cls,
        target_sizes: Sequence[tuple[int, int]],
        ref_latents: Sequence[Sequence[Tensor]],
        copies: int,
        patch_size: int,
        channels: int,
        device=None,
        dtype=None,
    ) -> "SamplingBatch":
        """``target_sizes``: each sample's target latent ``(h, w)``; ``ref_latents``: each sample's references
        ``(C, h, w)`` (a sample may have none); ``copies``: 1 or 2 (guidance)."""
        if len(target_sizes) != len(ref_latents):
            raise ValueError(f"{len(target_sizes)} target sizes for {len(ref_latents)} samples' references")
        sizes = [
            [tuple(hw), *((int(r.shape[1]), int(r.shape[2])) for r in refs)]
            for hw, refs in zip(target_sizes, ref_latents)
        ]
        with_refs = [list(refs) for refs in ref_latents if len(refs)]
        if with_refs:
            # samples without references hold no rows, so packing the others alone gives the same stream
            tokens = pack_latents(with_refs * copies, patch_size=patch_size).tokens
            device, dtype = tokens.device, tokens.dtype
        else:
            tokens = torch.zeros(0, channels * patch_size**2, device=device, dtype=dtype)
        layout = SequenceLayout.from_image_sizes(sizes * copies, channels, patch_size, tokens.device)
        targets = SequenceLayout.from_image_sizes([s[:1] for s in sizes], channels, patch_size, tokens.device)
        return cls(layout, targets, tokens, copies)

    def hidden_states(self, state: Tensor) -> Tensor:
        """The model's image stream ``(T, F)`` with ``state`` ``(T_target, F)`` as every copy's targets."""
        state = state.to(self.reference_tokens.dtype)
        return concat_joint(
            state.repeat(self.copies, 1), self.layout.cu_targets, self.reference_tokens, self.layout.cu_references
        )[0]

    def velocity(self, model_fn: ModelFn, state: Tensor, timestep: Tensor, guidance_scale: float = 1.0) -> Tensor:
        """One (guided) prediction ``(T_target, F)`` for ``state`` at per-sample model time ``timestep`` ``(N,)``."""
        pred = model_fn(self.hidden_states(state), timestep.repeat(self.copies), self.layout)
        if self.copies == 2:
            cond, uncond = pred.chunk(2)
            pred = guided_velocity(cond, uncond, guidance_scale)
        return pred


# --------------------------------------------------------------------------------------------
# Steps and the loop
# --------------------------------------------------------------------------------------------

# step_fn(k, state (T_target, F), velocity (T_target, F), schedule, targets layout) -> next state
StepFn = Callable[[int, Tensor, Tensor, Schedule, SequenceLayout], Tensor]


def euler_step(k: int, state: Tensor, velocity: Tensor, schedule: Schedule, targets: SequenceLayout) -> Tensor:
    """The deterministic (ODE) step ``x + (sigma_{k+1} - sigma_k) v`` of every sample, in ``state``'s dtype.

    Computed per sample exactly as diffusers' ``FlowMatchEulerDiscreteScheduler.step``: the state in
    float32, the step size a 0-dim float32 tensor times the velocity in its own dtype.
    """
    dt = schedule.sigmas[:, k + 1] - schedule.sigmas[:, k]
    out = [state[rows].float() + dt[i] * velocity[rows] for i, rows in enumerate(targets.target_slices())]
    return torch.cat(out).to(state.dtype)


def denoise(
    model_fn: ModelFn,
    batch: SamplingBatch,
    schedule: Schedule,
    state: Tensor,
    guidance_scale: float = 1.0,
    step_fn: StepFn = euler_step,
    callback: Callable[[int, Tensor], None] | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Runs every step of ``schedule`` on ``state`` ``(T_target, F)`` (the initial noise) and returns the
    final state: at step k, one (guided) packed forward for all samples, then ``step_fn``.

    ``dtype``: the model's time input dtype (default: the state's). ``callback(k, new_state)`` runs after
    every step (progress bars, keeping the trajectory).
    """
    dtype = dtype or state.dtype
    for k in range(schedule.num_steps):
        v = batch.velocity(model_fn, state, schedule.timesteps[:, k].to(dtype), guidance_scale)
        state = step_fn(k, state, v, schedule, batch.targets)
        if callback is not None:
            callback(k, state)
    return state
