"""Deprecated: the README's results command moved to ``scripts/readme_results.py`` (it is a maintenance
script of the repository, not part of the library); `paired_bootstrap` lives in `uniref.synthetic.bench`.
Removed in the next release."""

import sys
import warnings

from uniref.synthetic.bench import paired_bootstrap  # noqa: F401

warnings.warn(
    "uniref.synthetic.results is deprecated; paired_bootstrap is in uniref.synthetic.bench and the README "
    "command is scripts/readme_results.py",
    DeprecationWarning,
    stacklevel=2,
)

if __name__ == "__main__":
    sys.exit("the README results command moved: run `python scripts/readme_results.py ...` from the repository root")
