"""Deprecated import path: moved to `uniref.testing.packing`. Removed in the next release."""

import warnings

from uniref.testing.packing import *  # noqa: F401,F403

warnings.warn(
    "uniref.ops.packing_reference is deprecated; import uniref.testing.packing", DeprecationWarning, stacklevel=2
)
