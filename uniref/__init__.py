"""uniref: multi-reference image editing with diffusion transformers (UniRef-Image-Edit).

Public API:
    plan_reference_sizes   SELF's global pixel-budget planner
    pack_latents           batch of (target + references) latents -> (tokens, SequenceLayout)
    SequenceLayout         where every image's tokens sit: offsets, position ids, target/reference split
    unpack_latents         the exact inverse
    cu_seqlens_from_lengths  lengths -> int32 offsets
    concat_joint / split_joint   per-sample [text ; image] joint sequences for MMDiT attention
    varlen_attention       block-diagonal attention over packed sequences (several backends)
    sde_step_with_logprob  Flow-GRPO SDE step with per-sample log-probabilities
    group_advantages       multi-source group-normalized advantages (across ranks when distributed)
    flow_grpo_loss         the PPO-clipped Flow-GRPO loss with optional KL (fused Triton kernels on CUDA)
    info                   what was built (CPU/CUDA kernels, archs, optional backends)
    UniRefTransformer2DModel   the packed-varlen MMDiT   } imported on first use
    UniRefEditPipeline         the diffusers edit pipeline } (they need diffusers)
"""

__version__ = "0.1.0"

import os as _os

# torch's OpenMP runtime (libgomp, which uniref's CPU kernels share through at::parallel_for) spins at every
# barrier by default. When other processes compete for the cores, a spinning worker holds a core that the
# descheduled one needs to finish its share, and sampling slows far more than the CPU share lost (10 steps of
# the default model: 1.6 s -> 22 s with one busy process per core; 0.6 s either way with passive waiting, see
# benchmarks/test_sampling_load.py). libgomp reads this when torch loads it, so it takes effect when uniref is
# imported before torch, as the `uniref` command does; a value set by the user wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from uniref import ops  # noqa: E402,F401  (loads uniref._C)
from uniref.attention import varlen_attention  # noqa: E402
from uniref.grpo import flow_grpo_loss, group_advantages, sde_step_with_logprob  # noqa: E402
from uniref.info import build_info, info  # noqa: E402
from uniref.packing import (  # noqa: E402
    PackedLatents,
    SequenceLayout,
    concat_joint,
    cu_seqlens_from_lengths,
    pack_latents,
    plan_reference_sizes,
    split_joint,
    unpack_latents,
)

# Imported on first use: they pull in diffusers, which `import uniref` should not pay for.
_LAZY = {
    "UniRefTransformer2DModel": "uniref.models.transformer",
    "UniRefEditPipeline": "uniref.pipelines.edit",
    "UniRefEditPipelineOutput": "uniref.pipelines.edit",
    "ByteTextEncoder": "uniref.pipelines.text_encoders",
    "QwenVLPromptEncoder": "uniref.pipelines.text_encoders",
    "VarlenJointAttnProcessor": "uniref.integrations.diffusers_attention",
    "use_varlen_attention": "uniref.integrations.diffusers_attention",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'uniref' has no attribute {name!r}")


__all__ = [
    "ByteTextEncoder",
    "PackedLatents",
    "QwenVLPromptEncoder",
    "SequenceLayout",
    "UniRefEditPipeline",
    "UniRefEditPipelineOutput",
    "UniRefTransformer2DModel",
    "VarlenJointAttnProcessor",
    "build_info",
    "concat_joint",
    "cu_seqlens_from_lengths",
    "flow_grpo_loss",
    "group_advantages",
    "info",
    "pack_latents",
    "plan_reference_sizes",
    "sde_step_with_logprob",
    "split_joint",
    "unpack_latents",
    "use_varlen_attention",
    "varlen_attention",
]
