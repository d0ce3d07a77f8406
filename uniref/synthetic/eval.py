"""Deprecated: `uniref eval` now lives in `uniref.cli.eval` (``python -m uniref.cli.eval`` or ``uniref eval``);
this alias, ``python -m uniref.synthetic.eval`` included, is removed in the next release."""

import sys
import warnings

from uniref.cli.eval import ModelSpecError, add_parser, main, resolve_model, run_eval  # noqa: F401

if __name__ != "__main__":
    warnings.warn("uniref.synthetic.eval is deprecated; import from uniref.cli.eval", DeprecationWarning, stacklevel=2)

add_eval_parser = add_parser

__all__ = ["ModelSpecError", "add_eval_parser", "main", "resolve_model", "run_eval"]

if __name__ == "__main__":
    sys.exit(main())
