"""Varlen attention over packed SELF sequences: one flat API, several backends.

Every sample's tokens (text + target + references) attend to each other jointly and never to another
sample's: attention is block-diagonal over the packed batch, non-causal. The kernels are in
csrc/attention/; the backends, their registry and the ``"auto"`` rule in `uniref.attention_backends`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uniref.attention_backends import (
    BACKENDS,
    CUDA_DTYPES,
    CUDA_HEAD_DIMS,
    ENV_BACKEND,
    SUPPORTED_DTYPES,
    AttentionBackend,
    auto_backend,
    available_backends,
    get_backend,
    mean_tokens_per_sample,
    unavailable_reason,
)

__all__ = [
    "BACKENDS",
    "CUDA_DTYPES",
    "CUDA_HEAD_DIMS",
    "ENV_BACKEND",
    "AttentionBackend",
    "auto_backend",
    "available_backends",
    "get_backend",
    "unavailable_reason",
    "varlen_attention",
]


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Block-diagonal (per-sample), non-causal attention over packed sequences, as flash-attn's
    ``flash_attn_varlen_func``.

    For every sample b, with ``Q = q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` and ``K``, ``V`` the rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k and v, and for every head h::

        out[rows of b, h] = softmax(softmax_scale * Q[:, h] @ K[:, h].T) @ V[:, h]
        lse[h, rows of b] = logsumexp(softmax_scale * Q[:, h] @ K[:, h].T, dim=-1)

    Args:
        q: ``(total_q, H, D)`` queries of all samples, packed without padding, sample after sample.
            float32, float16 or bfloat16 (float64 too, except on the ``"cuda"``, ``"flash_attn"`` and
            ``"flex"`` backends). The last dimension should be contiguous (else it is made so, a copy);
            rows and heads may have any stride, e.g. views into a fused qkv projection.
        k: ``(total_k, H, D)`` keys, packed like q; same dtype, device, H and D as q.
        v: ``(total_k, H, D)`` values, k's shape.
        cu_seqlens_q: int32 ``(B + 1,)`` on q's device: sample b owns query rows
            ``[cu_seqlens_q[b], cu_seqlens_q[b+1])``. Starts at 0, non-decreasing, ends at total_q.
        cu_seqlens_k: int32 ``(B + 1,)``, the same for key/value rows. A sample's query and key lengths
            may differ. Zero-length samples are allowed: a sample without queries produces nothing,
            the query rows of a sample without keys get ``out = 0`` and ``lse = -inf``.
        max_seqlen_q: Python int >= every sample's query length (the true maximum is best: CUDA
            kernels size their launch by it).
        max_seqlen_k: Python int >= every sample's key length.
        softmax_scale: the factor on q.k before the softmax; ``None`` means ``D ** -0.5``.
        backend: which implementation runs:

            * ``"auto"`` (default): `auto_backend`'s rule -- ``UNIREF_ATTN_BACKEND`` if set; CPU tensors:
              ``"cpu"``; CUDA tensors: ``"sdpa"`` when the samples are long (on average at least 1024
              tokens without gradients, 4096 with), else ``"cuda"`` for fp16/bf16 with a head dim in
              `CUDA_HEAD_DIMS`, else ``"flash_attn"`` if installed and applicable, else ``"sdpa"``.
            * ``"cpu"``: uniref's C++ kernel (tiled online softmax, fp32 accumulation, OpenMP).
            * ``"cuda"``: uniref's CUDA kernel (`CUDA_DTYPES`: fp16/bf16; head dims `CUDA_HEAD_DIMS`).
            * ``"flash_attn"``: ``flash_attn.flash_attn_varlen_func`` (installed separately, CUDA, fp16/bf16).
            * ``"sdpa"``: one ``torch.nn.functional.scaled_dot_product_attention`` call per sample.
            * ``"flex"``: FlexAttention with a document mask, compiled (forward only on CPU).

            `available_backends` lists those that can run given inputs, `unavailable_reason` says why
            one cannot, `get_backend` gives a backend's constraints.
        return_lse: also return the log-sum-exp.

    Returns:
        ``out``: ``(total_q, H, D)`` in q's dtype, contiguous, or ``(out, lse)`` with ``lse`` float32
        ``(H, total_q)``: the natural log of the sum of exp of the *scaled* scores of each query row.
        ``out`` is differentiable in q, k and v (on every backend but ``"flex"`` on CPU); ``lse`` is
        not differentiable on the ``"cpu"`` and ``"cuda"`` backends.

    Raises:
        ValueError: wrong shapes, dtypes or devices; cu_seqlens that are not int32 ``(B + 1,)`` on q's
            device; an unknown or unavailable backend (the message says why and lists the available ones).
        ValueError or RuntimeError: offsets that do not start at 0, decrease, end elsewhere than at the
            row count, or hold a sample longer than its max_seqlen -- ValueError on ``"sdpa"`` and
            ``"flex"``, RuntimeError from the op on ``"cpu"``. ``"cuda"`` and ``"flash_attn"`` do not
            read offsets on the host (that would synchronize with the device): check them yourself.

    Example::

        >>> lens = [300, 1200]
        >>> cu = torch.tensor([0, 300, 1500], dtype=torch.int32)
        >>> q, k, v = (torch.randn(1500, 8, 64) for _ in range(3))
        >>> out = uniref.varlen_attention(q, k, v, cu, cu, 1200, 1200)   # (1500, 8, 64)
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"varlen_attention: {name} must be a (total, heads, head_dim) tensor, got {got}")
    if k.shape != v.shape:
        raise ValueError(
            f"varlen_attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"varlen_attention: q has {q.shape[1]} heads but k/v have {k.shape[1]} (grouped-query attention is "
            "not supported; repeat the k/v heads first)"
        )
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"varlen_attention: q has head_dim {q.shape[2]} but k/v have {k.shape[2]}")
    if q.shape[1] == 0 or q.shape[2] == 0:
        raise ValueError(f"varlen_attention: heads and head_dim must be positive, got q {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"varlen_attention: q, k, v must share one of {SUPPORTED_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(f"varlen_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 1:
            got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
            raise ValueError(
                f"varlen_attention: {name} must be a 1-D int32 tensor of B+1 offsets, got {got}; build it with "
                "torch.tensor(offsets, dtype=torch.int32)"
            )
        if cu.device != q.device:
            raise ValueError(
                f"varlen_attention: {name} is on {cu.device} but q is on {q.device}; move it with .to(q.device)"
            )
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"varlen_attention: cu_seqlens_q has {cu_seqlens_q.shape[0]} entries but cu_seqlens_k has "
            f"{cu_seqlens_k.shape[0]}; both need B+1"
        )
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or n < 0:
            raise ValueError(f"varlen_attention: {name} must be a non-negative Python int, got {n!r}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"varlen_attention: softmax_scale must be finite, got {softmax_scale}")

    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if backend == "auto":
        chosen = auto_backend(q.device, q.dtype, q.shape[2], mean_tokens_per_sample(q, k, cu_seqlens_q), needs_grad)
    elif backend in BACKENDS:
        chosen = backend
    else:
        raise ValueError(f"varlen_attention: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    reason = unavailable_reason(chosen, q.device, q.dtype, q.shape[2])
    if reason is not None:
        # "auto" only ever picks an unavailable backend when the environment forces it.
        origin = f" ({ENV_BACKEND} is set to it)" if backend == "auto" else ""
        raise ValueError(
            f"varlen_attention: backend {chosen!r}{origin} is not available for {q.dtype} head_dim={q.shape[2]} "
            f"on {q.device}: {reason}; available: {available_backends(q.device, q.dtype, q.shape[2])}"
        )
    impl = get_backend(chosen)
    if needs_grad and not impl.differentiates_on(q.device.type):
        can = [name for name in available_backends(q.device, q.dtype, q.shape[2])
               if get_backend(name).differentiates_on(q.device.type)]  # fmt: skip
        raise RuntimeError(
            f"varlen_attention: backend={chosen!r} cannot differentiate on {q.device.type.upper()} ({impl.label} "
            f"runs only forward there); use backend={' or '.join(map(repr, can))}, or call it under torch.no_grad()"
        )
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, lse = impl.run(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale, return_lse)
    return (out, lse) if return_lse else out
