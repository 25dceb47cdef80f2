"""``internimage convert``: an original ``.pth`` checkpoint -> safetensors in this package's
layout (:func:`internimage.checkpoint.convert_checkpoint`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from internimage.cli.common import add_model_arg, parse_model_args
from internimage.cli.errors import CommandError, one_line

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="original .pth checkpoint -> safetensors",
        description="Converts an original InternImage or FlashInternImage checkpoint into a "
                    "safetensors file in this package's layout (loaded safely, validated "
                    "against the model).")
    p.add_argument("src", metavar="ORIGINAL.pth", help="original checkpoint")
    p.add_argument("dst", metavar="OUT.safetensors", help="output file")
    p.add_argument("--model", required=True,
                   help="variant, e.g. internimage_t or flash_internimage_t")
    add_model_arg(p)
    p.add_argument("--num-classes", type=int, default=None, metavar="N",
                   help="classes of the written head (default: the checkpoint's); 1000 for an "
                        "ImageNet-22k checkpoint keeps the ImageNet-1k rows of its 21841-class "
                        "head (the original's map22kto1k.txt)")
    p.add_argument("--use-ema", action="store_true", help="convert 'model_ema' if present")
    p.add_argument("--force", action="store_true", help="overwrite OUT.safetensors")


def run(args: argparse.Namespace) -> int:
    """Original ``.pth`` -> safetensors in this package's layout."""
    import torch

    from internimage.checkpoint import (
        CheckpointMismatchError,
        convert_checkpoint,
        save_safetensors,
    )
    from internimage.cli.common import build_model, check_model_name, read_safetensors_metadata
    from internimage.factory import CUSTOM_MODELS
    from internimage.files import atomic_path

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_file():
        raise CommandError(f"SRC: file not found: '{src}'")
    if dst.suffix != ".safetensors":
        raise CommandError(f"DST: expected a path ending in '.safetensors', got '{dst}'")
    check_model_name(args.model)
    if args.model in CUSTOM_MODELS:
        raise CommandError("--model: convert needs a registered variant (e.g. internimage_t or "
                           "flash_internimage_t); describe other architectures with "
                           "--model-arg")
    model_args = parse_model_args(args.model_args)
    if "num_classes" in model_args:
        raise CommandError("--model-arg: pass the number of classes with --num-classes")
    head = {}
    if args.num_classes is not None:
        if args.num_classes < 1:
            raise CommandError(f"--num-classes: expected an integer >= 1, got "
                               f"{args.num_classes}")
        head = {"num_classes": args.num_classes}
    if dst.exists() and not args.force:
        raise CommandError(f"DST: '{dst}' exists; pass --force to overwrite it")
    with torch.device("meta"):  # the architecture's arguments, checked before the file
        build_model(args.model, kwargs=dict(model_args, **head))
    try:
        with atomic_path(dst, suffix=".safetensors") as tmp:
            convert_checkpoint(src, tmp, args.model, use_ema=args.use_ema, **head,
                               **model_args)
            if model_args:  # record the architecture so predict/export can rebuild it
                from safetensors.torch import load_file

                meta = read_safetensors_metadata(tmp, "DST")
                tensors = load_file(str(tmp))
                save_safetensors(tmp, tensors, dict(meta, model_kwargs=model_args))
    except CheckpointMismatchError as error:
        detail = one_line(error)
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        raise CommandError(f"SRC: cannot convert '{src}' for {args.model} (wrong --model or "
                           f"--model-arg?): {detail}") from error
    except ValueError as error:  # the file: empty, text, damaged, unsafe, no tensors
        raise CommandError(f"SRC: {one_line(error)}") from error
    except OSError as error:
        raise CommandError(f"cannot read '{src}' or write '{dst}' ({one_line(error)})") \
            from error
    meta = read_safetensors_metadata(dst, "DST")
    from safetensors import safe_open

    with safe_open(str(dst), framework="pt") as handle:
        count = len(list(handle.keys()))
    print(f"wrote {dst} ({count} tensors, {args.model}, num_classes "
          f"{meta.get('num_classes', '?')}); load it with: internimage predict IMAGE "
          f"--model {args.model} --checkpoint {dst}")
    return 0
