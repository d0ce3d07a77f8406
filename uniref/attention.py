"""Varlen attention over packed SELF sequences: one flat API, several backends.

Every sample's tokens (text + target + references) attend to each other jointly and never to another
sample's: attention is block-diagonal over the packed batch, non-causal.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from uniref.ops import attention as _attention_ops

BACKENDS = ("auto", "cpu", "cuda", "flash_attn", "sdpa", "flex")
ENV_BACKEND = "UNIREF_ATTN_BACKEND"


# Head dims our CUDA kernel is instantiated for (csrc/attention/varlen_attn_configs.cuh).
CUDA_HEAD_DIMS = (32, 64, 128)


def available_backends(
    device: torch.device | str, dtype: torch.dtype = torch.float32, head_dim: int | None = None
) -> list[str]:
    """The backends that can run on `device` with `dtype` (and `head_dim`, when given), in the order
    `"auto"` prefers them."""
    device = torch.device(device)
    found = []
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half and head_dim in (None, *CUDA_HEAD_DIMS) and _attention_ops.has_kernel("cuda"):
        found.append("cuda")
    if device.type == "cuda" and half and importlib.util.find_spec("flash_attn"):
        found.append("flash_attn")
    if device.type == "cpu" and _attention_ops.has_kernel("cpu"):
        found.append("cpu")
    found += ["sdpa", "flex"]
    return found


def choose_backend(device: torch.device | str, dtype: torch.dtype, head_dim: int | None = None) -> str:
    """The `"auto"` rule: ``UNIREF_ATTN_BACKEND`` if set; else, on CUDA with fp16/bf16 and a head dim
    it is built for, our CUDA kernel, then flash-attn when installed; on CPU our C++ kernel; otherwise
    one SDPA call per sample (cuDNN or flash inside PyTorch, the fastest peer measured on an H100 for
    the shapes of a SELF batch)."""
    forced = os.environ.get(ENV_BACKEND)
    if forced:
        return forced
    return available_backends(device, dtype, head_dim)[0]


def _check_backend(backend: str, q: Tensor) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"varlen_attention: backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("cpu", "cuda") and q.device.type != backend:
        raise ValueError(f"varlen_attention: backend={backend!r} needs {backend} tensors, got {q.device}")
    found = available_backends(q.device, q.dtype, q.shape[-1])
    if backend != "auto" and backend not in found:
        raise ValueError(
            f"varlen_attention: backend {backend!r} is not available for {q.dtype}, head_dim {q.shape[-1]} on "
            f"{q.device}; available: {found}"
        )


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
    """Block-diagonal (per-sample) attention over packed sequences, as flash-attn's varlen function.

    Args:
        q: ``(Tq, H, D)`` queries of all samples, packed without padding.
        k, v: ``(Tk, H, D)`` keys and values; a sample's query and key lengths may differ.
        cu_seqlens_q, cu_seqlens_k: int32 ``(B + 1,)`` offsets: sample b owns query rows
            ``[cu_seqlens_q[b], cu_seqlens_q[b+1])`` and key rows ``[cu_seqlens_k[b], cu_seqlens_k[b+1])``.
            Zero-length samples are allowed; query rows of a sample without keys get zeros.
        max_seqlen_q, max_seqlen_k: Python ints, the longest sample of each.
        softmax_scale: defaults to ``D ** -0.5``.
        backend: ``"auto"`` (see `choose_backend`; ``UNIREF_ATTN_BACKEND`` overrides it), ``"cpu"`` /
            ``"cuda"`` (uniref's kernels), ``"flash_attn"`` (if installed), ``"sdpa"`` (one
            ``scaled_dot_product_attention`` call per sample) or ``"flex"`` (FlexAttention with a
            document mask).
        return_lse: also return the float32 log-sum-exp ``(H, Tq)`` of the scaled scores.

    Returns:
        ``out (Tq, H, D)`` in q's dtype, or ``(out, lse)``. Differentiable in q, k and v.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"varlen_attention: {name} must be a (total, heads, head_dim) tensor")
    if k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(
            f"varlen_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share heads and "
            "head_dim, and k and v must have the same shape"
        )
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1:
            raise ValueError(f"varlen_attention: {name} must be a 1-D int32 tensor of offsets (B+1,)")
        if cu.device != q.device:
            raise ValueError(f"varlen_attention: {name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError("varlen_attention: cu_seqlens_q and cu_seqlens_k must both have B+1 entries")
    _check_backend(backend, q)
    if backend == "auto":
        backend = choose_backend(q.device, q.dtype, q.shape[-1])
        _check_backend(backend, q)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    run = {"cpu": _ours, "cuda": _ours, "sdpa": _sdpa, "flex": _flex, "flash_attn": _flash_attn}[backend]
    out, lse = run(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), scale, return_lse)
    return (out, lse) if return_lse else out


def _ours(q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse):
    return torch.ops.uniref.varlen_attn_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale)


def _host_offsets(cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int) -> tuple[list[int], list[int]]:
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for name, c, total, longest in (("cu_seqlens_q", cq, None, max_q), ("cu_seqlens_k", ck, None, max_k)):
        if c[0] != 0 or any(b < a for a, b in zip(c, c[1:])):
            raise ValueError(f"varlen_attention: {name} must start at 0 and be non-decreasing, got {c}")
        if any(b - a > longest for a, b in zip(c, c[1:])):
            raise ValueError(f"varlen_attention: a sample in {name} is longer than its max_seqlen={longest}")
    return cq, ck


def _sdpa(q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse):
    cq, ck = _host_offsets(cu_q, cu_k, max_q, max_k)
    if cq[-1] != q.shape[0] or ck[-1] != k.shape[0]:
        raise ValueError("varlen_attention: the last offsets must equal the number of rows of q and k")
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs, ks, vs = (t[s0:s1].transpose(0, 1) for t, (s0, s1) in ((q, cq[b : b + 2]), (k, ck[b : b + 2]), (v, ck[b : b + 2])))
        if ks.shape[1] == 0:
            outs.append(torch.zeros_like(qs).transpose(0, 1))
            lses.append(qs.new_full((qs.shape[0], qs.shape[1]), float("-inf"), dtype=torch.float32))
            continue
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(0, 1))
        if return_lse:
            scores = (qs.float() @ ks.float().transpose(1, 2)) * scale
            lses.append(torch.logsumexp(scores, dim=-1))
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, dim=1) if return_lse and lses else None
    return out, lse


@functools.lru_cache(maxsize=8)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse):
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    doc_q = torch.searchsorted(cu_q[1:], torch.arange(q.shape[0], device=q.device, dtype=torch.int32), right=True)
    doc_k = torch.searchsorted(cu_k[1:], torch.arange(k.shape[0], device=k.device, dtype=torch.int32), right=True)

    def same_sample(b, h, q_idx, kv_idx):
        return doc_q[q_idx] == doc_k[kv_idx]

    mask = create_block_mask(same_sample, None, None, q.shape[0], k.shape[0], device=q.device)
    fn = _compiled_flex() if q.device.type == "cuda" else flex_attention
    aux = AuxRequest(lse=True) if return_lse else None
    res = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask,
             scale=scale, return_aux=aux)
    out, lse = (res[0], res[1].lse) if return_lse else (res, None)
    return out[0].transpose(0, 1), (lse[0].float() if lse is not None else None)


def _flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse):
    from flash_attn import flash_attn_varlen_func

    res = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, return_attn_probs=return_lse)
    return (res[0], res[1]) if return_lse else (res, None)
