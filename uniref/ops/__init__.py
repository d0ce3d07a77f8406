"""Thin Python layer over the compiled ops in `torch.ops.uniref`.

Importing this package loads `uniref._C` (which registers the schemas and the CPU/CUDA kernels) and
adds what only Python can: fake (meta) kernels for tracing and the autograd formulas.
"""

import torch  # noqa: F401  (loads libtorch, which uniref._C links against)

try:
    from uniref import _C  # noqa: F401  (loading it registers torch.ops.uniref.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "uniref's compiled ops (uniref._C) could not be loaded: "
        f"{exc}. Build them with `pip install --no-build-isolation .` in an environment that has the "
        "same torch you import (see README.md)."
    ) from exc

from uniref.ops import (
    attention,  # noqa: E402,F401  (varlen attention: fake kernels, autograd)
    grpo,  # noqa: E402,F401  (MSGRPO ops: CPU references, Triton on CUDA)
    packing,  # noqa: E402,F401
)

__all__ = ["packing"]
