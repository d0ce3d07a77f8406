"""Varlen attention: fake kernels and autograd of the ops, and the backends behind `uniref.varlen_attention`.

Ops (schemas in csrc/ops.cpp, kernels in csrc/attention/):
* ``uniref::varlen_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
  -> (out, lse)``; ``uniref::varlen_attn_bwd(grad_out, q, k, v, out, lse, ...) -> (dq, dk, dv)``.
* Autograd differentiates ``out`` in q, k and v through ``varlen_attn_bwd``; ``lse`` is an output for
  inspection (and for the backward), not differentiable.

Backends (one function each, all with the signature of `run_backend`):
* ``"cpu"``, ``"cuda"``: the ops above (uniref's C++ / CUDA kernels).
* ``"flash_attn"``: ``flash_attn.flash_attn_varlen_func``, imported on first use.
* ``"sdpa"``: one ``F.scaled_dot_product_attention`` call per sample (PyTorch picks cuDNN / flash /
  efficient / math inside); differentiable by autograd.
* ``"flex"``: FlexAttention over the whole packed batch with a document mask, compiled.
"""

from __future__ import annotations

import collections
import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor

_ops = torch.ops.uniref

# ---- the ops: fake kernels and autograd ------------------------------------------------------------------


@torch.library.register_fake("uniref::varlen_attn_fwd")
def _fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.register_fake("uniref::varlen_attn_bwd")
def _bwd_fake(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, scale = ctx.args
    # The kernels need a contiguous last dimension; a gradient arriving through a transpose may lack one.
    dq, dk, dv = _ops.varlen_attn_bwd(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("uniref::varlen_attn_fwd", _backward, setup_context=_setup)

# ---- availability (decided once at import: the checks must stay traceable by torch.compile) -----------------

BACKENDS = ("cpu", "cuda", "flash_attn", "sdpa", "flex")
ENV_BACKEND = "UNIREF_ATTN_BACKEND"

_HAS_KERNEL = {
    device: torch._C._dispatch_has_kernel_for_dispatch_key("uniref::varlen_attn_fwd", key)
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}
_FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None
_HALF = (torch.float16, torch.bfloat16)
# Head dims the CUDA kernel instantiates (csrc/attention/, the CUDA files); others take the next backend.
CUDA_HEAD_DIMS = (32, 64, 128)


def unavailable_reason(backend: str, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why `backend` cannot run inputs of this device, dtype and head dim, or None if it can."""
    device_type = torch.device(device).type
    if backend == "cpu":
        return None if device_type == "cpu" else f"it runs CPU tensors, these are on {device_type}"
    if backend == "cuda":
        if device_type != "cuda":
            return f"it runs CUDA tensors, these are on {device_type}"
        if not _HAS_KERNEL["cuda"]:
            return "uniref was built without its CUDA kernels (build on a machine with nvcc, UNIREF_CUDA=1)"
        if dtype not in _HALF:
            return f"the CUDA kernel takes float16/bfloat16, got {dtype}"
        if head_dim not in CUDA_HEAD_DIMS:
            return f"the CUDA kernel supports head_dim in {CUDA_HEAD_DIMS}, got {head_dim}"
        return None
    if backend == "flash_attn":
        if not _FLASH_ATTN_INSTALLED:
            return "flash_attn is not installed (pip install flash-attn --no-build-isolation)"
        if device_type != "cuda":
            return f"flash-attn runs CUDA tensors, these are on {device_type}"
        if dtype not in _HALF:
            return f"flash-attn takes float16/bfloat16, got {dtype}"
        if head_dim > 256 or head_dim % 8:
            return f"flash-attn supports head_dim <= 256 and a multiple of 8, got {head_dim}"
        return None
    if backend == "sdpa":
        return None
    if backend == "flex":
        if dtype == torch.float64:
            return "FlexAttention does not take float64"
        return None
    return f"unknown backend; the backends are {BACKENDS}"


def available_backends(device: torch.device | str, dtype: torch.dtype = torch.float32, head_dim: int = 64) -> list[str]:
    """The backends that can run inputs of this device, dtype and head dim, in the order of `BACKENDS`.

    ``"flex"`` is listed on CPU too, but FlexAttention runs only forward (no gradients) there."""
    return [name for name in BACKENDS if unavailable_reason(name, device, dtype, head_dim) is None]


# Mean tokens per sample from which one SDPA call per sample (cuDNN inside PyTorch) beats uniref's CUDA
# kernel on an H100, forward only / forward + backward. Measured by benchmarks/gpu/attention.py
# (benchmarks/results/attention_h100.md): SDPA per sample wins at ~1900 tokens forward but loses there
# forward + backward; it wins both from ~7200 tokens and loses both at ~500.
SDPA_MIN_TOKENS_INFERENCE = 1024
SDPA_MIN_TOKENS_TRAINING = 4096


def mean_tokens_per_sample(q: Tensor, k: Tensor, cu_seqlens_q: Tensor) -> float:
    """The shape `auto_backend` decides on: mean query and key rows per sample (no device sync)."""
    batch = cu_seqlens_q.shape[0] - 1
    return (q.shape[0] + k.shape[0]) / (2 * batch) if batch > 0 else 0.0


def auto_backend(
    device: torch.device | str, dtype: torch.dtype, head_dim: int, tokens_per_sample: float | None = None,
    needs_grad: bool = False,
) -> str:
    """The rule behind ``backend="auto"``:

    1. ``UNIREF_ATTN_BACKEND`` when set (to anything but ``"auto"``), whatever the inputs;
    2. CPU tensors: ``"cpu"`` (uniref's C++ kernel; every dtype, every head dim);
    3. CUDA tensors, outside ``torch.compile``, when the samples are long -- ``tokens_per_sample``
       (mean query and key rows per sample) at least `SDPA_MIN_TOKENS_TRAINING` when gradients are
       needed, `SDPA_MIN_TOKENS_INFERENCE` otherwise: ``"sdpa"``. One SDPA call per sample runs cuDNN's
       attention, the fastest measured on an H100 at these lengths (581-592 TFLOP/s forward, vs 311-327
       for uniref's kernel), and its per-call overhead is small against such samples' work;
    4. CUDA tensors otherwise: ``"cuda"`` (uniref's kernel: one launch for the whole packed batch) for
       float16/bfloat16 with a head dim in `CUDA_HEAD_DIMS` when it is built; else ``"flash_attn"`` when
       installed and applicable; else ``"sdpa"``.

    Inside ``torch.compile`` rule 3 is skipped: the per-sample loop reads the offsets on the host, which
    breaks the graph. `benchmarks/gpu/attention.py` times ``"auto"`` against every peer, which is how this
    rule is checked.
    """
    forced = os.environ.get(ENV_BACKEND, "").strip()
    if forced and forced != "auto":
        if forced not in BACKENDS:
            raise ValueError(
                f"{ENV_BACKEND}={forced!r} is not a varlen_attention backend; use one of {BACKENDS} or auto"
            )
        return forced
    if torch.device(device).type == "cpu":
        return "cpu"
    long_from = SDPA_MIN_TOKENS_TRAINING if needs_grad else SDPA_MIN_TOKENS_INFERENCE
    if tokens_per_sample is not None and tokens_per_sample >= long_from and not torch.compiler.is_compiling():
        return "sdpa"
    for name in ("cuda", "flash_attn"):
        if unavailable_reason(name, device, dtype, head_dim) is None:
            return name
    return "sdpa"


def run_backend(
    backend: str, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, scale: float,
    return_lse: bool,
) -> tuple[Tensor, Tensor | None]:
    """Runs one backend on validated arguments; returns ``(out, lse or None)``."""
    return _RUN[backend](q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse)


# ---- the backends -----------------------------------------------------------------------------------------


def _ours(q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse):
    out, lse = _ops.varlen_attn_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale)
    return out, lse


def host_offsets(cu: Tensor, name: str, total: int, max_seqlen: int) -> list[int]:
    """cu_seqlens as a Python list, checked as the ops check it (for the backends that need host offsets)."""
    offsets = cu.tolist()
    if offsets[0] != 0:
        raise ValueError(f"varlen_attention: {name}[0] must be 0, got {offsets[0]}")
    for b, (start, end) in enumerate(zip(offsets, offsets[1:])):
        if end < start:
            raise ValueError(
                f"varlen_attention: {name} must be non-decreasing, but {name}[{b + 1}]={end} < {name}[{b}]={start}"
            )
        if end - start > max_seqlen:
            raise ValueError(
                f"varlen_attention: sample {b} has {end - start} rows by {name}, more than max_seqlen={max_seqlen}; "
                "pass the true maximum length"
            )
    if offsets[-1] != total:
        raise ValueError(f"varlen_attention: {name}[-1]={offsets[-1]} must equal the number of rows, {total}")
    return offsets


def _sdpa(q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse):
    cq = host_offsets(cu_q, "cu_seqlens_q", q.shape[0], max_q)
    ck = host_offsets(cu_k, "cu_seqlens_k", k.shape[0], max_k)
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs = q[cq[b] : cq[b + 1]].transpose(0, 1)  # (H, Lq, D)
        ks, vs = (t[ck[b] : ck[b + 1]].transpose(0, 1) for t in (k, v))
        if ks.shape[1] == 0:  # softmax over no keys: out 0, lse -inf, as the kernels define it
            outs.append(torch.zeros_like(qs).transpose(0, 1))
            lses.append(qs.new_full(qs.shape[:2], float("-inf"), dtype=torch.float32))
            continue
        # 4-D (1, H, L, D): PyTorch's fused CPU kernel takes only batched inputs (3-D runs the math path).
        outs.append(F.scaled_dot_product_attention(qs[None], ks[None], vs[None], scale=scale)[0].transpose(0, 1))
        if return_lse:  # SDPA does not return it: recompute in fp32 (this backend is the reference, not fast)
            lses.append(torch.logsumexp((qs.float() @ ks.float().transpose(1, 2)) * scale, dim=-1))
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    lse = None
    if return_lse:
        lse = torch.cat(lses, dim=1) if lses else q.new_zeros((q.shape[1], 0), dtype=torch.float32)
    return out, lse


_FLEX_MASKS: collections.OrderedDict = collections.OrderedDict()
_FLEX_MASK_CACHE = 16
_flex_compiled = None


def _flex_block_mask(cq: list[int], ck: list[int], tq: int, tk: int, device: torch.device):
    """The document BlockMask of this segmentation. Cached: every layer of a model shares one
    segmentation, and building a mask evaluates the mask function on every (query, key) block."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (str(device), tuple(cq), tuple(ck))
    if key in _FLEX_MASKS:
        _FLEX_MASKS.move_to_end(key)
        return _FLEX_MASKS[key]
    samples = torch.arange(len(cq) - 1, device=device)
    doc_q = torch.repeat_interleave(samples, torch.tensor(cq, device=device).diff(), output_size=tq)
    doc_k = torch.repeat_interleave(samples, torch.tensor(ck, device=device).diff(), output_size=tk)

    def same_sample(b, h, q_idx, kv_idx):
        return doc_q[q_idx] == doc_k[kv_idx]

    mask = create_block_mask(same_sample, None, None, tq, tk, device=device)
    _FLEX_MASKS[key] = mask
    if len(_FLEX_MASKS) > _FLEX_MASK_CACHE:
        _FLEX_MASKS.popitem(last=False)
    return mask


def _flex(q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse):
    global _flex_compiled
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    cq = host_offsets(cu_q, "cu_seqlens_q", q.shape[0], max_q)
    ck = host_offsets(cu_k, "cu_seqlens_k", k.shape[0], max_k)
    if q.shape[0] == 0 or k.shape[0] == 0:  # nothing to attend to: the kernels' definition
        lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32)
        return q.new_zeros(q.shape), (lse if return_lse else None)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type == "cpu" and needs_grad:
        raise RuntimeError(
            "varlen_attention: backend='flex' cannot differentiate on CPU (FlexAttention runs only forward "
            "there); use backend='cpu' or 'sdpa', or call it under torch.no_grad()"
        )
    mask = _flex_block_mask(cq, ck, q.shape[0], k.shape[0], q.device)
    # FlexAttention is fast only compiled. Compile it once; inside a compiled caller use it as it is.
    # On CPU, compiled FlexAttention cannot return the lse: that case runs unfused.
    fn = flex_attention
    if not torch.compiler.is_compiling() and not (q.device.type == "cpu" and return_lse):
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention)
        fn = _flex_compiled
    res = fn(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask, scale=scale,
        return_aux=AuxRequest(lse=True) if return_lse else None,
    )  # fmt: skip
    out, lse = (res[0], res[1].lse[0].float()) if return_lse else (res, None)
    return out[0].transpose(0, 1).contiguous(), lse


def _flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse):
    from flash_attn import flash_attn_varlen_func

    res = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, return_attn_probs=return_lse)
    return (res[0], res[1]) if return_lse else (res, None)


_RUN = {"cpu": _ours, "cuda": _ours, "flash_attn": _flash_attn, "sdpa": _sdpa, "flex": _flex}
