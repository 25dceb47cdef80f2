"""The command line's error type and one-line formatting.

Library modules raise ``ValueError`` / ``TypeError`` / ``FileNotFoundError``; the subcommands
turn what the user can fix into :class:`CommandError`, prefixed with the option it came from,
and :func:`internimage.cli.main` prints it as ``internimage COMMAND: error: ...``.
"""

from __future__ import annotations

__all__ = ["CommandError", "one_line"]


class CommandError(Exception):
    """A user-facing error: the CLI prints it on one line (no traceback) and exits with 1."""


def one_line(text: object) -> str:
    """Collapses a message onto one line (newlines become '; ')."""
    parts = [part.strip() for part in str(text).splitlines() if part.strip()]
    return "; ".join(parts)
