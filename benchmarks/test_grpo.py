"""MSGRPO on CPU: our ops vs their peers, measured in the same run.

* flow_grpo_loss forward + backward, 24 samples x 1024 tokens x 64 channels, fp32, with the KL term:
  ours (the registered op: reference forward, hand-derived one-pass backward) vs the plain-torch
  reference differentiated by autograd, eager and under torch.compile (inductor).
* group_advantages, 384 samples (16 prompts x 24) x 3 reward sources: ours vs the torch reference and
  vs Flow-GRPO's way (a numpy loop over prompts).

The GPU comparison (Triton kernels, 4096 tokens) is benchmarks/gpu/grpo.py. Each test also stores the
peers' median / ours in extra_info["speedup_vs"] once every entry of its group has run.
"""

import numpy as np
import pytest
import torch

import uniref.grpo as grpo
from uniref.testing.grpo import flow_grpo_loss_reference, group_advantages_reference

from ratios import record

N, TOKENS, CHANNELS = 24, 1024, 64


def loss_batch(n=N, tokens=TOKENS, channels=CHANNELS, dtype=torch.float32, device="cpu", seed=0):
    """A realistic trained timestep: x_next = mean + std * noise, old log-probs a little off the new ones."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, tokens, channels, generator=g)
    step_std = 0.2 + 0.1 * torch.rand(n, generator=g)
    x_next = mean + step_std[:, None, None] * torch.randn(n, tokens, channels, generator=g)
    mean_ref = mean + 1e-3 * torch.randn(n, tokens, channels, generator=g)
    old_log_prob = -((x_next - mean) ** 2).mean(dim=(1, 2)) / (2 * step_std**2) - step_std.log() - 0.9189385332046727
    old_log_prob += 2e-4 * torch.randn(n, generator=g)  # some ratios outside the 1e-4 clip range
    advantages = torch.randn(n, generator=g)
    to = dict(device=device)
    return dict(
        x_next=x_next.to(dtype=dtype, **to), mean=mean.to(dtype=dtype, **to), mean_ref=mean_ref.to(dtype=dtype, **to),
        old_log_prob=old_log_prob.to(**to), advantages=advantages.to(**to), step_std=step_std.to(**to),
    )  # fmt: skip


def loss_uniref(b, mean):
    loss, _ = grpo.flow_grpo_loss(
        b["x_next"], mean, b["old_log_prob"], b["advantages"], b["step_std"], 1e-4, b["mean_ref"], 0.04
    )
    loss.backward()
    return loss


def _reference_loss(b, mean):
    loss, _ = flow_grpo_loss_reference(
        b["x_next"], mean, b["old_log_prob"], b["advantages"], b["step_std"], 1e-4, b["mean_ref"], 0.04
    )
    return loss


def loss_torch_eager(b, mean):
    loss = _reference_loss(b, mean)
    loss.backward()
    return loss


_compiled_reference = torch.compile(_reference_loss)


def loss_torch_compile(b, mean):
    loss = _compiled_reference(b, mean)
    loss.backward()
    return loss


LOSS_IMPLS = {"torch_eager": loss_torch_eager, "torch_compile": loss_torch_compile, "uniref": loss_uniref}


@pytest.fixture(scope="module")
def batch():
    return loss_batch()


@pytest.mark.benchmark(group="flow_grpo_loss fwd+bwd 24x1024x64 fp32 +KL (CPU)")
@pytest.mark.parametrize("impl", list(LOSS_IMPLS))  # ours last: its ratios need the peers' medians
def test_flow_grpo_loss(benchmark, batch, impl):
    fn = LOSS_IMPLS[impl]
    mean = batch["mean"].clone().requires_grad_()
    loss = fn(batch, mean)  # also the warm-up (torch.compile compiles here)
    check = batch["mean"].clone().requires_grad_()
    expected = loss_torch_eager(batch, check)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean.grad, check.grad, rtol=1e-4, atol=1e-9)
    benchmark.extra_info["elements_per_tensor"] = batch["mean"].numel()

    def step():
        mean.grad = None
        fn(batch, mean)

    benchmark(step)
    record(benchmark, "loss", impl)


# ---- advantages -----------------------------------------------------------------------------------------


def advantage_batch(prompts=16, group=24, sources=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(prompts).repeat_interleave(group)
    rewards = torch.rand(prompts * group, sources, generator=g)
    rewards[:group] = 1.0  # one prompt all solved: zero-std group
    return rewards, ids, torch.tensor([1.0, 0.5, 0.25])


def advantages_numpy_loop(rewards, ids, weights):
    """Flow-GRPO's per-prompt stat tracker, "sum then normalize" with the group std."""
    r = (rewards.numpy() * weights.numpy()).sum(1)
    keys = ids.numpy()
    adv = np.zeros_like(r)
    for key in np.unique(keys):
        rows = keys == key
        adv[rows] = (r[rows] - r[rows].mean()) / (r[rows].std() + 1e-4)
    return torch.from_numpy(np.clip(adv, -5, 5))


ADV_IMPLS = {
    "flow_grpo_numpy_loop": advantages_numpy_loop,
    "torch_reference": lambda r, i, w: group_advantages_reference(r, i, w, False, False, 1e-4, 5.0)[0],
    "uniref": lambda r, i, w: grpo.group_advantages(r, i, w)[0],
}


@pytest.mark.benchmark(group="group_advantages 384 samples x 3 sources (CPU)")
@pytest.mark.parametrize("impl", list(ADV_IMPLS))
def test_group_advantages(benchmark, impl):
    rewards, ids, weights = advantage_batch()
    adv = ADV_IMPLS[impl](rewards, ids, weights)
    expected = advantages_numpy_loop(rewards, ids, weights).double()
    torch.testing.assert_close(adv.double(), expected, rtol=1e-4, atol=1e-4)
    benchmark(ADV_IMPLS[impl], rewards, ids, weights)
    record(benchmark, "advantages", impl)
