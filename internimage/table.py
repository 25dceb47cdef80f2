"""Markdown tables for the subcommands' output."""

from __future__ import annotations

from typing import Any

__all__ = ["format_table"]


def format_table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A Markdown table with padded columns; ``align`` is one 'l'/'r' per column."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    align = align or "l" * len(headers)

    def fmt(values: list[str]) -> str:
        out = []
        for value, width, side in zip(values, widths, align):
            out.append(value.rjust(width) if side == "r" else value.ljust(width))
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join(
        ("-" * (w + 1) + ":") if side == "r" else ("-" * (w + 2)) for w, side in zip(widths, align)
    ) + "|"
    return "\n".join([fmt(headers), rule, *(fmt(r) for r in cells)])
