"""`uniref.grpo` at the edges of its documented ranges: each case gives the float64 reference's value or is
refused with a message naming the argument."""

import math

import pytest
import torch

from uniref import group_advantages, sde_step_with_logprob
from uniref.testing.grpo import group_advantages_reference, sde_step_reference


@pytest.mark.parametrize("magnitude", [1e20, 1e30, 1e-30])
@pytest.mark.parametrize("aggregate", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_advantages_of_rewards_far_from_one_match_float64(magnitude, aggregate, eps):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, 2, generator=gen, dtype=torch.float64) * magnitude
    rewards[8:] = rewards[8]  # one constant group
    ids = torch.arange(12) // 4
    weights = torch.tensor([1.0, 0.5], dtype=torch.float64)
    got, stats = group_advantages(rewards.float(), ids, weights.float(), aggregate=aggregate, eps=eps)
    want, _ = group_advantages_reference(
        rewards.float().double(), ids, weights, aggregate == "normalize_then_sum", False, eps, 5.0
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert stats["zero_std_fraction"] == pytest.approx(1 / 3)
    if magnitude >= 1e20 or eps == 0:  # eps is negligible: the advantages of a non-constant group are +-O(1)
        assert got[:8].abs().max() > 0.5


def test_ordinary_rewards_are_not_rescaled():
    rewards = torch.tensor([0.1, 0.7, 0.3, 0.9])
    ids = torch.tensor([0, 0, 1, 1])
    got, _ = group_advantages(rewards, ids)
    from uniref import ops  # noqa: F401

    want, _ = torch.ops.uniref.group_advantages(rewards.reshape(4, 1), ids, torch.ones(1), False, False, 1e-4, 5.0)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "sigma, sigma_next, noise_level",
    [(1e-30, 0.0, 0.7), (0.5, 0.4, 1e-30), (1e-20, 5e-21, 1.0)],
)
def test_sde_steps_too_small_for_float32_are_refused(sigma, sigma_next, noise_level):
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"sde_step_with_logprob: sigma=.* give step_std .*, below 1.08e-19"):
        sde_step_with_logprob(x, v, sigma, sigma_next, noise_level)
    # the same step in float64 has a finite log-probability
    _, _, log_prob, _ = sde_step_with_logprob(x.double(), v.double(), sigma, sigma_next, noise_level)
    assert torch.isfinite(log_prob).all()


@pytest.mark.parametrize("sigma, sigma_next, noise_level", [(1e-6, 0.0, 0.7), (0.5, 0.4, 1e-12), (1.0, 0.9, 1e-9)])
def test_small_sde_steps_within_float32_match_float64(sigma, sigma_next, noise_level):
    # latents far below the step's std: fp32 then resolves x_next - mean (on unit latents a std of 1e-9 is
    # below x's rounding step, so x_next == mean in any fp32 computation)
    gen = torch.Generator().manual_seed(1)
    x, v, noise = (torch.randn(3, 2, 8, generator=gen) * scale for scale in (1e-20, 1e-20, 1.0))
    got = sde_step_with_logprob(x, v, sigma, sigma_next, noise_level, noise=noise)
    t = lambda value: torch.tensor(float(value), dtype=torch.float64)  # noqa: E731
    want = sde_step_reference(x.double(), v.double(), t(sigma), t(sigma_next), t(noise_level), "sde", noise.double())
    assert torch.isfinite(got[2]).all()
    torch.testing.assert_close(got[2].double(), want[2], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[3].double(), want[3], rtol=1e-5, atol=0)


def test_samples_without_elements_are_refused():
    with pytest.raises(ValueError, match=r"x_t has no elements per sample \(shape \(2, 0\)\)"):
        sde_step_with_logprob(torch.zeros(2, 0), torch.zeros(2, 0), 0.5, 0.4, 0.7)


@pytest.mark.parametrize("noise_level", [1.5, 2.0, 2.5, 4.5])
def test_cps_noise_levels_above_one_are_refused(noise_level):
    with pytest.raises(ValueError, match=r"kind='cps' needs 0 < noise_level <= 1"):
        sde_step_with_logprob(torch.randn(2, 4), torch.randn(2, 4), 0.5, 0.4, noise_level, kind="cps")


@pytest.mark.parametrize("noise_level", [0.5, 1.0])
def test_cps_std_is_nonnegative_and_matches_float64(noise_level):
    x, v, noise = torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)
    got = sde_step_with_logprob(x, v, 0.5, 0.4, noise_level, kind="cps", noise=noise)
    assert (got[3] >= 0).all() and got[3][0].item() == pytest.approx(0.4 * math.sin(noise_level * math.pi / 2))
    t = lambda value: torch.tensor(float(value), dtype=torch.float64)  # noqa: E731
    want = sde_step_reference(x.double(), v.double(), t(0.5), t(0.4), t(noise_level), "cps", noise.double())
    torch.testing.assert_close(got[2].double(), want[2], rtol=1e-5, atol=1e-6)
