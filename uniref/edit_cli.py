"""Deprecated: `uniref edit` now lives in `uniref.cli.edit`; this alias is removed in the next release."""

import warnings

from uniref.cli.edit import (  # noqa: F401
    MAX_INPUT_PIXELS,
    EditInputError,
    add_parser,
    load_image,
    run_edit,
    write_image_atomic,
)

warnings.warn("uniref.edit_cli is deprecated; import from uniref.cli.edit", DeprecationWarning, stacklevel=2)

add_edit_parser = add_parser

__all__ = ["EditInputError", "MAX_INPUT_PIXELS", "add_edit_parser", "load_image", "run_edit", "write_image_atomic"]
