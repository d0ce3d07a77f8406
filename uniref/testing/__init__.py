"""Plain-torch references and input builders shared by uniref's tests and benchmarks (as flash-attention
ships ``flash_attn/utils/testing.py``):

    uniref.testing.attention   varlen attention in float64-capable torch, packed random inputs
    uniref.testing.grpo        the MSGRPO (Flow-GRPO) math, formula by formula (docs/flow_grpo.md)
    uniref.testing.packing     SELF packing by reshape/permute/cat
    uniref.testing.qwen        a tiny random diffusers Qwen-Image-Edit-Plus pipeline, built offline

The random-weight model geometries live in `uniref.presets`; ``uniref.testing.random_edit_pipeline`` and
friends still resolve there for one release (deprecated).
"""

import torch

#: The devices the tests run every op on: the CPU, and CUDA where there is a GPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

_MOVED_TO_PRESETS = ("CONFIGS", "qwenimage_scheduler", "random_edit_pipeline")


def __getattr__(name):
    if name in _MOVED_TO_PRESETS:
        import warnings

        from uniref import presets

        warnings.warn(
            f"uniref.testing.{name} is deprecated; import it from uniref.presets", DeprecationWarning, stacklevel=2
        )
        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
