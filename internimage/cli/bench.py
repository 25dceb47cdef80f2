"""``internimage bench``: times the DCN op and a model against a timm baseline in one run,
with the timing library :mod:`internimage.bench`.

By default the models run eager and through ``optimize_for_inference`` (the paths a CPU user
gets without a compiler); ``--paths`` adds the torch.compile (Inductor) paths, whose
compilation takes minutes on a small CPU.
"""

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
                        "optimized+compiled (default: eager,optimized; eager with --train; "
                        "the compiled paths take minutes to compile on a CPU)")
    p.add_argument("--train", action="store_true",
                   help="time forward+backward+AdamW step instead of inference")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (torch.set_num_threads; default: torch's default)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed iterations per case (default: 1 on CPU, 3 on CUDA)")
    p.add_argument("--iters", type=int, default=5,
                   help="maximum timed iterations per case (default: 5)")
    p.add_argument("--budget", type=float, default=5.0,
                   help="stop timing a part's cases after this many seconds per case "
                        "(default: 5)")
    p.add_argument("--skip-op", action="store_true", help="skip the DCN op part")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write the environment, every sample and the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Checks the options, sets up the cases, times them with a progress display, prints the
    report (and warnings when other work shared the cores)."""
    import gc
    import json
    import sys
    import time

    import torch

    from internimage import bench
    from internimage.cli.common import check_model_name, resolve_device
    from internimage.cli.errors import CommandError, one_line
    from internimage.files import atomic_write_text
    from internimage.progress import progress

    for option, value in (("--batch-size", args.batch_size), ("--iters", args.iters)):
        if value < 1:
            raise CommandError(f"{option}: expected an integer >= 1, got {value}")
    if args.img_size is not None and args.img_size < 32:  # 0 must not mean "the default"
        raise CommandError(f"--img-size: expected an integer >= 32, got {args.img_size}")
    if args.warmup is not None and args.warmup < 0:
        raise CommandError(f"--warmup: expected an integer >= 0, got {args.warmup}")
    if args.budget <= 0:
        raise CommandError(f"--budget: expected seconds > 0, got {args.budget}")
    if args.threads is not None and args.threads < 1:
        raise CommandError(f"--threads: expected an integer >= 1, got {args.threads}")
    try:
        dtype = bench.parse_dtype(args.dtype, "--dtype")
    except ValueError as error:
        raise CommandError(one_line(error)) from error
    device = resolve_device(args.device)
    cpu_float32 = device.type == "cpu" and dtype == torch.float32
    try:
        paths = bench.parse_paths(args.paths, args.train, cpu_float32=cpu_float32,
                                  option="--paths")
    except ValueError as error:
        raise CommandError(one_line(error)) from error
    check_model_name(args.model)
    compare = None if args.compare in (None, "", "none") else args.compare
    if compare is not None:
        check_model_name(compare, "--compare")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from internimage.factory import build_model

    with torch.device("meta"):
        probe = build_model(args.model)
    img_size = args.img_size or int(probe.pretrained_cfg["input_size"][-1])
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    cases = [] if args.skip_op else bench.op_cases(probe, img_size, args.batch_size, dtype,
                                                   device, args.train)
    model_names = [args.model] + ([compare] if compare else [])
    for name in model_names:
        for path in paths:
            if "optimized" in path and not bench.optimizable(name):
                continue  # nothing to fuse: baselines and FlashInternImage run as built
            cases.append(bench.model_case(name, path, args.batch_size, img_size, dtype,
                                          device, args.train, args.channels_last))
    env = bench.environment(device, dtype, batch_size=args.batch_size, img_size=img_size,
                            train=args.train, channels_last=args.channels_last, paths=paths)
    started = time.perf_counter()
    with progress(len(cases) + 1, "bench", unit="case", enabled=not args.quiet) as bar:
        bar.set_description("counting parameters and MACs")
        complexity = bench.complexities(model_names, img_size)
        bar.update(1)
        try:
            bench.run_cases(cases, device, warmup=warmup, iters=args.iters,
                            budget=args.budget, progress=bar)
        except ValueError as error:  # e.g. BatchNorm training on 1 value per channel
            raise CommandError(f"{one_line(error)} (--batch-size {args.batch_size}, "
                               f"--img-size {img_size})") from error
        gc.collect()
        if not args.train and dtype == torch.float32:
            bar.set_description("GEMM peak")
            env["gemm_peak_gflops"] = round(bench.gemm_peak_flops(device) / 1e9, 1)
    env["wall_s"] = round(time.perf_counter() - started, 1)

    print(bench.report(cases, complexity, env, model=args.model, iters=args.iters,
                       budget=args.budget, skip_op=args.skip_op, train=args.train))
    compiled = [p for p in bench.PATHS if "compiled" in p and p not in paths
                and ("optimized" not in p or (cpu_float32 and not args.train))]
    if compiled:
        print(f"not timed: the torch.compile (Inductor) paths {', '.join(compiled)}; add them "
              f"with --paths {','.join(paths + compiled)} (compiling takes minutes on a CPU)")
    for line in bench.busy_warnings(cases, env):
        print(line, file=sys.stderr)
    print(f"{len(cases)} cases timed in {env['wall_s']:.1f} s")
    if args.json:
        payload = {
            "environment": env,
            "cases": [dict(part=c.part, label=c.label, batch=c.batch, samples_s=c.samples,
                           median_s=c.median if c.samples else None, peak_bytes=c.peak_bytes,
                           error=c.error, **c.info) for c in cases],
            "complexity": complexity,
        }
        atomic_write_text(args.json, json.dumps(payload, indent=2, default=str) + "\n")
    return 1 if any(c.error for c in cases) else 0
