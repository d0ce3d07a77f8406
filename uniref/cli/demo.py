"""`uniref demo`: the local web app (`uniref.demo`; Gradio is imported only when it runs)."""

from __future__ import annotations


def add_parser(subparsers):
    """Adds ``demo`` to ``subparsers``."""
    from uniref.demo import add_demo_parser

    return add_demo_parser(subparsers)
