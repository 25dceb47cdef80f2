"""``internimage bench``: the parser; the run is :func:`internimage.bench.run_bench`."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="time the DCN op and a model against a timm baseline",
        description="Times the model's DCN op (DCNv3 for internimage_*, DCNv4 for "
                    "flash_internimage_*; compiled vs pure-PyTorch reference) at its stage "
                    "shapes, then the model against a timm baseline, on the current device: "
                    "images/s, latency, peak memory and the ratios.")
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
                        "(internimage.optimize_for_inference; internimage_* models only, "
                        "it leaves FlashInternImage as built), "
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
    p.add_argument("--skip-op", action="store_true", help="skip the DCN op part")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write the environment, every sample and the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from internimage.bench import run_bench
    from internimage.cli.errors import CommandError, one_line

    if args.img_size is not None and args.img_size < 32:  # 0 must not mean "the default"
        raise CommandError(f"--img-size: expected an integer >= 32, got {args.img_size}")
    try:
        return run_bench(args)
    except ValueError as error:  # e.g. BatchNorm training on 1 value per channel (--train)
        raise CommandError(f"{one_line(error)} (--batch-size {args.batch_size}, --img-size "
                           f"{args.img_size or 'default'})") from error
