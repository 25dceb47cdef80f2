"""``internimage train``: the parser; the run is :func:`internimage.train.run_train`."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="fine-tune / train on an image folder or the embedded digits data",
        description="Trains or fine-tunes a model from a YAML recipe (internimage/configs/). "
                    "Without --data it trains a small InternImage on scikit-learn's bundled "
                    "digits. Runs under torchrun for multi-process (DDP) training.")
    p.add_argument("--config", default=None,
                   help="recipe name in internimage/configs/ or a YAML path (default: "
                        "digits_tiny without --data, else <model>_ft)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="ImageFolder root with train/ and val/ (data.dir)")
    p.add_argument("--model", default=None,
                   help="model name (model.name; also clears model.kwargs)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="initial weights: original .pth or .safetensors (model.checkpoint)")
    p.add_argument("--num-classes", type=int, default=None, help="model.num_classes")
    p.add_argument("--epochs", type=int, default=None, help="sched.epochs")
    p.add_argument("--batch-size", type=int, default=None, help="data.batch_size (per process)")
    p.add_argument("--lr", type=float, default=None, help="optim.lr")
    p.add_argument("--img-size", type=int, default=None, help="data.img_size")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="output folder (default: runs/<recipe>-<time>); must not exist")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR exactly where it stopped")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override any config key, e.g. --set optim.layer_decay=0.9 "
                        "(value parsed as YAML; repeatable)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N epochs of this invocation (resume later with --resume)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from internimage.train import run_train

    return run_train(args)
