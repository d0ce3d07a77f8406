"""The MSGRPO Triton kernels (uniref/kernels/grpo.py) against the torch references.

On a machine without CUDA they run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1,
set below before the kernels are defined); with CUDA, on the GPU. Every buffer the launchers allocate
is NaN-poisoned (the `poison` fixture), so an element a kernel fails to write shows up. Small, awkward
shapes (N = 1, odd and non-power-of-two element counts, several programs per sample with a partial last
chunk) and few, large programs keep the interpreter fast.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Read by @triton.jit when the kernels are defined: must precede the first import of the module.
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from uniref.kernels import grpo as kernels  # noqa: E402
from uniref.testing import grpo as ref
from uniref.testing.grpo import loss_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = torch.float64
# On a GPU machine every test here runs the compiled kernels: mark them for `pytest -k cuda`.
pytestmark = [pytest.mark.cuda] if DEVICE == "cuda" else []


def test_kernels_are_interpreted_without_cuda():
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(kernels._loss_fwd_kernel, InterpretedFunction), (
            "uniref.kernels.grpo was imported before TRITON_INTERPRET=1 was set: run this file first or alone"
        )


def test_poison_fixture_poisons(poison):
    assert torch.isnan(torch.empty(4, device=DEVICE)).all()


# ---- loss ---------------------------------------------------------------------------------------------

# (N, per-sample shape, programs per sample, elements per iteration)
LOSS_SHAPES = {
    "n1_d1": (1, (1,), 1, 16),
    "n1_odd_split3": (1, (5, 13), 3, 8),
    "n3_d301_split3": (3, (301,), 3, 32),  # 3 chunks of 128, the last one partial
    "n5_4d_split1": (5, (2, 3, 7), 1, 64),
    "n7_d37_split2": (7, (37,), 2, 16),
}


def run_kernels(
    x_next, mean, mean_ref, old, adv, std, kl_std, clip_range, beta, gaussian, split, block, grad_scale=1.0
):
    out = kernels.flow_grpo_loss_forward(
        x_next, mean, mean_ref, old, adv, std, kl_std, clip_range, beta, gaussian, block=block, split=split
    )
    grad = kernels.flow_grpo_loss_backward(
        torch.tensor(grad_scale, device=DEVICE), x_next, mean, mean_ref if beta != 0 else None, out[5],
        block=block, split=split,
    )  # fmt: skip
    return out, grad


def expected(x_next, mean, mean_ref, old, adv, std, kl_std, clip_range, beta, gaussian, grad_scale=1.0):
    up = [None if t is None else t.to(F64).cpu() for t in (x_next, mean, mean_ref, old, adv, std, kl_std)]
    m = up[1].clone().requires_grad_()
    loss, stats = ref.flow_grpo_loss_reference(up[0], m, up[3], up[4], up[5], clip_range, up[2], beta, up[6], gaussian)
    (grad,) = torch.autograd.grad(loss * grad_scale, m)
    return loss.detach(), stats, grad


def check_loss(out, grad, exp, dtype, has_ref):
    loss, log_prob, ratio, kl, clip_fraction, coef = out
    exp_loss, exp_stats, exp_grad = exp
    for t in out:
        assert t.dtype == torch.float32 and not torch.isnan(t).any(), "an output element was not written"
    tol = 3e-5
    torch.testing.assert_close(loss.double().cpu(), exp_loss, rtol=tol, atol=tol)
    torch.testing.assert_close(log_prob.double().cpu(), exp_stats["log_prob"], rtol=tol, atol=tol)
    torch.testing.assert_close(ratio.double().cpu(), exp_stats["ratio"], rtol=tol, atol=tol)
    torch.testing.assert_close(kl.double().cpu(), exp_stats["kl"], rtol=tol, atol=1e-7)
    assert clip_fraction.item() == pytest.approx(exp_stats["clip_fraction"].item())
    if not has_ref:
        assert torch.count_nonzero(kl) == 0
    assert grad.dtype == dtype and not torch.isnan(grad).any()
    grad_tol = 1e-2 if dtype != torch.float32 else 3e-5
    scale = exp_grad.abs().max().item()
    torch.testing.assert_close(grad.double().cpu(), exp_grad, rtol=grad_tol, atol=grad_tol * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("beta", [0.0, 0.25])
@pytest.mark.parametrize("shape", LOSS_SHAPES.values(), ids=LOSS_SHAPES.keys())
def test_loss_kernels_match_reference(shape, beta, kind, dtype, poison):
    n, sample_shape, split, block = shape
    gaussian = kind == "sde"
    x_next, mean, old, adv, std, mean_ref = (
        t.to(DEVICE) for t in loss_inputs(n=n, shape=sample_shape, clip_regime="mixed", latent_dtype=dtype)
    )
    if not gaussian:
        old = (
            old - ref.log_prob_reference(x_next, mean, std) + ref.log_prob_reference(x_next, mean, std, gaussian=False)
        )
    x_next, mean, mean_ref = (t.to(dtype) for t in (x_next, mean, mean_ref))
    old, adv, std = (t.float() for t in (old, adv, std))
    kl_std = std * 1.5
    has_ref = beta != 0 or n % 2 == 1  # mean_ref without beta: kl reported, no gradient term
    mref = mean_ref if has_ref else None
    out, grad = run_kernels(
        x_next, mean, mref, old, adv, std, kl_std, 1e-4, beta, gaussian, split, block, grad_scale=0.5
    )
    exp = expected(x_next, mean, mref, old, adv, std, kl_std, 1e-4, beta, gaussian, grad_scale=0.5)
    check_loss(out, grad, exp, dtype, has_ref)


@pytest.mark.parametrize("clip_regime", ["inside", "outside"])
def test_loss_kernels_clipping_active_and_inactive(clip_regime, poison):
    inputs = loss_inputs(n=6, shape=(45,), clip_regime=clip_regime, dtype=torch.float32)
    x_next, mean, old, adv, std, mean_ref = (t.to(DEVICE) for t in inputs)
    out, grad = run_kernels(x_next, mean, mean_ref, old, adv, std, std, 1e-4, 0.1, True, 2, 16)
    exp = expected(x_next, mean, mean_ref, old, adv, std, std, 1e-4, 0.1, True)
    check_loss(out, grad, exp, torch.float32, True)
    assert out[4].item() == (1.0 if clip_regime == "outside" else 0.0)
    # outside the range, PPO's max picks the clipped (constant) term for some samples: no policy gradient
    assert ((out[5][:, 0] == 0).any()).item() == (clip_regime == "outside")


def test_loss_kernels_strided_rows_and_mixed_dtypes(poison):
    """Rows of a wider buffer (row stride != elements per sample) and per-tensor dtypes."""
    x_next, mean, old, adv, std, mean_ref = (t.to(DEVICE) for t in loss_inputs(n=4, shape=(33,), dtype=torch.float32))
    wide = torch.zeros(4, 50, device=DEVICE)
    wide[:, 3:36] = mean
    strided_mean = wide[:, 3:36]
    assert not strided_mean.is_contiguous()
    x_half = x_next.to(torch.bfloat16)
    out, grad = run_kernels(x_half, strided_mean, mean_ref, old, adv.double(), std, std, 1e-4, 0.2, True, 2, 16)
    exp = expected(x_half, strided_mean, mean_ref, old, adv, std, std, 1e-4, 0.2, True)
    check_loss(out, grad, exp, torch.float32, True)


def test_loss_kernels_are_deterministic():
    x_next, mean, old, adv, std, mean_ref = (t.to(DEVICE) for t in loss_inputs(n=3, shape=(200,), dtype=torch.float32))
    first = kernels.flow_grpo_loss_forward(
        x_next, mean, mean_ref, old, adv, std, std, 1e-4, 0.1, True, block=32, split=4
    )
    again = kernels.flow_grpo_loss_forward(
        x_next, mean, mean_ref, old, adv, std, std, 1e-4, 0.1, True, block=32, split=4
    )
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets log(0), 0 / 0
def test_loss_kernel_invalid_step_std_gives_nan_not_a_finite_loss():
    x_next, mean, old, adv, std, _ = (t.to(DEVICE) for t in loss_inputs(n=3, shape=(8,), dtype=torch.float32))
    for bad in (0.0, -0.5, float("nan")):
        std_bad = std.clone()
        std_bad[1] = bad
        out, grad = run_kernels(x_next, mean, None, old, adv, std_bad, std_bad, 1e-4, 0.0, True, 1, 8)
        assert torch.isnan(out[1][1]) and torch.isnan(out[0]), f"step_std = {bad}"
        assert torch.isnan(grad[1]).all() and not torch.isnan(grad[0]).any()


@given(
    n=st.integers(1, 6),
    d=st.integers(1, 90),
    split=st.integers(1, 4),
    block=st.sampled_from([8, 16, 32]),
    beta=st.sampled_from([0.0, 0.5]),
    gaussian=st.booleans(),
    seed=st.integers(0, 1000),
)
@settings(max_examples=25, deadline=None)
def test_loss_kernels_property(n, d, split, block, beta, gaussian, seed):
    x_next, mean, old, adv, std, mean_ref = (
        t.to(DEVICE) for t in loss_inputs(n=n, shape=(d,), dtype=torch.float32, seed=seed)
    )
    if not gaussian:
        old = (
            old - ref.log_prob_reference(x_next, mean, std) + ref.log_prob_reference(x_next, mean, std, gaussian=False)
        )
    out, grad = run_kernels(x_next, mean, mean_ref, old, adv, std, std, 1e-4, beta, gaussian, split, block)
    exp = expected(x_next, mean, mean_ref, old, adv, std, std, 1e-4, beta, gaussian)
    check_loss(out, grad, exp, torch.float32, True)


def test_loss_grid_default_covers_every_element(monkeypatch):
    """The GPU launch-shape heuristic (an H100's 132 SMs here) covers D with chunks that are multiples of
    the block, the last one possibly partial, and aims at a few programs per SM."""
    monkeypatch.setattr(kernels, "_num_sms", lambda index: 132)
    for n, d in [(1, 1), (24, 4096 * 64), (3, 1000003), (1000, 17), (7, 2049)]:
        block, chunk, split = kernels._loss_grid(n, d, torch.device("cuda", 0), None, None)
        assert block == 2048 and chunk % block == 0 and (split - 1) * chunk < d <= split * chunk
        assert n * split <= 4 * 132 or split == 1
    assert kernels._loss_grid(24, 4096 * 64, torch.device("cuda", 0), None, None) == (2048, 12288, 22)


# ---- advantages ----------------------------------------------------------------------------------------


def advantage_inputs(n, sources, groups, seed, integer_rewards=False):
    """Rewards on a 1/8 grid and weights on a 1/2 grid: the weighted sums are exact in fp32, so a
    non-constant group's std is never tiny and fp32 vs fp64 differences stay at rounding level (near-equal
    values in a group would make any fp32 result far from the fp64 one: (a - m) / std is ill-conditioned)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, groups, (n,), generator=g) * 5 - 3
    if integer_rewards:
        rewards = torch.randint(0, 3, (n, sources), generator=g).float()
    else:
        rewards = torch.round(torch.randn(n, sources, generator=g) * 8) / 8
        rewards[ids == ids[0]] = 1.5  # an all-equal group
    weights = torch.randint(-2, 5, (sources,), generator=g) / 2
    return rewards.to(DEVICE), ids.to(DEVICE), weights.to(DEVICE)


def check_advantages(rewards, ids, weights, normalize_first, batch_std, eps=1e-4, clip=5.0, **blocks):
    adv, constant = kernels.group_advantages(rewards, ids, weights, normalize_first, batch_std, eps, clip, **blocks)
    exp, exp_constant = ref.group_advantages_reference(
        rewards.double().cpu(), ids.cpu(), weights.double().cpu(), normalize_first, batch_std, eps, clip
    )
    assert adv.dtype == torch.float32 and not torch.isnan(adv).any()
    torch.testing.assert_close(adv.double().cpu(), exp, rtol=1e-5, atol=1e-5)
    assert torch.equal(constant.cpu(), exp_constant)
    return adv


@pytest.mark.parametrize("normalize_first", [False, True], ids=["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("batch_std", [False, True], ids=["group_std", "batch_std"])
@pytest.mark.parametrize("n,sources,groups", [(1, 1, 1), (37, 3, 9), (50, 5, 50), (33, 2, 1)])
def test_advantage_kernel_matches_reference(n, sources, groups, normalize_first, batch_std, poison):
    rewards, ids, weights = advantage_inputs(n, sources, groups, seed=n)
    adv = check_advantages(rewards, ids, weights, normalize_first, batch_std, clip=2.0)
    assert (adv[ids == ids[0]] == 0).all()  # the all-equal group and every singleton


def test_advantage_kernel_low_precision_and_integer_ids(poison):
    rewards, ids, weights = advantage_inputs(29, 3, 6, seed=4)
    check_advantages(rewards.to(torch.bfloat16), ids.to(torch.int32), weights, True, False)
    check_advantages(rewards.to(torch.float16), ids, weights.to(torch.bfloat16), False, True)


@given(
    n=st.integers(1, 70),
    sources=st.integers(1, 4),
    groups=st.integers(1, 12),
    normalize_first=st.booleans(),
    batch_std=st.booleans(),
    block_j=st.sampled_from([8, 32]),
    seed=st.integers(0, 1000),
)
@settings(max_examples=25, deadline=None)
def test_advantage_kernel_property(n, sources, groups, normalize_first, batch_std, block_j, seed):
    rewards, ids, weights = advantage_inputs(n, sources, groups, seed, integer_rewards=seed % 2 == 0)
    check_advantages(rewards, ids, weights, normalize_first, batch_std, eps=0.0 if seed % 3 == 0 else 1e-4,
                     block_i=8, block_j=block_j)  # fmt: skip


# ---- the ops' CUDA implementations (dispatch glue: float64 fallback, launch arguments) --------------------


def test_cuda_implementations_match_cpu_ones(poison):
    from uniref.ops import grpo as ops_grpo

    for dtype in (torch.float32, torch.float64):
        x_next, mean, old, adv, std, mean_ref = (t.to(DEVICE, dtype) for t in loss_inputs(n=3, shape=(5, 7)))
        args = (x_next, mean, mean_ref, old, adv, std, std * 2, 1e-4, 0.3, True)
        got = ops_grpo._loss_cuda(*args)
        want = ops_grpo._loss_cpu(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
        for g, w in zip(got, want):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g.cpu(), w, rtol=3e-5, atol=1e-7)
        grad_args = (torch.tensor(0.5, device=DEVICE, dtype=dtype), x_next, mean, mean_ref, want[5].to(DEVICE))
        torch.testing.assert_close(
            ops_grpo._loss_backward_cuda(*grad_args).cpu(),
            ops_grpo._loss_backward_cpu(*(a.cpu() for a in grad_args)), rtol=3e-5, atol=1e-9,
        )  # fmt: skip
        rewards, ids, weights = advantage_inputs(19, 2, 4, seed=1)
        for normalize_first in (False, True):
            adv_args = (rewards.to(dtype), ids, weights.to(dtype), normalize_first, True, 1e-4, 5.0)
            got = ops_grpo._group_advantages_cuda(*adv_args)
            want = ops_grpo._group_advantages_cpu(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in adv_args))
            assert got[0].dtype == want[0].dtype
            torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(got[1].cpu(), want[1])
