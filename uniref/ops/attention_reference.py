"""Deprecated import path: moved to `uniref.testing.attention`. Removed in the next release."""

import warnings

from uniref.testing.attention import *  # noqa: F401,F403

warnings.warn(
    "uniref.ops.attention_reference is deprecated; import uniref.testing.attention", DeprecationWarning, stacklevel=2
)
from uniref.packing import cu_seqlens_from_lengths as cu_seqlens  # noqa: E402,F401
