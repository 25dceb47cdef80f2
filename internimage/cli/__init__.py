"""The ``internimage`` command (also ``python -m internimage``): one module per subcommand.

Subcommands: ``models``, ``bench``, ``predict``, ``convert``, ``export``, ``train``; see
``docs/cli.md`` or ``internimage <command> --help``. Each module ``internimage.cli.<command>``
has ``add_parser(subparsers)`` and ``run(args) -> exit status``; the work is done by library
modules. Bad input ends with a one-line ``internimage <command>: error: ...`` on stderr and
exit status 1 (2 for command-line syntax errors, as argparse does).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["main", "build_parser", "COMMANDS"]

#: The subcommands, in ``--help`` order; each is the module ``internimage.cli.<name>``.
COMMANDS = ("models", "bench", "predict", "convert", "export", "train")


def _module(command: str) -> ModuleType:
    return importlib.import_module(f"internimage.cli.{command}")


def build_parser() -> argparse.ArgumentParser:
    """The ``internimage`` argument parser."""
    from internimage import __version__

    parser = argparse.ArgumentParser(
        prog="internimage",
        description="InternImage (DCNv3) for PyTorch and timm: list, benchmark, predict, "
                    "convert, export and train.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        _module(command).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``internimage`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from internimage.cli.errors import CommandError, one_line

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(_module(args.command).run(args) or 0)
    except CommandError as error:
        print(f"internimage {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"internimage {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
