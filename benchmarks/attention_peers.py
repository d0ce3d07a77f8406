"""Benchmark-only helpers for varlen attention: the FLOP count the TFLOP/s columns use, the padded peer,
and a forward + backward step. Shared by benchmarks/test_attention.py and benchmarks/gpu/attention.py."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def attention_flops(q_lens: Sequence[int], k_lens: Sequence[int], heads: int, head_dim: int) -> int:
    """Useful forward FLOPs, as docs/gpu_anchors.md counts them: 4 * sum(Lq * Lk) * H * D
    (two matmuls); forward + backward is 3.5x that."""
    return 4 * sum(a * b for a, b in zip(q_lens, k_lens)) * heads * head_dim


def padded_sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, softmax_scale: float | None = None
) -> Tensor:
    """The padded way, a benchmark peer: pad every sample to the longest, one batched SDPA call with a key
    mask, unpad. Returns ``out (Tq, H, D)``; differentiable. Samples without keys are not supported
    (their fully masked rows come out NaN)."""
    lq, lk = cu_seqlens_q.diff().tolist(), cu_seqlens_k.diff().tolist()
    pad = torch.nn.utils.rnn.pad_sequence
    qp, kp, vp = (pad(t.split(lengths), batch_first=True).transpose(1, 2) for t, lengths in ((q, lq), (k, lk), (v, lk)))
    keys = torch.arange(kp.shape[2], device=q.device)[None] < torch.tensor(lk, device=q.device)[:, None]
    mask = keys[:, None, None]  # (B, 1, 1, Lk): every query row sees its sample's real keys
    out = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=softmax_scale)
    return torch.cat([out[b, :, :n].transpose(0, 1) for b, n in enumerate(lq)])


def fwd_bwd_step(fn, q: Tensor, k: Tensor, v: Tensor, *rest):
    """A benchmark step: forward of ``fn(q, k, v, *rest)`` then backward of a fixed random gradient, on
    fresh leaves. Returns ``(step, leaves, grad)``; ``step()`` clears the leaves' gradients first."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves, *rest).backward(grad)

    return step, leaves, grad
