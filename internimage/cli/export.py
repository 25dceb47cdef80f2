"""``internimage export``: ONNX through :func:`internimage.export.export_onnx`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from internimage.cli.common import add_weights_args, model_from_checkpoint, parse_model_args
from internimage.cli.errors import CommandError, one_line

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export to ONNX",
        description="Exports a model to ONNX with internimage.export.export_onnx.")
    add_weights_args(p)
    p.add_argument("--onnx", required=True, metavar="FILE", help="output .onnx file")
    p.add_argument("--img-size", type=int, default=None,
                   help="input side (default: the model's input size)")
    p.add_argument("--custom-op", action="store_true",
                   help="emit the DCNv3 / DCNv4 custom op instead of its standard-op "
                        "decomposition")
    p.add_argument("--static-batch", action="store_true", help="fixed batch dimension of 1")
    p.add_argument("--force", action="store_true", help="overwrite an existing --onnx file")


def run(args: argparse.Namespace) -> int:
    """ONNX export of a checkpoint, the pretrained weights or a randomly initialised model."""
    import torch

    from internimage.progress import working

    try:
        from internimage.export import export_onnx
    except ModuleNotFoundError as error:
        if error.name not in ("internimage.export", "onnx", "onnxscript"):
            raise
        raise CommandError(
            f"export: ONNX export is unavailable ({one_line(error)}); install the extra: "
            "pip install 'internimage-timm[export]'"
        ) from error
    out = Path(args.onnx)
    if out.suffix != ".onnx":
        raise CommandError(f"--onnx: expected a path ending in '.onnx', got '{out}'")
    if out.exists() and not args.force:
        raise CommandError(f"--onnx: '{out}' exists; pass --force to overwrite it")
    if args.img_size is not None and args.img_size < 32:
        raise CommandError(f"--img-size: expected an integer >= 32, got {args.img_size}")
    model, _ = model_from_checkpoint(args.model, args.checkpoint, args.pretrained,
                                     torch.device("cpu"), parse_model_args(args.model_args),
                                     random_weights=args.checkpoint is None
                                     and not args.pretrained)
    img_size = args.img_size or int(model.pretrained_cfg["input_size"][-1])
    existed = out.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with working(f"exporting {out}"):
            result = export_onnx(model, str(out), img_size=img_size,
                                 dynamic_batch=not args.static_batch, custom_op=args.custom_op)
    except Exception as error:
        if not existed and out.exists():
            out.unlink()
        raise CommandError(f"export: ONNX export failed ({one_line(error)[:400]})") from error
    size = os.path.getsize(out) if out.exists() else 0
    print(f"wrote {out} ({size / 2**20:.1f} MiB, input 1x3x{img_size}x{img_size}, "
          f"{'static' if args.static_batch else 'dynamic'} batch, "
          f"{'custom DCN op' if args.custom_op else 'standard ONNX ops'})"
          + (f" -> {result}" if isinstance(result, str | Path) and str(result) != str(out)
             else ""))
    return 0
