"""The ``internimage`` command (also ``python -m internimage``): argument parsing and dispatch.

Subcommands: ``models``, ``bench``, ``predict``, ``convert``, ``export``, ``train``; see
``docs/cli.md`` or ``internimage <command> --help``. Bad input ends with a one-line
``internimage <command>: error: ...`` on stderr and exit status 1 (2 for command-line syntax
errors, as argparse does).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser"]


def _models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="list the variants and pretrained tags with params and FLOPs",
        description="Table of the registered InternImage variants and pretrained tags: "
                    "parameters, GMACs/GFLOPs at the tag's input size (DCNv3 op included; "
                    "counted on the meta device), input size, stage channels, classes.")
    p.add_argument("--filter", default=None, help="only rows whose name contains this text")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")


def _bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="time the DCNv3 op and a model against a timm baseline",
        description="Times the DCNv3 op (compiled vs pure-PyTorch reference) at the model's "
                    "stage shapes, then the model against a timm baseline, on the current "
                    "device: images/s, latency, peak memory and the ratios.")
    p.add_argument("--model", default="internimage_t", help="model to time (default: %(default)s)")
    p.add_argument("--compare", default="convnext_tiny",
                   help="timm baseline timed in the same run, 'none' to skip "
                        "(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    p.add_argument("--img-size", type=int, default=None,
                   help="input side (default: the model's pretrained input size)")
    p.add_argument("--dtype", default="float32",
                   help="float32, bfloat16 or float16; inference casts the model, --train uses "
                        "autocast with float32 weights (default: float32)")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and input")
    p.add_argument("--paths", default=None,
                   help="how the models run, comma-separated: eager (as built), optimized "
                        "(internimage.optimize_for_inference, InternImage models only), "
                        "compiled (torch.compile; Inductor freezing for inference), "
                        "optimized+compiled (default: all four; eager,compiled with --train)")
    p.add_argument("--train", action="store_true",
                   help="time forward+backward+AdamW step instead of inference")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads; default: torch's default)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed iterations per case (default: 1 on CPU, 3 on CUDA)")
    p.add_argument("--iters", type=int, default=10,
                   help="maximum timed iterations per case (default: 10)")
    p.add_argument("--budget", type=float, default=15.0,
                   help="stop timing a case after this many seconds (default: 15)")
    p.add_argument("--skip-op", action="store_true", help="skip the DCNv3 op part")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write the environment, every sample and the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   dest="model_args",
                   help="extra model constructor argument (value parsed as YAML, repeatable), "
                        "e.g. --model-arg depths=[1,1,2,1] for a non-standard architecture")


def _weights_args(p: argparse.ArgumentParser, required_model: bool = False) -> None:
    p.add_argument("--model", default=None, required=required_model,
                   help="model name, e.g. internimage_t (optional when a checkpoint written "
                        "by 'internimage train' or 'convert' records it)")
    _model_arg(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--checkpoint", default=None, metavar="FILE",
                       help="weights: original .pth, converted .safetensors or a "
                            "model.safetensors from 'internimage train'")
    group.add_argument("--pretrained", action="store_true",
                       help="the model tag's released weights (local Hugging Face cache or "
                            "the hub)")


def _predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="top-k classes for images",
        description="Classifies images with the model's own preprocessing "
                    "(timm resolve_data_config + create_transform) and prints the top-k "
                    "classes with ImageNet names (or the class names a trained checkpoint "
                    "records).")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    _weights_args(p)
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    p.add_argument("--img-size", type=int, default=None, help="override the input size")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write results as JSON")


def _convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="original .pth checkpoint -> safetensors",
        description="Converts an original InternImage checkpoint into a safetensors file in "
                    "this package's layout (loaded safely, validated against the model).")
    p.add_argument("src", metavar="ORIGINAL.pth", help="original checkpoint")
    p.add_argument("dst", metavar="OUT.safetensors", help="output file")
    p.add_argument("--model", required=True, help="variant, e.g. internimage_t")
    _model_arg(p)
    p.add_argument("--use-ema", action="store_true", help="convert 'model_ema' if present")
    p.add_argument("--force", action="store_true", help="overwrite OUT.safetensors")


def _export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export to ONNX",
        description="Exports a model to ONNX with internimage.export.export_onnx.")
    _weights_args(p)
    p.add_argument("--onnx", required=True, metavar="FILE", help="output .onnx file")
    p.add_argument("--img-size", type=int, default=None,
                   help="input side (default: the model's input size)")
    p.add_argument("--custom-op", action="store_true",
                   help="emit the DCNv3 custom op instead of its standard-op decomposition")
    p.add_argument("--static-batch", action="store_true", help="fixed batch dimension of 1")


def _train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="fine-tune / train on an image folder or the embedded digits data",
        description="Trains or fine-tunes a model from a YAML recipe (configs/). Without "
                    "--data it trains a small InternImage on scikit-learn's bundled digits. "
                    "Runs under torchrun for multi-process (DDP) training.")
    p.add_argument("--config", default=None,
                   help="recipe name in configs/ or a YAML path (default: digits_tiny without "
                        "--data, else <model>_ft)")
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
    for add in (_models, _bench, _predict, _convert, _export, _train):
        add(sub)
    return parser


def _handler(command: str) -> Callable[[argparse.Namespace], int]:
    if command == "models":
        from internimage.commands import run_models
        return run_models
    if command == "bench":
        from internimage.bench import run_bench
        return run_bench
    if command == "predict":
        from internimage.commands import run_predict
        return run_predict
    if command == "convert":
        from internimage.commands import run_convert
        return run_convert
    if command == "export":
        from internimage.commands import run_export
        return run_export
    from internimage.train import run_train
    return run_train


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``internimage`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from internimage.cli_common import CommandError, one_line

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(_handler(args.command)(args) or 0)
    except CommandError as error:
        print(f"internimage {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"internimage {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
