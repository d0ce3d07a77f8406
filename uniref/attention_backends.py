"""The backends of `uniref.varlen_attention`: one registry, each backend registered once with its constraints.

A backend is its run function plus what it can run -- devices, dtypes, head dims, whether it differentiates
on a device, and a check that it exists at all (a compiled kernel, an installed package). `BACKENDS`,
`available_backends`, `unavailable_reason`, the ``"auto"`` rule and the run table all read the registry,
as diffusers' attention dispatcher reads its own.

* ``"cpu"``, ``"cuda"``: uniref's C++ / CUDA kernels (the ops ``uniref::varlen_attn_fwd`` / ``_bwd``; their
  fake kernels and autograd are in `uniref.ops.attention`). The CUDA kernel's head dims and dtypes come
  from the compiled extension, which instantiates exactly those (csrc/attention/varlen_attn_cuda_support.h).
* ``"flash_attn"``: ``flash_attn.flash_attn_varlen_func``, imported on first use.
* ``"sdpa"``: one ``F.scaled_dot_product_attention`` call per sample (PyTorch picks cuDNN / flash /
  efficient / math inside); differentiable by autograd.
* ``"flex"``: FlexAttention over the whole packed batch with a document mask, compiled.

Availability is decided once at import: the checks must stay traceable by torch.compile.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from uniref import _C  # (loading it also registers torch.ops.uniref.*)

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
]

ENV_BACKEND = "UNIREF_ATTN_BACKEND"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# What the CUDA kernel instantiates, as the compiled extension reports it (one list, in C++).
CUDA_HEAD_DIMS: tuple[int, ...] = tuple(_C.cuda_attention_head_dims)
CUDA_DTYPES: tuple[torch.dtype, ...] = tuple(getattr(torch, name) for name in _C.cuda_attention_dtypes)
_HALF = (torch.float16, torch.bfloat16)

_HAS_KERNEL = {
    device: torch._C._dispatch_has_kernel_for_dispatch_key("uniref::varlen_attn_fwd", key)
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
}
_FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None

# (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, return_lse) -> (out, lse | None)
RunFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, int, float, bool], "tuple[Tensor, Tensor | None]"]


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """One backend of `uniref.varlen_attention` and what it can run.

    Attributes:
        name: the ``backend=`` value.
        run: the implementation, on validated arguments (see `RunFn`); returns ``(out, lse or None)``.
        label: how messages name it ("the CUDA kernel").
        devices: device types it runs (``("cuda",)``), or None for every device.
        dtypes: input dtypes it takes.
        head_dim_ok: whether it takes a head dim, and `head_dims` the rule in words for messages; None: every one.
        grad_devices: device types on which it differentiates, or None for every device it runs.
        missing: why it cannot run at all in this install (a kernel not built, a package not installed),
            or None; evaluated at import, like every check here.
    """

    name: str
    run: RunFn
    label: str
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    head_dim_ok: Callable[[int], bool] | None = None
    head_dims: str = ""
    grad_devices: tuple[str, ...] | None = None
    missing: Callable[[], str | None] = lambda: None

    def unavailable_reason(self, device_type: str, dtype: torch.dtype, head_dim: int) -> str | None:
        """Every constraint these inputs break, joined by "; ", or None when the backend can run them."""
        reasons = []
        if self.devices is not None and device_type not in self.devices:
            names = "/".join(d.upper() for d in self.devices)
            reasons.append(f"{self.label} runs {names} tensors, these are on {device_type}")
        missing = self.missing()
        if missing is not None:
            reasons.append(missing)
        if dtype not in self.dtypes:
            names = "/".join(str(t).removeprefix("torch.") for t in self.dtypes)
            reasons.append(f"{self.label} does not take {str(dtype).removeprefix('torch.')} (it takes {names})")
        if self.head_dim_ok is not None and not self.head_dim_ok(head_dim):
            reasons.append(f"{self.label} supports head_dim {self.head_dims}, got {head_dim}")
        return "; ".join(reasons) or None

    def differentiates_on(self, device_type: str) -> bool:
        return self.grad_devices is None or device_type in self.grad_devices


_REGISTRY: dict[str, AttentionBackend] = {}


def register_backend(name: str, **constraints) -> Callable[[RunFn], RunFn]:
    """Decorator: registers ``fn`` as backend `name` with `AttentionBackend`'s constraint fields."""

    def decorator(fn: RunFn) -> RunFn:
        if name in _REGISTRY:
            raise ValueError(f"attention backend {name!r} is registered twice")
        _REGISTRY[name] = AttentionBackend(name=name, run=fn, **constraints)
        return fn

    return decorator


def get_backend(name: str) -> AttentionBackend:
    """The registered backend `name`; ValueError naming the backends if there is none."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; the backends are {tuple(_REGISTRY)}")
    return _REGISTRY[name]


def unavailable_reason(backend: str, device: torch.device | str, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why `backend` cannot run inputs of this device, dtype and head dim, or None if it can."""
    if backend not in _REGISTRY:
        return f"unknown backend; the backends are {BACKENDS}"
    return _REGISTRY[backend].unavailable_reason(torch.device(device).type, dtype, head_dim)


def available_backends(device: torch.device | str, dtype: torch.dtype = torch.float32, head_dim: int = 64) -> list[str]:
    """The backends that can run inputs of this device, dtype and head dim, in the order of `BACKENDS`.

    A backend listed here may still run forward only on this device (``"flex"`` on CPU): see
    `AttentionBackend.grad_devices`."""
    return [name for name in _REGISTRY if unavailable_reason(name, device, dtype, head_dim) is None]


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
    device: torch.device | str,
    dtype: torch.dtype,
    head_dim: int,
    tokens_per_sample: float | None = None,
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
       a dtype in `CUDA_DTYPES` and a head dim in `CUDA_HEAD_DIMS` when it is built; else ``"flash_attn"``
       when installed and applicable; else ``"sdpa"``.

    Inside ``torch.compile`` rule 3 is skipped: the per-sample loop reads the offsets on the host, which
    breaks the graph. `benchmarks/gpu/attention.py` times ``"auto"`` against every peer, which is how this
    rule is checked.
    """
    forced = os.environ.get(ENV_BACKEND, "").strip()
    if forced and forced != "auto":
        if forced not in _REGISTRY:
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


# ---- the backends, each registered once --------------------------------------------------------------------


def _ours(q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse):
    out, lse = torch.ops.uniref.varlen_attn_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale)
    return out, lse


register_backend(
    "cpu", label="uniref's C++ kernel", devices=("cpu",),
    missing=lambda: None if _HAS_KERNEL["cpu"] else "uniref's C++ kernel is not registered (a broken build)",
)(_ours)  # fmt: skip
register_backend(
    "cuda", label="the CUDA kernel", devices=("cuda",), dtypes=CUDA_DTYPES,
    head_dim_ok=lambda d: d in CUDA_HEAD_DIMS, head_dims=f"in {CUDA_HEAD_DIMS}",
    missing=lambda: None if _HAS_KERNEL["cuda"] else (
        "uniref was built without its CUDA kernels (build on a machine with nvcc, UNIREF_CUDA=1)"),
)(_ours)  # fmt: skip


@register_backend(
    "flash_attn", label="flash-attn", devices=("cuda",), dtypes=_HALF,
    head_dim_ok=lambda d: d <= 256 and d % 8 == 0, head_dims="<= 256 and a multiple of 8",
    missing=lambda: None if _FLASH_ATTN_INSTALLED else (
        "flash_attn is not installed (pip install flash-attn --no-build-isolation)"),
)  # fmt: skip
def _flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse):
    from flash_attn import flash_attn_varlen_func

    res = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, return_attn_probs=return_lse)
    return (res[0], res[1]) if return_lse else (res, None)


@register_backend("sdpa", label="SDPA")
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


# FlexAttention has no backward on CPU (it runs forward only there).
@register_backend("flex", label="FlexAttention", dtypes=(torch.float32, torch.float16, torch.bfloat16),
                  grad_devices=("cuda",))  # fmt: skip
def _flex(q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse):
    global _flex_compiled
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    cq = host_offsets(cu_q, "cu_seqlens_q", q.shape[0], max_q)
    ck = host_offsets(cu_k, "cu_seqlens_k", k.shape[0], max_k)
    if q.shape[0] == 0 or k.shape[0] == 0:  # nothing to attend to: the kernels' definition
        lse = q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32)
        return q.new_zeros(q.shape), (lse if return_lse else None)
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


BACKENDS: tuple[str, ...] = tuple(_REGISTRY)
# Every dtype some backend takes: what varlen_attention accepts before it picks one.
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(
    t for t in FLOAT_DTYPES if any(t in backend.dtypes for backend in _REGISTRY.values())
)
