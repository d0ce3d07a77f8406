"""Varlen attention ops: fake kernels, autograd and the choice of CPU kernels (schemas in csrc/ops.cpp,
kernels in csrc/attention/).

* ``uniref::varlen_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale)
  -> (out, lse)``; ``uniref::varlen_attn_bwd(grad_out, q, k, v, out, lse, ...) -> (dq, dk, dv)``.
* Autograd differentiates ``out`` in q, k and v through ``varlen_attn_bwd``; ``lse`` is an output for
  inspection (and for the backward), not differentiable.
* On import, the CPU ops switch to the widest build of their kernels that this CPU runs (a portable build
  carries x86-64-v3 and -v4 ones; csrc/attention/varlen_attn_cpu_dispatch.h).

The backends behind `uniref.varlen_attention` and their registry live in `uniref.attention_backends`. The
names this module used to hold (``BACKENDS``, ``available_backends``, ``auto_backend``, ...) still import
from here, with a DeprecationWarning, until the next release: import them from `uniref.attention`.
"""

from __future__ import annotations

import importlib
import warnings

import torch

from uniref import _C

_ops = torch.ops.uniref

# ---- the CPU kernels: the widest build this CPU runs --------------------------------------------------------


def _wider_cpu_kernels(capability: str) -> tuple[str, ...]:
    """torch's CPU capability (its own runtime detection; ATEN_CPU_CAPABILITY=default|avx2|avx512 lowers it)
    -> the modules of wider builds of the CPU attention kernels that setup.py adds to a portable build,
    widest first. x86-64-v4 is AVX-512 F/BW/CD/DQ/VL and x86-64-v3 AVX2 + FMA: what torch's AVX512 and AVX2
    levels require."""
    if capability.startswith("AVX512"):
        return ("_C_x86_64_v4", "_C_x86_64_v3")
    if capability.startswith("AVX2"):
        return ("_C_x86_64_v3",)
    return ()


def _use_widest_cpu_kernels() -> str:
    """Hands uniref._C the widest build of the CPU attention kernels that this CPU runs; returns its target."""
    for name in _wider_cpu_kernels(torch.backends.cpu.get_cpu_capability()):
        try:
            module = importlib.import_module(f"uniref.{name}")
        except ModuleNotFoundError:  # not built: UNIREF_CPU_ARCH was not portable, or another machine
            continue
        _C._use_cpu_attention_kernels(module.kernels)
        break
    return _C.cpu_attention_target()


_use_widest_cpu_kernels()

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

# ---- deprecated: the backends moved to uniref.attention_backends -----------------------------------------

_MOVED = (
    "BACKENDS", "CUDA_HEAD_DIMS", "ENV_BACKEND", "SDPA_MIN_TOKENS_INFERENCE", "SDPA_MIN_TOKENS_TRAINING",
    "auto_backend", "available_backends", "host_offsets", "mean_tokens_per_sample", "unavailable_reason",
)  # fmt: skip


def __getattr__(name: str):
    if name in _MOVED:
        from uniref import attention_backends

        warnings.warn(
            f"uniref.ops.attention.{name} moved to uniref.attention.{name} (uniref.attention_backends); the old "
            "path works until the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(attention_backends, name)
    if name == "run_backend":  # (backend, q, k, v, cu_q, cu_k, max_q, max_k, scale, return_lse) -> (out, lse | None)
        from uniref import attention_backends

        warnings.warn("uniref.ops.attention.run_backend(name, ...) is uniref.attention.get_backend(name).run(...) "
                      "now; the old name works until the next release", DeprecationWarning, stacklevel=2)  # fmt: skip
        return lambda backend, *args: attention_backends.get_backend(backend).run(*args)
    raise AttributeError(f"module 'uniref.ops.attention' has no attribute {name!r}")
