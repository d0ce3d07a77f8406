"""The MSGRPO torch references (uniref/testing/grpo.py) and the SDE step, checked in float64
against second implementations written from scratch out of docs/flow_grpo.md: per-sample
Python/numpy math, numpy per-group loops (as Flow-GRPO's stat tracker), torch.distributions."""

import math

import numpy as np
import pytest
import torch

import uniref.grpo as grpo
from uniref.testing import grpo as ref
from uniref.testing.grpo import loss_inputs

F64 = torch.float64


# ---- SDE step ---------------------------------------------------------------------------------------


def sde_from_scratch(x, v, s, s_next, a, noise, kind):
    """One sample, numpy float64, straight from flow_grpo.md."""
    dt = s_next - s
    if kind == "sde":
        # "at s = 1 use the first sigma below 1 in the denominator": the next sigma here
        std_t = a * math.sqrt(s / (1 - (s_next if s == 1 else s)))
        mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        sigma_step = std_t * math.sqrt(-dt)
        x_next = mean + sigma_step * noise
        density = (
            -((x_next - mean) ** 2) / (2 * sigma_step**2) - math.log(sigma_step) - math.log(math.sqrt(2 * math.pi))
        )
        logp = np.mean(density)
    else:
        sigma_step = s_next * math.sin(a * math.pi / 2)
        x0_hat = x - s * v
        x1_hat = x + (1 - s) * v
        mean = (1 - s_next) * x0_hat + math.sqrt(s_next**2 - sigma_step**2) * x1_hat
        x_next = mean + sigma_step * noise
        logp = np.mean(-((x_next - mean) ** 2))
    return x_next, mean, logp, sigma_step


SIGMAS = {
    "first_step_sigma_1": ([1.0, 1.0, 1.0], [0.93, 0.93, 0.93]),
    "middle": ([0.61, 0.61, 0.61], [0.55, 0.55, 0.55]),
    "last_step_to_0": ([0.05, 0.05, 0.05], [0.0, 0.0, 0.0]),
    "per_sample": ([1.0, 0.7, 0.2], [0.9, 0.35, 0.0]),
}


@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("case", SIGMAS.values(), ids=SIGMAS.keys())
def test_sde_step_matches_from_scratch(case, kind):
    sig, sig_next = case
    if kind == "cps" and 0.0 in sig_next:
        sig_next = [max(s, 0.01) for s in sig_next]  # cps: step std s' sin(a pi/2) = 0 at s' = 0
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 4, 5, 3, generator=g, dtype=F64) for _ in range(3))
    a = 0.8
    per_sample = case is SIGMAS["per_sample"]
    sigma = torch.tensor(sig, dtype=F64) if per_sample else sig[0]
    sigma_next = torch.tensor(sig_next, dtype=F64) if per_sample else sig_next[0]
    out = grpo.sde_step_with_logprob(x, v, sigma, sigma_next, a, kind=kind, noise=noise)
    for i in range(3):
        xn, mean, logp, sstd = sde_from_scratch(
            x[i].numpy(), v[i].numpy(), sig[i], sig_next[i], a, noise[i].numpy(), kind
        )
        np.testing.assert_allclose(out[0][i].numpy(), xn, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out[1][i].numpy(), mean, rtol=1e-12, atol=1e-12)
        assert out[2][i].item() == pytest.approx(logp, rel=1e-12, abs=1e-12)
        assert out[3][i].item() == pytest.approx(sstd, rel=1e-12)


def test_sde_log_prob_is_the_mean_gaussian_log_density():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 7, 9, generator=g, dtype=F64), torch.randn(2, 7, 9, generator=g, dtype=F64)
    x_next, mean, logp, step_std = grpo.sde_step_with_logprob(x, v, 0.8, 0.7, 1.1, generator=g)
    dist = torch.distributions.Normal(mean, step_std[:, None, None])
    torch.testing.assert_close(logp, dist.log_prob(x_next).mean(dim=(1, 2)), rtol=1e-12, atol=1e-12)


def test_sde_small_noise_level_is_the_euler_step():
    x, v = torch.randn(2, 6, dtype=F64), torch.randn(2, 6, dtype=F64)
    _, mean, _, _ = grpo.sde_step_with_logprob(x, v, 0.5, 0.4, 1e-6)
    torch.testing.assert_close(mean, x + v * (0.4 - 0.5), rtol=0, atol=1e-10)


def test_sde_rescoring_a_stored_sample_reproduces_its_log_prob():
    x, v = torch.randn(3, 5, 4, dtype=torch.bfloat16), torch.randn(3, 5, 4, dtype=torch.bfloat16)
    x_next, mean, logp, step_std = grpo.sde_step_with_logprob(x, v, 0.9, 0.8, 0.7)
    assert x_next.dtype == mean.dtype == logp.dtype == step_std.dtype == torch.float32  # fp32 math
    again = grpo.sde_step_with_logprob(x, v, 0.9, 0.8, 0.7, prev_sample=x_next)
    assert torch.equal(again[0], x_next) and torch.equal(again[1], mean) and torch.equal(again[2], logp)


def test_sde_noise_from_generator_is_reproducible_and_gradients_reach_velocity():
    x = torch.randn(2, 8)
    v = torch.randn(2, 8, requires_grad=True)
    a = grpo.sde_step_with_logprob(x, v, 0.5, 0.45, 0.9, generator=torch.Generator().manual_seed(3))
    b = grpo.sde_step_with_logprob(x, v, 0.5, 0.45, 0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0])
    a[1].sum().backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()


BAD_SDE = {
    "sigma_above_1": (dict(sigma=1.2), ValueError, "sigma must be in"),
    "sigma_zero": (dict(sigma=0.0, sigma_next=0.0), ValueError, "sigma must be in"),
    "sigma_next_not_below": (dict(sigma=0.5, sigma_next=0.5), ValueError, "sigma_next"),
    "sigma_next_negative": (dict(sigma_next=-0.1), ValueError, "sigma_next"),
    "sigma_tensor_nan": (dict(sigma=torch.tensor([0.5, float("nan")])), ValueError, "sigma must be in"),
    "sigma_wrong_length": (dict(sigma=torch.tensor([0.5, 0.5, 0.5])), ValueError, "sigma must be"),
    "noise_level_zero": (dict(noise_level=0.0), ValueError, "noise_level"),
    "kind": (dict(kind="ode"), ValueError, "kind"),
    "velocity_shape": (dict(velocity=torch.randn(2, 5)), ValueError, "velocity has shape"),
    "x_t_int": (dict(x_t=torch.ones(2, 4, dtype=torch.int64)), TypeError, "x_t must be float"),
    "x_t_empty": (dict(x_t=torch.randn(0, 4), velocity=torch.randn(0, 4)), ValueError, "N >= 1"),
    "noise_shape": (dict(noise=torch.randn(2, 3)), ValueError, "noise has shape"),
    "noise_and_generator": (dict(noise=torch.randn(2, 4), generator=torch.Generator()), ValueError, "generator"),
    "prev_sample_and_noise": (dict(prev_sample=torch.randn(2, 4), noise=torch.randn(2, 4)), ValueError, "prev_sample"),
    "sigma_string": (dict(sigma="1"), TypeError, "sigma must be a number"),
}


@pytest.mark.parametrize("bad", BAD_SDE.values(), ids=BAD_SDE.keys())
def test_sde_step_rejects_bad_input(bad):
    override, exc, match = bad
    args = dict(x_t=torch.randn(2, 4), velocity=torch.randn(2, 4), sigma=0.5, sigma_next=0.4, noise_level=0.7)
    args.update(override)
    with pytest.raises(exc, match=match):
        grpo.sde_step_with_logprob(**args)


# ---- advantages -------------------------------------------------------------------------------------


def advantages_from_scratch(rewards, ids, weights, aggregate, std_mode, eps, clip):
    """numpy float64 loop over groups, as Flow-GRPO's per-prompt stat tracker (np.std: ddof = 0)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    quantities = rewards if aggregate == "normalize_then_sum" else (rewards * weights).sum(1, keepdims=True)
    out = np.zeros_like(quantities)
    for key in np.unique(ids):
        rows = ids == key
        for k in range(quantities.shape[1]):
            q = quantities[rows, k]
            if np.all(q == q[0]):
                continue  # all equal: 0
            std = np.std(q) if std_mode == "group" else np.std(quantities[:, k])
            out[rows, k] = (q - q.mean()) / (std + eps)
    adv = (out * weights).sum(1) if aggregate == "normalize_then_sum" else out[:, 0]
    return np.clip(adv, -clip, clip)


@pytest.mark.parametrize("aggregate", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("std", ["group", "batch"])
@pytest.mark.parametrize("sources", [1, 3])
def test_advantages_reference_matches_from_scratch(aggregate, std, sources):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 6, size=29) * 11 - 7  # arbitrary keys, uneven groups
    rewards = rng.normal(size=(29, sources))
    rewards[ids == ids[0]] = 0.25  # one all-equal group
    rewards[3] = [50.0] * sources  # an outlier that clipping catches
    weights = rng.uniform(-1, 2, size=sources)
    adv, constant = ref.group_advantages_reference(
        torch.tensor(rewards), torch.tensor(ids), torch.tensor(weights), aggregate == "normalize_then_sum",
        std == "batch", 1e-4, 2.5,
    )  # fmt: skip
    expected = advantages_from_scratch(rewards, ids, weights, aggregate, std, 1e-4, 2.5)
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert constant[ids == ids[0]].all()
    assert (adv[torch.tensor(ids == ids[0])] == 0).all()


# ---- loss -------------------------------------------------------------------------------------------


def loss_from_scratch(x_next, mean, old, adv, std, clip_range, mean_ref, beta, gaussian):
    n = x_next.shape[0]
    terms, kls = [], []
    for i in range(n):
        d2 = (x_next[i] - mean[i]) ** 2
        if gaussian:
            logp = np.mean(-d2 / (2 * std[i] ** 2) - np.log(std[i]) - np.log(np.sqrt(2 * np.pi)))
        else:
            logp = np.mean(-d2)
        ratio = np.exp(logp - old[i])
        terms.append(max(-adv[i] * ratio, -adv[i] * min(max(ratio, 1 - clip_range), 1 + clip_range)))
        kls.append(np.mean((mean[i] - mean_ref[i]) ** 2) / (2 * std[i] ** 2) if mean_ref is not None else 0.0)
    return np.mean(terms) + beta * np.mean(kls)


@pytest.mark.parametrize("gaussian", [True, False], ids=["sde", "cps"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_loss_reference_matches_from_scratch(gaussian, beta):
    x_next, mean, old, adv, std, mean_ref = loss_inputs()
    loss, stats = ref.flow_grpo_loss_reference(x_next, mean, old, adv, std, 1e-4, mean_ref, beta, None, gaussian)
    arrays = (t.numpy() for t in (x_next, mean, old, adv, std))
    expected = loss_from_scratch(*arrays, 1e-4, mean_ref.numpy(), beta, gaussian)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)
    ratio = stats["ratio"]
    assert stats["clip_fraction"].item() == pytest.approx(((ratio - 1).abs() > 1e-4).double().mean().item())


@pytest.mark.parametrize("gaussian", [True, False], ids=["sde", "cps"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
@pytest.mark.parametrize("clip_regime", ["inside", "outside", "mixed"])
def test_hand_derived_gradient_matches_autograd(gaussian, beta, clip_regime):
    x_next, mean, old, adv, std, mean_ref = loss_inputs(clip_regime=clip_regime)
    kl_std = std * 1.7
    mean = mean.clone().requires_grad_()
    loss, stats = ref.flow_grpo_loss_reference(x_next, mean, old, adv, std, 1e-4, mean_ref, beta, kl_std, gaussian)
    (auto,) = torch.autograd.grad(loss * 0.7, mean)
    coef = ref.flow_grpo_loss_grad_coef(stats["ratio"], adv, std, kl_std, 1e-4, beta, mean[0].numel(), gaussian, True)
    manual = ref.flow_grpo_loss_backward_reference(torch.tensor(0.7, dtype=F64), x_next, mean.detach(), mean_ref, coef)
    torch.testing.assert_close(manual, auto, rtol=1e-10, atol=1e-15)
    if clip_regime == "outside":  # the clipped side of PPO's max has no gradient for half the samples
        assert (coef[:, 0] == 0).any()
