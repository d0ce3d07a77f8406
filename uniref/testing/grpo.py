"""Plain-torch references for the MSGRPO (Flow-GRPO) math, shared by the CPU ops, the tests and the
benchmarks. They follow `docs/flow_grpo.md` line by line and favour clarity over speed.

Every function computes in float32 (float64 when an input is float64, so the tests can run them as an
exact-ish oracle) whatever the input dtypes; bf16/fp16 inputs are upcast first, as Flow-GRPO does.
No argument checking here: the public functions in `uniref.grpo` validate their inputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: log(sqrt(2 pi)), the Gaussian log-density's constant.
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any given tensor is float64, else float32: the dtype all of the GRPO math runs in."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_sample(value: Tensor, ndim: int) -> Tensor:
    """(N,) or () -> broadcastable against an (N, ...) tensor with `ndim` dims."""
    return value.reshape(-1, *([1] * (ndim - 1))) if value.dim() else value


# ---- SDE step ---------------------------------------------------------------------------------------


def sde_step_reference(
    x_t: Tensor,
    velocity: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise_level: Tensor,
    kind: str = "sde",
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One stochastic flow-matching step from sigma to sigma_next and the log-probability of its result.

    Args:
        x_t, velocity: (N, ...) the current latents and the model's velocity prediction (v ~ eps - x_0).
        sigma, sigma_next: () or (N,) float tensors with 0 < sigma <= 1 and 0 <= sigma_next < sigma.
        noise_level: () or (N,) the noise level a > 0.
        kind: "sde" (Flow-GRPO's SDE) or "cps" (coefficients-preserving sampling).
        noise: (N, ...) standard normal noise; used unless `prev_sample` is given.
        prev_sample: (N, ...) used as x_next instead of sampling (re-scoring a stored rollout).

    Returns:
        x_next, mean: (N, ...) in the compute dtype; log_prob (N,): the MEAN over all non-batch elements
        of the per-element log-density; step_std (N,): the std of the step's Gaussian.
    """
    dtype = compute_dtype(x_t, velocity, sigma, sigma_next, noise_level)
    x = x_t.to(dtype)
    v = velocity.to(dtype)
    n = x.shape[0]
    s, s_next, a = (_per_sample(t.to(dtype).expand(n), x.dim()) for t in (sigma, sigma_next, noise_level))
    if kind == "sde":
        dt = s_next - s
        # At s = 1, s / (1 - s) is infinite: Flow-GRPO uses the first sigma below 1 (the next one) in
        # the denominator instead.
        std_t = a * torch.sqrt(s / (1 - torch.where(s == 1, s_next, s)))
        mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        step_std = std_t * torch.sqrt(-dt)
    elif kind == "cps":
        step_std = s_next * torch.sin(a * math.pi / 2)
        x0_hat = x - s * v
        x1_hat = x + (1 - s) * v
        mean = (1 - s_next) * x0_hat + torch.sqrt(s_next**2 - step_std**2) * x1_hat
    else:
        raise ValueError(f"kind must be 'sde' or 'cps', got {kind!r}")
    x_next = mean + step_std * noise.to(dtype) if prev_sample is None else prev_sample.to(dtype)
    step_std = step_std.reshape(n)
    log_prob = log_prob_reference(x_next.detach(), mean, step_std, gaussian=(kind == "sde"))
    return x_next, mean, log_prob, step_std


def log_prob_reference(x_next: Tensor, mean: Tensor, step_std: Tensor, gaussian: bool = True) -> Tensor:
    """Per-sample log-probability of x_next under N(mean, step_std^2), MEAN over the non-batch elements.

    gaussian=True: mean(-(x - mean)^2 / (2 std^2) - log(std) - log(sqrt(2 pi))) (Flow-GRPO "sde"),
    evaluated as -mean((x - mean)^2) / (2 std^2) - log(std) - log(sqrt(2 pi)) (std is constant within a
    sample; tests check it against the per-element form); gaussian=False: -mean((x - mean)^2) (Flow-GRPO
    "cps", constants dropped). Inputs (N, ...) and (N,); returns (N,) in the compute dtype.
    """
    dtype = compute_dtype(x_next, mean, step_std)
    diff = x_next.to(dtype) - mean.to(dtype)
    mean_sq = diff.square().reshape(diff.shape[0], -1).mean(dim=1)
    if not gaussian:
        return -mean_sq
    std = step_std.to(dtype)
    return -mean_sq / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI


# ---- advantages -------------------------------------------------------------------------------------


def group_advantages_reference(
    rewards: Tensor,
    group_ids: Tensor,
    weights: Tensor,
    normalize_first: bool,
    batch_std: bool,
    eps: float,
    clip: float,
) -> tuple[Tensor, Tensor]:
    """Group-normalized advantages over several reward sources (the `uniref::group_advantages` op).

    Args:
        rewards: (N, S) rewards of S sources, any real dtype.
        group_ids: (N,) integer keys; rows with the same key form a group.
        weights: (S,) source weights.
        normalize_first: True = "normalize_then_sum" (normalize each source within its group, then take
            the weighted sum); False = "sum_then_normalize" (weighted sum, then normalize).
        batch_std: divide by the whole batch's std (per normalized quantity) instead of the group's.
        eps: added to the std.
        clip: the result is clipped to [-clip, clip].

    Returns:
        advantages (N,) in the compute dtype, and constant (N, K) bool with K = S if normalize_first
        else 1: row i's group holds a single value of quantity k, so that quantity contributes exactly 0.
        Stds are population stds (ddof = 0, as Flow-GRPO's numpy).
    """
    dtype = compute_dtype(rewards, weights)
    r = rewards.to(dtype)
    w = weights.to(dtype)
    values = r if normalize_first else (r * w).sum(dim=1, keepdim=True)  # (N, K)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    num_groups, k = counts.numel(), values.shape[1]
    index = inverse[:, None].expand(-1, k)
    group_sum = values.new_zeros(num_groups, k).scatter_add_(0, index, values)
    group_mean = group_sum / counts[:, None].to(dtype)
    centered = values - group_mean[inverse]
    if batch_std:
        std = values.std(dim=0, correction=0, keepdim=True)
    else:
        group_ssd = values.new_zeros(num_groups, k).scatter_add_(0, index, centered**2)
        std = torch.sqrt(group_ssd / counts[:, None].to(dtype))[inverse]
    # Exact detection of one-valued groups: the fp mean of k equal values need not equal them, so
    # `centered` alone would leave ~1e-8 / (std + eps) residues instead of the promised 0.
    group_min = values.new_full((num_groups, k), math.inf).scatter_reduce_(0, index, values, "amin")
    group_max = values.new_full((num_groups, k), -math.inf).scatter_reduce_(0, index, values, "amax")
    constant = (group_min == group_max)[inverse]
    normalized = torch.where(constant, torch.zeros_like(centered), centered / (std + eps))
    advantages = (normalized * w).sum(dim=1) if normalize_first else normalized[:, 0]
    return advantages.clamp(-clip, clip), constant


# ---- loss ---------------------------------------------------------------------------------------------


def flow_grpo_loss_reference(
    x_next: Tensor,
    mean: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    step_std: Tensor,
    clip_range: float,
    mean_ref: Tensor | None = None,
    beta: float = 0.0,
    kl_std: Tensor | None = None,
    gaussian: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The Flow-GRPO loss, differentiable in `mean` through ordinary torch autograd.

    loss = mean_n max(-A_n r_n, -A_n clip(r_n, 1 - clip_range, 1 + clip_range)) + beta * mean_n kl_n,
    r_n = exp(log_prob_n - old_log_prob_n), kl_n = mean((mean_n - mean_ref_n)^2) / (2 kl_std_n^2).

    Shapes: x_next, mean, mean_ref (N, ...); old_log_prob, advantages, step_std, kl_std (N,).
    Returns (loss (), stats) with stats = log_prob, ratio, kl (N,) and clip_fraction () (the share of
    samples with |ratio - 1| > clip_range), all in the compute dtype.
    """
    dtype = compute_dtype(x_next, mean, mean_ref, old_log_prob, advantages, step_std, kl_std)
    kl_std = step_std if kl_std is None else kl_std
    log_prob = log_prob_reference(x_next.detach(), mean, step_std.to(dtype), gaussian)
    ratio = torch.exp(log_prob - old_log_prob.to(dtype))
    a = advantages.to(dtype)
    unclipped = -a * ratio
    clipped = -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped)
    if mean_ref is None:
        kl = torch.zeros_like(log_prob)
    else:
        diff2 = (mean.to(dtype) - mean_ref.to(dtype)) ** 2
        kl = diff2.reshape(diff2.shape[0], -1).mean(dim=1) / (2 * kl_std.to(dtype) ** 2)
    loss = policy_loss.mean() + beta * kl.mean()
    stats = {
        "log_prob": log_prob.detach(),
        "ratio": ratio.detach(),
        "kl": kl.detach(),
        "clip_fraction": ((ratio.detach() - 1).abs() > clip_range).to(dtype).mean(),
    }
    return loss, stats


def flow_grpo_loss_grad_coef(
    ratio: Tensor,
    advantages: Tensor,
    step_std: Tensor,
    kl_std: Tensor,
    clip_range: float,
    beta: float,
    numel: int,
    gaussian: bool,
    has_ref: bool,
) -> Tensor:
    """Per-sample coefficients of d loss / d mean (derived by hand, checked against autograd in tests).

    With D = numel elements per sample and N samples, d loss / d mean_n equals
    coef[n, 0] * (x_next_n - mean_n) + coef[n, 1] * (mean_n - mean_ref_n), where
      coef[n, 0] = g_n * ratio_n * dlogp_n / N,   dlogp_n = 1 / (step_std_n^2 D) ("sde") or 2 / D ("cps"),
      g_n = -A_n unless the clipped term is the strictly larger one (then 0; torch.maximum splits ties,
            and a tie means the ratio is inside the clip range or A = 0, so this matches autograd),
      coef[n, 1] = beta / (N D kl_std_n^2)  (0 without a reference policy).
    Returns (N, 2) in the dtype of `ratio`.
    """
    dtype = ratio.dtype
    n = ratio.shape[0]
    a = advantages.to(dtype)
    unclipped = -a * ratio
    clipped = -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    dlogp = 1.0 / (step_std.to(dtype) ** 2 * numel) if gaussian else torch.full_like(ratio, 2.0 / numel)
    # `unclipped < clipped` is False for NaN, so an invalid sample's NaN reaches the gradient too.
    coef_pg = torch.where(unclipped < clipped, torch.zeros_like(ratio), -a * ratio * dlogp / n)
    coef_kl = beta / (n * numel * kl_std.to(dtype) ** 2) if has_ref else torch.zeros_like(ratio)
    return torch.stack([coef_pg, coef_kl], dim=1)


def flow_grpo_loss_backward_reference(
    grad_loss: Tensor, x_next: Tensor, mean: Tensor, mean_ref: Tensor | None, grad_coef: Tensor
) -> Tensor:
    """d loss / d mean from the per-sample coefficients of `flow_grpo_loss_grad_coef`; like `mean`."""
    dtype = grad_coef.dtype
    c = grad_coef * grad_loss.to(dtype)
    # One output buffer updated in place: this is the CPU op's backward, never differentiated itself.
    grad = torch.sub(x_next.to(dtype), mean.to(dtype)).mul_(_per_sample(c[:, 0], mean.dim()))
    if mean_ref is not None:
        grad.addcmul_(torch.sub(mean.to(dtype), mean_ref.to(dtype)), _per_sample(c[:, 1], mean.dim()))
    return grad.to(mean.dtype).contiguous()


def loss_inputs(n=5, shape=(3, 7), dtype=torch.float64, clip_regime="mixed", seed=0, latent_dtype=torch.float64):
    """Inputs of `flow_grpo_loss` for tests and benchmarks, ``[x_next, mean, old_log_prob, advantages,
    step_std, mean_ref]`` in ``dtype``: ``n`` samples of ``shape``, whose ratios sit clearly inside or outside
    the clip range (``clip_regime``: "inside", "outside" or "mixed"; never on its edge), with the latents
    representable in ``latent_dtype`` (so the old log-probs are exact for them too)."""
    g = torch.Generator().manual_seed(seed)

    def latent(t):
        return t.to(latent_dtype).to(torch.float64)

    x_next = latent(torch.randn(n, *shape, generator=g, dtype=torch.float64))
    mean = latent(x_next + 0.3 * torch.randn(n, *shape, generator=g, dtype=torch.float64))
    mean_ref = latent(mean + 0.05 * torch.randn(n, *shape, generator=g, dtype=torch.float64))
    step_std = 0.2 + torch.rand(n, generator=g, dtype=torch.float64)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    logp = log_prob_reference(x_next, mean, step_std)
    shift = {"inside": 2e-5, "outside": 3e-3, "mixed": None}[clip_regime]
    if shift is None:
        offsets = torch.tensor([(-1) ** i * (2e-5 if i % 2 else 3e-3) for i in range(n)], dtype=torch.float64)
    else:
        offsets = torch.tensor([(-1) ** i * shift for i in range(n)], dtype=torch.float64)
    old = logp + offsets
    return [t.to(dtype) for t in (x_next, mean, old, adv, step_std, mean_ref)]
