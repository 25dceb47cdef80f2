"""The ``internimage`` command (also ``python -m internimage``): one module per subcommand.

Subcommands: ``models``, ``bench``, ``predict``, ``convert``, ``export``, ``train``,
``validate``; see
``docs/cli.md`` or ``internimage <command> --help``. Each module ``internimage.cli.<command>``
has ``add_parser(subparsers)`` and ``run(args) -> exit status``; the work is done by library
modules. Bad input ends with a one-line ``internimage <command>: error: ...`` on stderr and
exit status 1 (2 for command-line syntax errors, as argparse does).

Start-up: this package and every subcommand's module import only argparse when loaded (the
library, torch and timm are imported inside ``run``), and ``import internimage`` is lazy, so
``internimage --help``, ``internimage COMMAND --help`` and ``--version`` (torch and the
extension only) answer without importing timm or the models.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from types import ModuleType

__all__ = ["main", "build_parser", "COMMANDS"]

#: The subcommands, in ``--help`` order; each is the module ``internimage.cli.<name>``.
COMMANDS = ("models", "bench", "predict", "convert", "export", "train", "validate")


def _module(command: str) -> ModuleType:
    return importlib.import_module(f"internimage.cli.{command}")


def version_report() -> str:
    """internimage's version, torch's (and its CUDA build, GPUs), and the compiled extension:
    whether it loaded, its CUDA kernels, and the CPU kernel build in use."""
    import torch

    from internimage import __version__
    from internimage.ops import extension_error

    if torch.version.cuda:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        cuda = f"CUDA {torch.version.cuda} build, {gpus} GPU(s) visible"
    else:
        cuda = "CPU-only build"
    lines = [f"internimage {__version__}", f"torch {torch.__version__} ({cuda})"]
    error = extension_error()
    if error is not None:
        lines.append(f"extension internimage._C: not loaded ({error}); the pure-PyTorch "
                     "reference runs instead")
    else:
        from internimage import _C

        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("internimage::dcnv3", "CUDA")
        lines.append(f"extension internimage._C: {_C.__file__}; CPU kernels in use: "
                     f"{_C.cpu_isa()}; "
                     + ("CUDA kernels built" if has_cuda else "no CUDA kernels (CPU-only build)"))
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(version_report())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The ``internimage`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="internimage",
        description="InternImage (DCNv3) and FlashInternImage (DCNv4) for PyTorch and timm: "
                    "list, benchmark, predict, convert, export, train and validate.",
    )
    parser.add_argument("--version", action=_VersionAction, nargs=0,
                        help="show the versions of internimage and torch, the CUDA build, the "
                             "extension's kernels and the CPU instruction set in use, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        _module(command).add_parser(sub)
    return parser


class _DropCudaHomeNotice(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." line, which
    ``torch.utils.cpp_extension`` logs when it is imported (by Inductor, for instance) on a
    machine with a CUDA toolkit but no GPU: it says nothing about the command's work."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``internimage`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from internimage.cli.errors import CommandError, one_line

    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropCudaHomeNotice) for f in cpp_extension_log.filters):
        cpp_extension_log.addFilter(_DropCudaHomeNotice())
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
