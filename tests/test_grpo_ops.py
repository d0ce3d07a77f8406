"""The public MSGRPO functions and the registered ops (`uniref::group_advantages`, `uniref::flow_grpo_loss`,
`uniref::flow_grpo_loss_backward`) on every device at hand, against the float64 references: values,
gradients, edge cases, error paths, opcheck and torch.compile. The Triton kernels themselves are
tested in test_grpo_triton.py (under the interpreter on CPU)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import uniref.grpo as grpo
from uniref.testing import DEVICES
from uniref.testing import grpo as ref
from uniref.testing.grpo import loss_inputs

F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def reference_loss_and_grad(x_next, mean, old, adv, std, clip_range, mean_ref, beta, kl_std, kind):
    """float64 reference on the same (possibly low-precision) values, and d loss / d mean by autograd."""
    up = [None if t is None else t.detach().to(F64) for t in (x_next, mean, old, adv, std, mean_ref, kl_std)]
    m = up[1].clone().requires_grad_()
    loss, stats = ref.flow_grpo_loss_reference(
        up[0], m, up[2], up[3], up[4], clip_range, up[5], beta, up[6], kind == "sde"
    )
    (grad,) = torch.autograd.grad(loss, m)
    return loss.detach(), stats, grad


# ---- flow_grpo_loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("clip_regime", ["inside", "outside"])
def test_loss_matches_reference(device, dtype, kind, beta, clip_regime, poison):
    inputs = loss_inputs(n=5, shape=(3, 37), clip_regime=clip_regime, latent_dtype=dtype)
    x_next, mean, old, adv, std, mean_ref = (t.to(device) for t in inputs)
    # the latents in `dtype`; the per-sample vectors stay fp32/fp64 as they come out of the sampler
    x_next, mean, mean_ref = (t.to(dtype) for t in (x_next, mean, mean_ref))
    if dtype != F64:
        old, adv, std = (t.float() for t in (old, adv, std))
    if kind == "cps":  # old log-probs in the cps convention, shifted the same way
        old = (
            old - ref.log_prob_reference(x_next, mean, std) + ref.log_prob_reference(x_next, mean, std, gaussian=False)
        )
    mean = mean.clone().requires_grad_()
    loss, stats = grpo.flow_grpo_loss(x_next, mean, old, adv, std, 1e-4, mean_ref, beta, kind=kind)
    loss.backward()
    exp_loss, exp_stats, exp_grad = reference_loss_and_grad(
        x_next, mean, old, adv, std, 1e-4, mean_ref, beta, None, kind
    )
    out_dtype = F64 if dtype == F64 else torch.float32
    assert loss.dtype == out_dtype and all(v.dtype == out_dtype for v in stats.values())
    tol = TOL[dtype]
    torch.testing.assert_close(loss.double().cpu(), exp_loss.cpu(), rtol=tol, atol=tol)
    for key in ("log_prob", "ratio", "kl"):
        torch.testing.assert_close(stats[key].double().cpu(), exp_stats[key].cpu(), rtol=tol, atol=tol)
    assert (
        stats["clip_fraction"].item() == exp_stats["clip_fraction"].item() == (1.0 if clip_regime == "outside" else 0.0)
    )
    assert mean.grad.dtype == dtype and mean.grad.shape == mean.shape
    grad_tol = 1e-2 if dtype in (torch.bfloat16, torch.float16) else tol
    atol = grad_tol * exp_grad.abs().max().item()
    torch.testing.assert_close(mean.grad.double().cpu(), exp_grad.cpu(), rtol=grad_tol, atol=atol)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_awkward_shapes_and_kl_std(device, poison):
    for n, shape in [(1, (1,)), (1, (5, 3)), (7, (11,)), (3, (2, 3, 5, 7))]:
        x_next, mean, old, adv, std, mean_ref = (
            t.to(device) for t in loss_inputs(n=n, shape=shape, dtype=torch.float32)
        )
        kl_std = std * 2.5
        mean = mean.clone().requires_grad_()
        loss, stats = grpo.flow_grpo_loss(x_next, mean, old, adv, std, 1e-4, mean_ref, 0.5, kl_std)
        loss.backward()
        exp_loss, exp_stats, exp_grad = reference_loss_and_grad(
            x_next, mean, old, adv, std, 1e-4, mean_ref, 0.5, kl_std, "sde"
        )
        torch.testing.assert_close(loss.double().cpu(), exp_loss.cpu(), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(stats["kl"].double().cpu(), exp_stats["kl"].cpu(), rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(mean.grad.double().cpu(), exp_grad.cpu(), rtol=2e-5, atol=1e-7)


def test_loss_gradcheck_float64():
    x_next, mean, old, adv, std, mean_ref = loss_inputs(n=3, shape=(4,), clip_regime="mixed")
    mean = mean.clone().requires_grad_()

    def f(m):
        return grpo.flow_grpo_loss(x_next, m, old, adv, std, 1e-4, mean_ref, 0.2)[0]

    assert torch.autograd.gradcheck(f, (mean,), eps=1e-7, atol=1e-8)


def test_loss_stats_are_not_differentiable_and_mean_ref_gets_no_grad():
    x_next, mean, old, adv, std, mean_ref = loss_inputs(n=2, shape=(6,), dtype=torch.float32)
    mean = mean.clone().requires_grad_()
    mean_ref = mean_ref.clone().requires_grad_()
    loss, stats = grpo.flow_grpo_loss(x_next, mean, old, adv, std, 1e-4, mean_ref, 0.1)
    assert not any(v.requires_grad for v in stats.values())
    loss.backward()
    assert mean.grad is not None and mean_ref.grad is None


def test_loss_all_zero_advantages_give_zero_loss_and_grad():
    x_next, mean, old, _, std, _ = loss_inputs(n=4, shape=(9,), dtype=torch.float32)
    mean = mean.clone().requires_grad_()
    loss, _ = grpo.flow_grpo_loss(x_next, mean, old, torch.zeros(4), std)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(mean.grad) == 0


def test_loss_on_rollout_from_sde_step_has_unit_ratio():
    """The intended pipeline: the rollout's log_prob is the old one, re-scoring gives ratio 1."""
    x, v = torch.randn(3, 16, 8), torch.randn(3, 16, 8)
    x_next, mean, logp, step_std = grpo.sde_step_with_logprob(x, v, 0.8, 0.75, 0.9)
    _, mean_again, _, _ = grpo.sde_step_with_logprob(x, v.requires_grad_(), 0.8, 0.75, 0.9, prev_sample=x_next)
    loss, stats = grpo.flow_grpo_loss(x_next, mean_again, logp, torch.tensor([1.0, -1.0, 0.5]), step_std)
    torch.testing.assert_close(stats["ratio"], torch.ones(3), rtol=0, atol=1e-6)
    loss.backward()
    assert v.grad is not None and torch.isfinite(v.grad).all()


def test_loss_nonpositive_step_std_raises_on_cpu():
    x_next, mean, old, adv, std, _ = loss_inputs(n=3, shape=(4,), dtype=torch.float32)
    with pytest.raises(ValueError, match="step_std must be > 0"):
        grpo.flow_grpo_loss(x_next, mean, old, adv, torch.tensor([0.3, 0.0, 0.2]))
    with pytest.raises(ValueError, match="kl_std must be > 0"):
        grpo.flow_grpo_loss(x_next, mean, old, adv, std, kl_std=-std)


def _bad_loss_cases():
    n = 3
    ok = dict(x_next=torch.randn(n, 4), mean=torch.randn(n, 4), old_log_prob=torch.zeros(n), advantages=torch.ones(n),
              step_std=torch.ones(n))  # fmt: skip
    cases = {
        "x_next_shape": (dict(x_next=torch.randn(n, 5)), ValueError, "x_next has shape"),
        "mean_ref_shape": (dict(mean_ref=torch.randn(n, 3)), ValueError, "mean_ref has shape"),
        "mean_int": (dict(mean=torch.ones(n, 4, dtype=torch.int32)), TypeError, "mean must be float"),
        "empty_batch": (dict(mean=torch.randn(0, 4), x_next=torch.randn(0, 4)), ValueError, "N >= 1"),
        "empty_sample": (dict(mean=torch.randn(n, 0), x_next=torch.randn(n, 0)), ValueError, "between 1 and"),
        "scalar_mean": (dict(mean=torch.tensor(1.0), x_next=torch.tensor(1.0)), ValueError, "N >= 1"),
        "advantages_length": (dict(advantages=torch.ones(n + 1)), ValueError, "advantages must have shape"),
        "old_log_prob_2d": (dict(old_log_prob=torch.zeros(n, 1)), ValueError, "old_log_prob must have shape"),
        "step_std_list": (dict(step_std=[1.0] * n), TypeError, "step_std must be a torch.Tensor"),
        "kl_std_length": (dict(kl_std=torch.ones(2)), ValueError, "kl_std must have shape"),
        "clip_range_negative": (dict(clip_range=-0.1), ValueError, "clip_range"),
        "clip_range_nan": (dict(clip_range=math.nan), ValueError, "clip_range"),
        "beta_without_ref": (dict(beta=0.1), ValueError, "mean_ref"),
        "beta_tensor": (dict(beta=torch.tensor(0.1)), TypeError, "beta must be a Python number"),
        "kind": (dict(kind="ode"), ValueError, "kind"),
    }
    return ok, cases


_OK, _BAD = _bad_loss_cases()


@pytest.mark.parametrize("bad", _BAD.values(), ids=_BAD.keys())
def test_loss_rejects_bad_input(bad):
    override, exc, match = bad
    with pytest.raises(exc, match=match):
        grpo.flow_grpo_loss(**{**_OK, **override})


def test_loss_and_advantages_reject_mixed_devices():
    # "meta" stands in for a second device: the checks run before any data is touched
    with pytest.raises(ValueError, match="advantages is on meta"):
        grpo.flow_grpo_loss(**{**_OK, "advantages": _OK["advantages"].to("meta")})
    with pytest.raises(ValueError, match="group_ids is on meta"):
        grpo.group_advantages(torch.randn(3), torch.zeros(3, dtype=torch.int64, device="meta"))


# ---- group_advantages ------------------------------------------------------------------------------------


def advantage_case(n=23, sources=3, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 7, (n,), generator=g) * 3 - 5
    rewards = torch.randn(n, sources, generator=g)
    rewards[ids == ids[0]] = 0.5  # an all-equal group
    rewards[1] = 40.0  # clipped
    weights = torch.rand(sources, generator=g) * 2 - 0.5
    return rewards.to(device), ids.to(device), weights.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("aggregate", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("std", ["group", "batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_advantages_match_reference(device, aggregate, std, dtype, poison):
    rewards, ids, weights = advantage_case(device=device)
    rewards = rewards.to(dtype)
    adv, stats = grpo.group_advantages(rewards, ids, weights, aggregate=aggregate, std=std, clip=3.0)
    expected, constant = ref.group_advantages_reference(
        rewards.double(), ids, weights.double(), aggregate == "normalize_then_sum", std == "batch", 1e-4, 3.0
    )
    assert adv.dtype == (F64 if dtype == F64 else torch.float32)
    torch.testing.assert_close(adv.double(), expected, rtol=1e-5, atol=1e-5)
    assert adv.abs().max() <= 3.0
    same = ids == ids[0]
    assert (adv[same] == 0).all()
    assert stats["num_groups"] == ids.unique().numel()
    assert stats["zero_std_fraction"].item() == pytest.approx(1 / stats["num_groups"])
    torch.testing.assert_close(stats["source_mean"].double(), rewards.double().mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        stats["source_std"].double(), rewards.double().std(0, correction=0), rtol=1e-6, atol=1e-6
    )
    assert ("zero_std_fraction_per_source" in stats) == (aggregate == "normalize_then_sum")


@pytest.mark.parametrize("device", DEVICES)
def test_advantages_singletons_and_all_equal_are_zero_not_nan(device, poison):
    rewards = torch.tensor([1.0, 2.0, 3.0, 3.0, 3.0, 0.5], device=device)
    ids = torch.tensor([0, 1, 2, 2, 2, 3], device=device)
    for std in ("group", "batch"):
        adv, stats = grpo.group_advantages(rewards, ids, std=std, eps=0.0)
        assert torch.equal(adv, torch.zeros(6, device=device))
        assert stats["zero_std_fraction"].item() == 1.0
    # every reward equal: the batch std is 0 too, still 0
    same = torch.full((5, 2), 7.0, device=device)
    one_group = torch.zeros(5, dtype=torch.int64, device=device)
    adv, _ = grpo.group_advantages(same, one_group, aggregate="normalize_then_sum", std="batch", eps=0.0)
    assert torch.equal(adv, torch.zeros(5, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_advantages_one_constant_source_still_counts_the_other(device):
    rewards = torch.tensor([[1.0, 0.0], [1.0, 2.0], [1.0, 4.0]], device=device)
    ids = torch.zeros(3, dtype=torch.int32, device=device)
    adv, stats = grpo.group_advantages(rewards, ids, weights=[1.0, 0.5], aggregate="normalize_then_sum", eps=0.0)
    expected = 0.5 * torch.tensor([-1.0, 0.0, 1.0]) * math.sqrt(1.5)  # (x - 2) / std([0, 2, 4])
    torch.testing.assert_close(adv.cpu(), expected)
    assert stats["zero_std_fraction"].item() == 0.0
    assert stats["zero_std_fraction_per_source"].tolist() == [1.0, 0.0]


def test_advantages_integer_rewards_and_sequence_weights():
    adv, _ = grpo.group_advantages(torch.tensor([0, 1, 1, 0]), torch.tensor([5, 5, 9, 9]), weights=(2.0,))
    # weighted rewards 0 and 2 per group: mean 1, std 1; a single weight cancels up to eps
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 1.0, -1.0]) / (1 + 1e-4))


@given(
    n=st.integers(1, 40),
    sources=st.integers(1, 3),
    groups=st.integers(1, 8),
    aggregate=st.sampled_from(["sum_then_normalize", "normalize_then_sum"]),
    std=st.sampled_from(["group", "batch"]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_advantages_are_permutation_equivariant(n, sources, groups, aggregate, std, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 4, (n, sources), generator=g).double()  # ties and all-equal groups are common
    ids = torch.randint(0, groups, (n,), generator=g)
    perm = torch.randperm(n, generator=g)
    # no clipping, so that each group's advantages sum to 0 (checked below)
    adv, stats = grpo.group_advantages(rewards, ids, aggregate=aggregate, std=std, clip=math.inf)
    adv_p, stats_p = grpo.group_advantages(rewards[perm], ids[perm], aggregate=aggregate, std=std, clip=math.inf)
    torch.testing.assert_close(adv_p, adv[perm], rtol=1e-12, atol=1e-12)
    assert torch.isfinite(adv).all()
    assert stats_p["zero_std_fraction"] == stats["zero_std_fraction"]
    for key in ids.unique():
        assert abs(adv[ids == key].sum().item()) < 1e-9


def _bad_advantage_cases():
    ok = dict(rewards=torch.randn(4, 2), group_ids=torch.tensor([0, 0, 1, 1]))
    return ok, {
        "nan_reward": (
            dict(rewards=torch.tensor([[1.0, 0.0], [math.nan, 0.0], [0.0, 0.0], [1.0, 1.0]])),
            ValueError,
            "non-finite values in 1 row",
        ),
        "inf_reward": (dict(rewards=torch.tensor([0.0, 1.0, math.inf, 2.0])), ValueError, "rewards hold non-finite"),
        "ids_length": (dict(group_ids=torch.tensor([0, 0, 1])), ValueError, "group_ids must have shape"),
        "ids_float": (dict(group_ids=torch.tensor([0.0, 0.0, 1.0, 1.0])), TypeError, "group_ids must hold integer"),
        "empty": (dict(rewards=torch.randn(0), group_ids=torch.zeros(0, dtype=torch.int64)), ValueError, "N >= 1"),
        "rewards_3d": (dict(rewards=torch.randn(4, 2, 1)), ValueError, "rewards must be"),
        "weights_length": (dict(weights=[1.0]), ValueError, "weights must have one entry"),
        "weights_nan": (dict(weights=[1.0, math.nan]), ValueError, "weights must be finite"),
        "aggregate": (dict(aggregate="mean"), ValueError, "aggregate"),
        "std": (dict(std="global"), ValueError, "std must be"),
        "eps_negative": (dict(eps=-1.0), ValueError, "eps"),
        "clip_zero": (dict(clip=0.0), ValueError, "clip"),
    }


_OK_ADV, _BAD_ADV = _bad_advantage_cases()


@pytest.mark.parametrize("bad", _BAD_ADV.values(), ids=_BAD_ADV.keys())
def test_advantages_reject_bad_input(bad):
    override, exc, match = bad
    with pytest.raises(exc, match=match):
        grpo.group_advantages(**{**_OK_ADV, **override})


# ---- opcheck and torch.compile ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x_next, mean, old, adv, std, mean_ref = (t.float().to(device) for t in loss_inputs(n=3, shape=(5,)))
    for beta, ref_ in ((0.0, None), (0.2, mean_ref)):
        m = mean.clone().requires_grad_()
        args = (x_next, m, ref_, old, adv, std, std, 1e-4, beta, True)
        torch.library.opcheck(torch.ops.uniref.flow_grpo_loss.default, args)
    coef = torch.randn(3, 2, device=device)
    torch.library.opcheck(
        torch.ops.uniref.flow_grpo_loss_backward.default,
        (torch.tensor(1.0, device=device), x_next, mean, mean_ref, coef),
    )
    rewards, ids, weights = advantage_case(device=device)
    for normalize_first in (False, True):
        torch.library.opcheck(
            torch.ops.uniref.group_advantages.default, (rewards, ids, weights, normalize_first, True, 1e-4, 5.0)
        )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x_next, mean, old, adv, std, mean_ref = (t.float().to(device) for t in loss_inputs(n=4, shape=(3, 5)))

    def step(m):
        loss, stats = grpo.flow_grpo_loss(x_next, m, old, adv, std, 1e-4, mean_ref, 0.1)
        return loss * 2.0, stats["ratio"]

    m_eager, m_comp = mean.clone().requires_grad_(), mean.clone().requires_grad_()
    loss_e, ratio_e = step(m_eager)
    loss_c, ratio_c = torch.compile(step, fullgraph=True)(m_comp)
    loss_e.backward()
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(ratio_c, ratio_e)
    torch.testing.assert_close(m_comp.grad, m_eager.grad)

    rewards, ids, weights = advantage_case(device=device)

    def advantages(r, i, w):
        return torch.ops.uniref.group_advantages(r, i, w, True, False, 1e-4, 5.0)[0]

    compiled = torch.compile(advantages, fullgraph=True)
    torch.testing.assert_close(compiled(rewards, ids, weights), advantages(rewards, ids, weights))

    x, v, noise = (torch.randn(2, 6, device=device) for _ in range(3))
    sde = torch.compile(lambda x, v, n: grpo.sde_step_with_logprob(x, v, 0.7, 0.6, 0.9, noise=n), fullgraph=True)
    for got, want in zip(sde(x, v, noise), grpo.sde_step_with_logprob(x, v, 0.7, 0.6, 0.9, noise=noise)):
        torch.testing.assert_close(got, want)
