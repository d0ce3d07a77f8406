"""Plain-torch reference of varlen attention, shared by the tests and the benchmarks."""

from __future__ import annotations

import torch
from torch import Tensor


def varlen_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, softmax_scale: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale) v per sample, computed in `dtype` (float64 by default).

    Returns ``(out (Tq, H, D) in q's dtype, lse (H, Tq) float32)``; rows of a sample without keys get
    ``out = 0`` and ``lse = -inf``.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=dtype, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        qs = q[q0:q1].to(dtype).transpose(0, 1)  # (H, Lq, D)
        ks = k[k0:k1].to(dtype).transpose(0, 1)
        vs = v[k0:k1].to(dtype).transpose(0, 1)
        scores = qs @ ks.transpose(1, 2) * scale
        lse[:, q0:q1] = torch.logsumexp(scores, dim=-1)
        out[q0:q1] = (torch.softmax(scores, dim=-1) @ vs).transpose(0, 1)
    return out.to(q.dtype), lse.float()
