"""Plain-torch reference of varlen attention and the packed inputs, shared by the tests and the benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from uniref.packing import cu_seqlens_from_lengths


def varlen_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    softmax_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale) v per sample, with plain matmuls computed in `dtype` (float64 by default).

    Returns ``(out (Tq, H, D) in q's dtype, lse (H, Tq) float32)``; rows of a sample without keys get
    ``out = 0`` and ``lse = -inf``. Differentiable in q, k, v by autograd.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs = q[cq[b] : cq[b + 1]].to(dtype).transpose(0, 1)  # (H, Lq, D)
        ks, vs = (t[ck[b] : ck[b + 1]].to(dtype).transpose(0, 1) for t in (k, v))
        if ks.shape[1] == 0:
            outs.append(qs * 0)  # zeros that keep q in the graph: its gradient is 0, not missing
            lses.append(torch.full(qs.shape[:2], float("-inf"), dtype=dtype, device=q.device))
            continue
        scores = qs @ ks.transpose(1, 2) * scale
        lses.append(torch.logsumexp(scores, dim=-1))
        outs.append(torch.softmax(scores, dim=-1) @ vs)
    if not outs:  # B = 0
        return q.new_zeros(q.shape), torch.zeros((q.shape[1], 0), device=q.device)
    out = torch.cat(outs, dim=1).transpose(0, 1)
    return out.to(q.dtype), torch.cat(lses, dim=1).float()


def make_varlen_inputs(
    q_lens: Sequence[int],
    k_lens: Sequence[int] | None = None,
    heads: int = 8,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int, int]:
    """Random packed ``(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)``; k_lens
    defaults to q_lens (self-attention). Values are drawn in float32 on the CPU, then cast and moved,
    so every dtype and device sees the same numbers."""
    k_lens = list(q_lens) if k_lens is None else list(k_lens)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(sum(n), heads, head_dim, generator=g).to(device=device, dtype=dtype)
        for n in (q_lens, k_lens, k_lens)
    )
    cu_q, cu_k = cu_seqlens_from_lengths(q_lens, device), cu_seqlens_from_lengths(k_lens, device)
    return q, k, v, cu_q, cu_k, max(q_lens, default=0), max(k_lens, default=0)
