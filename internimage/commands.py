"""Moved: the subcommands live in :mod:`internimage.cli` (one module each) and
``format_table`` in :mod:`internimage.cli.table`. This name stays while
:mod:`internimage.bench` imports ``format_table`` from here."""

from internimage.cli.table import format_table

__all__ = ["format_table"]
