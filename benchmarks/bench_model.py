"""CPU inference latency of FlashInternImage-T, InternImage-T and timm's ConvNeXt-T, every path
side by side.

For batch 1 and 8 at 224x224, float32, ``torch.inference_mode``, one process: InternImage-T
eager (as built), after ``internimage.optimize_for_inference``, compiled (``torch.compile``
with Inductor freezing) and optimized-then-compiled; FlashInternImage-T and ConvNeXt-T eager
and compiled (``optimize_for_inference`` leaves FlashInternImage's DCNv4 layers as built). Each case
is set up and warmed up, then the cases are timed interleaved, round by round (so drift in
the machine's speed hits them alike), with ``internimage bench``'s timing code; medians of
wall-clock and process CPU time. The table also gives each path's multiply-adds per second
as a share of a float32 4096^3 GEMM measured in the same run, and the ratios of each model
to each model after it (FlashInternImage-T / InternImage-T, ... / ConvNeXt-T).

``--profile`` then runs each path three more times under ``torch.profiler`` and splits its
time per forward into GEMMs, convolutions, internimage's ops and everything else
(elementwise, norms, Inductor's generated kernels, framework overhead), by self CPU time:
what a model's GEMMs alone cost, against another model's whole forward, bounds their ratio.

    python benchmarks/bench_model.py                       # batch 1 and 8, 224x224
    python benchmarks/bench_model.py --runs 20 --threads 2
    python benchmarks/bench_model.py --batch-sizes 1 --profile
"""

from __future__ import annotations

import argparse
import os
import sys

import timm
import torch

import internimage
from internimage.bench import (
    cpu_name,
    gemm_peak_flops,
    model_case,
    model_table,
    prepare_case,
    time_interleaved,
)
from internimage.flops import model_complexity

#: (model, path) timed for each batch size (paths: internimage.bench.PATHS).
CASES = [
    ("flash_internimage_t", "eager"),
    ("flash_internimage_t", "compiled"),
    ("internimage_t", "eager"),
    ("internimage_t", "optimized"),
    ("internimage_t", "compiled"),
    ("internimage_t", "optimized+compiled"),
    ("convnext_tiny", "eager"),
    ("convnext_tiny", "compiled"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=15, help="timed rounds (default: 15)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--profile", action="store_true",
                        help="after timing, split each path's time by kind of op")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    peak = gemm_peak_flops(device)
    print(f"{cpu_name()}, {torch.get_num_threads()} threads of {os.cpu_count()} cores; torch "
          f"{torch.__version__}, timm {timm.__version__}, internimage {internimage.__version__};"
          f" float32, inference_mode, {args.size}x{args.size}, {args.warmup} warm-up + "
          f"{args.runs} interleaved rounds, medians; load average {os.getloadavg()[0]:.2f}")
    names = list(dict.fromkeys(name for name, _ in CASES))
    complexity = {n: model_complexity(n, (3, args.size, args.size)) for n in names}
    env = {"mode": "inference", "gemm_peak_gflops": round(peak / 1e9, 1)}
    for batch in args.batch_sizes:
        cases, steps = [], {}
        for name, path in CASES:
            case = model_case(name, path, batch, args.size, torch.float32, device, train=False,
                               channels_last=False)
            print(f"batch {batch}: setting up {case.label}", file=sys.stderr, flush=True)
            step = prepare_case(case, device, args.warmup)
            cases.append(case)
            if step is None:
                print(f"  failed: {case.error}", file=sys.stderr)
            else:
                steps[case] = step
        time_interleaved(steps, device, args.runs)
        print()
        print("\n".join(model_table(cases, complexity, env)))
        for case in cases:
            if case.error:
                print(f"FAILED {case.label}: {case.error}")
        if args.profile:
            print()
            print("\n".join(profile_table(steps, batch)))


#: Kinds of op for --profile, by the profiler's op name (first match wins).
OP_KINDS = [
    ("GEMM", ("aten::addmm", "aten::mm", "aten::bmm", "mkl::", "mkldnn::_linear")),
    ("conv", ("aten::mkldnn_convolution", "mkldnn::_convolution", "aten::_convolution",
              "aten::convolution", "aten::conv")),
    ("internimage ops", ("internimage::",)),
]


def _kind(op_name: str) -> str:
    for kind, prefixes in OP_KINDS:
        if op_name.startswith(prefixes):
            return kind
    return "other"


def profile_table(steps: dict, batch: int, forwards: int = 3) -> list[str]:
    """Self CPU ms per forward of each kind of op, per case (each case profiled alone)."""
    from torch.profiler import ProfilerActivity, profile

    kinds = [kind for kind, _ in OP_KINDS] + ["other"]
    lines = [f"Self CPU ms per forward by kind of op (batch {batch}, torch.profiler, "
             f"{forwards} forwards; 'other': elementwise, norms, Inductor's kernels, overhead)",
             "| model | path | " + " | ".join(kinds) + " | total |",
             "|---|---|" + "---:|" * (len(kinds) + 1)]
    for case, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                step()
        ms = dict.fromkeys(kinds, 0.0)
        for event in prof.key_averages():
            ms[_kind(event.key)] += event.self_cpu_time_total / 1000 / forwards
        cells = " | ".join(f"{ms[kind]:.1f}" for kind in kinds)
        lines.append(f"| {case.info['model']} | {case.info['path']} | {cells} | "
                     f"{sum(ms.values()):.1f} |")
    return lines


if __name__ == "__main__":
    main()
