"""``internimage validate``: top-1 / top-5 accuracy of a checkpoint on an image folder, with
the training code's data path (:mod:`internimage.data`) and evaluation
(:func:`internimage.train.validate`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from internimage.cli.common import (
    add_weights_args,
    check_images,
    check_model_name,
    model_from_checkpoint,
    parse_model_args,
    read_safetensors_metadata,
)
from internimage.cli.errors import CommandError, one_line

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate", help="top-1/top-5 accuracy of a checkpoint on an image folder",
        description="Evaluates a model on an ImageFolder (DIR/<class>/<image>, or the val/ "
                    "split of a train/val root) with its evaluation transform and prints the "
                    "loss, top-1 and top-5 accuracy. Class folders are matched by name to the "
                    "class names a trained checkpoint records, else taken in sorted order "
                    "(ImageNet's synset folders give the 1k class indices).")
    p.add_argument("data", metavar="DIR", help="image folder, or a root holding val/")
    add_weights_args(p, random_weights=True)
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input side (default: the model's input size)")
    p.add_argument("--num-workers", type=int, default=2,
                   help="DataLoader worker processes (default: 2)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Loss, top-1 and top-5 of the model on the folder."""
    import torch
    from timm.data import resolve_data_config
    from torch.utils.data import DataLoader

    from internimage.cli.common import resolve_device
    from internimage.data import (
        ImageDecodeError,
        ImageFolderData,
        eval_transform,
        scan_class_folders,
    )
    from internimage.factory import available_cores
    from internimage.files import atomic_write_text
    from internimage.train import validate

    for option, value, low in (("--batch-size", args.batch_size, 1),
                               ("--num-workers", args.num_workers, 0)):
        if value < low:
            raise CommandError(f"{option}: expected an integer >= {low}, got {value}")
    if args.img_size is not None and args.img_size < 32:
        raise CommandError(f"--img-size: expected an integer >= 32, got {args.img_size}")
    root = Path(args.data)
    folder = root / "val" if (root / "val").is_dir() else root
    try:
        classes, files = scan_class_folders(folder)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(f"DIR: {one_line(error)}") from error
    device = resolve_device(args.device)
    model_args = parse_model_args(args.model_args)
    if args.model is not None:
        check_model_name(args.model)
    if args.checkpoint is not None:
        if not Path(args.checkpoint).is_file():
            raise CommandError(f"--checkpoint: file not found: '{args.checkpoint}'")
        recorded = read_safetensors_metadata(args.checkpoint).get("class_names")
        if recorded is not None:
            _check_recorded_names(classes, json.loads(recorded), folder)
    check_images([str(p) for cls in classes for p in files[cls]], "DIR", args.quiet)
    model, info = model_from_checkpoint(args.model, args.checkpoint, args.pretrained, device,
                                        model_args, random_weights=args.random_weights)
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    names = info.get("class_names")
    if names is not None:
        labels = {cls: names.index(cls) for cls in classes}
    else:
        if len(classes) > num_classes:
            raise CommandError(f"DIR: '{folder}' has {len(classes)} class folders, the model "
                               f"{num_classes} classes")
        labels = {cls: index for index, cls in enumerate(classes)}
    for line in _misleading(classes, names, num_classes):
        print(f"WARNING: {line}", file=sys.stderr)
    workers = min(args.num_workers, available_cores())
    if workers < args.num_workers:
        print(f"note: --num-workers {args.num_workers} is more than the {workers} CPU core(s) "
              f"this process may use: using {workers}", file=sys.stderr)
    samples = [(path, labels[cls]) for cls in classes for path in files[cls]]

    data_config = resolve_data_config(model=model)
    if args.img_size is not None:
        data_config["input_size"] = (3, args.img_size, args.img_size)
    loader = DataLoader(ImageFolderData(samples, eval_transform(data_config)),
                        batch_size=args.batch_size, num_workers=workers,
                        pin_memory=device.type == "cuda")
    started = time.perf_counter()
    try:
        with torch.inference_mode():
            result = validate(model, loader, device,
                              desc=None if args.quiet else "validate")
    except ImageDecodeError as error:
        raise CommandError(f"DIR: {one_line(error).removeprefix('data.dir: ')}") from error
    seconds = time.perf_counter() - started
    record = {"data": str(folder), "checkpoint": args.checkpoint, "images": result["count"],
              "classes": len(classes), "top1": result["acc1"], "top5": result["acc5"],
              "loss": result["loss"], "input_size": list(data_config["input_size"]),
              "seconds": round(seconds, 3)}
    print(f"{folder}: top-1 {result['acc1']:.2f}%, top-5 {result['acc5']:.2f}%, loss "
          f"{result['loss']:.4f} ({result['count']} images, {len(classes)} classes, "
          f"{data_config['input_size'][-1]}px, {seconds:.1f} s)")
    if args.json:
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    return 0


def _check_recorded_names(classes: list[str], names: list[str], folder: Path) -> None:
    """Every class folder must be one of the class names a trained checkpoint records."""
    unknown = [cls for cls in classes if cls not in names]
    if unknown:
        raise CommandError(
            f"DIR: class folder(s) {unknown[:5]} of '{folder}' are not among the "
            f"checkpoint's class names {names[:10]}{' ...' if len(names) > 10 else ''}")


def _misleading(classes: list[str], names: list[str] | None, num_classes: int) -> list[str]:
    """What would make the accuracy mislead: folders matched to the model's classes by
    sorted position rather than by name, and a top-5 that cannot miss."""
    out = []
    if names is None and len(classes) < num_classes:
        shown = ", ".join(classes[:3]) + (", ..." if len(classes) > 3 else "")
        out.append(f"the checkpoint records no class names, so the {len(classes)} class "
                   f"folders ({shown}) are taken as the model's classes 0-{len(classes) - 1} "
                   f"of {num_classes} by sorted position, not by name: the accuracy is "
                   "meaningless unless the model was trained on these folders in this order")
    if num_classes <= 5:
        out.append(f"the model has {num_classes} classes, so top-5 accuracy is 100 % by "
                   "construction; read top-1")
    return out
