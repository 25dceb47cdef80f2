"""``internimage predict``: top-k classes for images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from internimage.cli.common import (
    add_weights_args,
    check_images,
    check_model_name,
    model_from_checkpoint,
    parse_model_args,
)
from internimage.cli.errors import CommandError, one_line

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="top-k classes for images",
        description="Classifies images with the model's own preprocessing "
                    "(timm resolve_data_config + create_transform) and prints the top-k "
                    "classes with ImageNet names (or the class names a trained checkpoint "
                    "records).")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, or folders: every image in them (recursively, sorted)")
    add_weights_args(p, random_weights=True)
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--img-size", type=int, default=None, help="override the input size")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--no-optimize", action="store_true",
                   help="run the model as built, not internimage.optimize_for_inference "
                        "(which the CPU uses by default; it has fused kernels for InternImage, "
                        "not FlashInternImage)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write results as JSON")


def _expand(paths: list[str]) -> list[str]:
    """The image files named, with each folder replaced by the images inside it."""
    from internimage.data import IMAGE_EXTENSIONS

    images: list[str] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise CommandError(f"IMAGE: no images in the folder '{path}' (extensions: "
                                   f"{', '.join(IMAGE_EXTENSIONS)})")
            images += [str(p) for p in found]
        elif path.is_file():
            images.append(name)
        else:
            raise CommandError(f"IMAGE: file not found: '{path}'")
    return images


def run(args: argparse.Namespace) -> int:
    """Top-k classes for each image."""
    import torch
    from PIL import Image, UnidentifiedImageError
    from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config

    from internimage.cli.common import resolve_device
    from internimage.files import atomic_write_text

    # everything the user gave is checked before the model is built
    if args.top_k < 1:
        raise CommandError(f"--top-k: expected an integer >= 1, got {args.top_k}")
    if args.img_size is not None and args.img_size < 32:
        raise CommandError(f"--img-size: expected an integer >= 32 (the models downsample "
                           f"32x), got {args.img_size}")
    images = _expand(args.images)
    model_args = parse_model_args(args.model_args)
    device = resolve_device(args.device)
    if args.model is not None:
        check_model_name(args.model)
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise CommandError(f"--checkpoint: file not found: '{args.checkpoint}'")
    check_images(images)
    model, info = model_from_checkpoint(args.model, args.checkpoint, args.pretrained, device,
                                        model_args, random_weights=args.random_weights)
    model.eval()
    if device.type == "cpu" and not args.no_optimize:
        from internimage.inference import InferenceDCNv3, optimize_for_inference

        model = optimize_for_inference(model, inplace=True)
        if any(isinstance(m, InferenceDCNv3) for m in model.modules()):  # not FlashInternImage
            print("using internimage.optimize_for_inference (fused float32 CPU kernels; "
                  "--no-optimize to run the model as built)")
    data_config = resolve_data_config(model=model)
    if args.img_size is not None:
        data_config["input_size"] = (3, args.img_size, args.img_size)
    transform = create_transform(**data_config, is_training=False)
    class_names = info.get("class_names")
    describe = None
    if class_names is None:
        subset = infer_imagenet_subset(model)
        if subset is not None:
            describe = ImageNetInfo(subset)
    num_classes = getattr(model, "num_classes", 0)
    top_k = min(args.top_k, num_classes) if num_classes else args.top_k

    results = []
    for path in images:
        try:
            with Image.open(path) as image:
                tensor = transform(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise CommandError(f"IMAGE: cannot read '{path}' as an image ({one_line(error)})") \
                from error
        with torch.inference_mode():
            probs = model(tensor.unsqueeze(0).to(device)).float().softmax(-1)[0]
        values, indices = probs.topk(top_k)
        preds = []
        for p, i in zip(values.tolist(), indices.tolist()):
            if class_names is not None:
                label = class_names[i]
            elif describe is not None:
                label = describe.index_to_description(i)
            else:
                label = str(i)
            preds.append({"index": i, "label": label, "probability": p})
        results.append({"image": str(path), "top_k": preds})
        print(path)
        for rank, pred in enumerate(preds, 1):
            print(f"  {rank}. {pred['probability'] * 100:6.2f}%  {pred['index']:>5}  "
                  f"{pred['label']}")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0
