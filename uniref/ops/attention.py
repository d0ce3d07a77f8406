"""Fake kernels and autograd for the varlen attention ops (`uniref::varlen_attn_fwd/bwd`)."""

from __future__ import annotations

import torch
from torch import Tensor

_ops = torch.ops.uniref


@torch.library.register_fake("uniref::varlen_attn_fwd")
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (q.shape[1], q.shape[0]), dtype=torch.float32
    )


@torch.library.register_fake("uniref::varlen_attn_bwd")
def _bwd_fake(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return like(q), like(k), like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, scale = ctx.args
    dq, dk, dv = _ops.varlen_attn_bwd(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("uniref::varlen_attn_fwd", _backward, setup_context=_setup)


def has_kernel(device_type: str) -> bool:
    """Whether uniref's own varlen attention kernel is built for this device type ("cpu", "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("uniref::varlen_attn_fwd", key)
