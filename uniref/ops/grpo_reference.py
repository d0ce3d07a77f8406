"""Deprecated import path: moved to `uniref.testing.grpo`. Removed in the next release."""

import warnings

from uniref.testing.grpo import *  # noqa: F401,F403

warnings.warn("uniref.ops.grpo_reference is deprecated; import uniref.testing.grpo", DeprecationWarning, stacklevel=2)
