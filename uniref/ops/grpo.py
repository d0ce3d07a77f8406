"""Registration of the MSGRPO ops declared in csrc/ops.cpp: device kernels, fake kernels, autograd.

* CPU: the fp32 torch references of `uniref.testing.grpo` (which also serve tests and benchmarks).
* CUDA: the Triton kernels of `uniref.kernels.grpo`, imported on first use so that a CPU-only install
  needs no triton. float64 inputs take the reference on every device (the kernels accumulate in fp32).
* Autograd: `flow_grpo_loss` differentiates in `mean` only, through `flow_grpo_loss_backward` and the
  per-sample coefficients the forward returns. Its statistics outputs are not differentiable.

Value checks that need the data (step_std > 0) run in the CPU kernel, where they cost nothing; CUDA
inputs are not checked because that needs a device-to-host sync on every call (see the kernels).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from uniref.testing import grpo as ref

_ops = torch.ops.uniref


def _triton_kernels():
    try:
        from uniref.kernels import grpo
    except ImportError as exc:  # pragma: no cover - a CUDA torch without triton
        raise RuntimeError(
            f"uniref's MSGRPO ops run Triton kernels on CUDA tensors, but triton could not be imported ({exc}); "
            "install it with `pip install triton` (it ships with CUDA builds of torch)"
        ) from exc
    return grpo


def _on_device(fn):
    """Runs a CUDA implementation with its tensors' device current (Triton launches on the current
    device). args[1] is a tensor in all three schemas: group_ids, mean, x_next. Tensors on other devices
    (the tests' CPU tensors under the Triton interpreter) run as they are."""

    @functools.wraps(fn)
    def wrapper(*args):
        device = args[1].device
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            return fn(*args)

    return wrapper


# ---- group_advantages ---------------------------------------------------------------------------------


@torch.library.register_fake("uniref::group_advantages")
def _group_advantages_fake(rewards, group_ids, weights, normalize_first, batch_std, eps, clip):
    n, s = rewards.shape
    advantages = rewards.new_empty((n,), dtype=ref.compute_dtype(rewards, weights))
    return advantages, rewards.new_empty((n, s if normalize_first else 1), dtype=torch.bool)


def _group_advantages_cpu(rewards, group_ids, weights, normalize_first, batch_std, eps, clip):
    return ref.group_advantages_reference(rewards, group_ids, weights, normalize_first, batch_std, eps, clip)


@_on_device
def _group_advantages_cuda(rewards, group_ids, weights, normalize_first, batch_std, eps, clip):
    if ref.compute_dtype(rewards, weights) == torch.float64:
        return _group_advantages_cpu(rewards, group_ids, weights, normalize_first, batch_std, eps, clip)
    return _triton_kernels().group_advantages(rewards, group_ids, weights, normalize_first, batch_std, eps, clip)


# ---- flow_grpo_loss -------------------------------------------------------------------------------------


@torch.library.register_fake("uniref::flow_grpo_loss")
def _loss_fake(x_next, mean, mean_ref, old_log_prob, advantages, step_std, kl_std, clip_range, beta, gaussian):
    dtype = ref.compute_dtype(x_next, mean, mean_ref, old_log_prob, advantages, step_std, kl_std)
    n = mean.shape[0]
    scalar, per_sample = mean.new_empty((), dtype=dtype), mean.new_empty((n,), dtype=dtype)
    return (scalar, per_sample, per_sample.clone(), per_sample.clone(), scalar.clone(),
            mean.new_empty((n, 2), dtype=dtype))  # fmt: skip


def _loss_cpu(x_next, mean, mean_ref, old_log_prob, advantages, step_std, kl_std, clip_range, beta, gaussian):
    for name, std in (("step_std", step_std), ("kl_std", kl_std)):
        if not bool((std > 0).all()):
            raise ValueError(
                f"flow_grpo_loss: {name} must be > 0 for every sample, got {std.tolist()}; "
                "it is the std of the step's Gaussian (sde_step_with_logprob's step_std, or a kl_std you chose)"
            )
    loss, stats = ref.flow_grpo_loss_reference(
        x_next, mean, old_log_prob, advantages, step_std, clip_range, mean_ref, beta, kl_std, gaussian
    )
    coef = ref.flow_grpo_loss_grad_coef(
        stats["ratio"], advantages, step_std, kl_std, clip_range, beta, mean[0].numel(), gaussian,
        has_ref=mean_ref is not None,
    )  # fmt: skip
    return loss, stats["log_prob"], stats["ratio"], stats["kl"], stats["clip_fraction"], coef


@_on_device
def _loss_cuda(x_next, mean, mean_ref, old_log_prob, advantages, step_std, kl_std, clip_range, beta, gaussian):
    args = (x_next, mean, mean_ref, old_log_prob, advantages, step_std, kl_std, clip_range, beta, gaussian)
    if ref.compute_dtype(*args[:7]) == torch.float64:
        return _loss_cpu(*args)
    return _triton_kernels().flow_grpo_loss_forward(*args)


@torch.library.register_fake("uniref::flow_grpo_loss_backward")
def _loss_backward_fake(grad_loss, x_next, mean, mean_ref, grad_coef):
    return torch.empty_like(mean, memory_format=torch.contiguous_format)


def _loss_backward_cpu(grad_loss, x_next, mean, mean_ref, grad_coef):
    return ref.flow_grpo_loss_backward_reference(grad_loss, x_next, mean, mean_ref, grad_coef)


@_on_device
def _loss_backward_cuda(grad_loss, x_next, mean, mean_ref, grad_coef):
    if grad_coef.dtype == torch.float64:
        return _loss_backward_cpu(grad_loss, x_next, mean, mean_ref, grad_coef)
    return _triton_kernels().flow_grpo_loss_backward(grad_loss, x_next, mean, mean_ref, grad_coef)


def _loss_setup(ctx, inputs, output):
    x_next, mean, mean_ref, _old, _adv, _std, _kl_std, _clip, beta, _gaussian = inputs
    _loss, log_prob, ratio, kl, clip_fraction, grad_coef = output
    ctx.mark_non_differentiable(log_prob, ratio, kl, clip_fraction, grad_coef)
    # With beta = 0 the KL term has no gradient: the backward then never reads mean_ref.
    ctx.save_for_backward(x_next, mean, mean_ref if beta != 0 else None, grad_coef)


def _loss_backward(ctx, grad_loss, *_grad_stats):
    x_next, mean, mean_ref, grad_coef = ctx.saved_tensors
    grad_mean = _ops.flow_grpo_loss_backward(grad_loss, x_next, mean, mean_ref, grad_coef)
    # Only `mean` (the current policy's step mean) is differentiated; x_next is a sample and mean_ref
    # belongs to the frozen reference policy.
    return None, grad_mean, None, None, None, None, None, None, None, None


torch.library.register_autograd("uniref::flow_grpo_loss", _loss_backward, setup_context=_loss_setup)

# Device kernels, registered explicitly (torch.library.impl used as a decorator returns None, and the
# CUDA implementations call the CPU ones for float64).
for _name, _cpu, _cuda in (
    ("group_advantages", _group_advantages_cpu, _group_advantages_cuda),
    ("flow_grpo_loss", _loss_cpu, _loss_cuda),
    ("flow_grpo_loss_backward", _loss_backward_cpu, _loss_backward_cuda),
):
    torch.library.register_kernel(f"uniref::{_name}", "cpu", _cpu)
    torch.library.register_kernel(f"uniref::{_name}", "cuda", _cuda)
