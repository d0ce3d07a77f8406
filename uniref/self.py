"""Deprecated import path: SELF packing lives in `uniref.packing`. Removed in the next release."""

import warnings

from uniref.packing import *  # noqa: F401,F403
from uniref.packing import PackedLatents, plan_reference_sizes  # noqa: F401

warnings.warn("uniref.self is deprecated; import from uniref.packing (or uniref)", DeprecationWarning, stacklevel=2)
