"""DCNv3 op on CPU: compiled kernels vs the pure-PyTorch reference, side by side in one run.

Shapes are InternImage-T's four stages for a 224x224 input (3x3 kernel, stride 1, pad 1,
16 channels per group). Each case times forward and forward+backward of both paths in
alternating rounds (a round runs one path several times back to back and takes the mean, so
one path's allocations do not land inside the other's timing) and reports the median round
and the speed-up ratio.

    python benchmarks/bench_op.py [--batch-sizes 1 8] [--repeats 7] [--dtype float32]
        [--threads N]

INTERNIMAGE_CPU_ISA=avx2 caps the compiled kernels at their AVX2 build (ATEN_CPU_CAPABILITY=avx2
does the same for PyTorch's, so the reference too runs as on an AVX2-only CPU).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import internimage
from internimage.bench import cpu_name
from internimage.ops import dcnv3, dcnv3_reference

# (height/width, channels, groups) of InternImage-T's stages at 224x224.
STAGES = ((56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32))


def make_inputs(n: int, size: int, channels: int, group: int, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    points = 9
    x = torch.randn(n, size, size, channels, generator=generator, dtype=dtype)
    offset = torch.randn(n, size, size, group * points * 2, generator=generator, dtype=dtype)
    logits = torch.randn(n, size, size, group, points, generator=generator)
    mask = torch.softmax(logits, -1).flatten(-2).to(dtype)
    return x, offset, mask


def time_round(fn: Callable[[], object], calls: int) -> float:
    """Mean seconds per call over `calls` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def bench_case(n: int, size: int, channels: int, group: int, dtype: torch.dtype, repeats: int):
    x, offset, mask = make_inputs(n, size, channels, group, dtype)
    args = (3, 1, 1, 1, group, channels // group, 1.0)
    grad = torch.randn(n, size, size, channels, dtype=dtype)

    def forward(op):
        with torch.no_grad():
            op(x, offset, mask, *args)

    def forward_backward(op):
        leaves = [t.detach().requires_grad_() for t in (x, offset, mask)]
        op(*leaves, *args).backward(grad)

    results = {}
    for label, body in (("fwd", forward), ("fwd+bwd", forward_backward)):
        samples = {"compiled": [], "reference": []}
        for op in (dcnv3, dcnv3_reference):  # warm-up
            body(op)
        for _ in range(repeats):
            samples["compiled"].append(time_round(lambda b=body: b(dcnv3), calls=5))
            samples["reference"].append(time_round(lambda b=body: b(dcnv3_reference), calls=2))
        results[label] = {k: statistics.median(v) for k, v in samples.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads for both paths (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not internimage.ops.extension_available():
        raise SystemExit(f"compiled extension missing: {internimage.ops.extension_error()}")
    dtype = getattr(torch, args.dtype)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}, "
        f"CPU kernels: {internimage._C.cpu_isa()}, reference: ATen "
        f"{torch.backends.cpu.get_cpu_capability()}, {args.dtype}, "
        f"median of {args.repeats} rounds"
    )
    header = (
        "| shape (N, H=W, C, G) | fwd compiled ms | fwd reference ms | fwd ratio "
        "| fwd+bwd compiled ms | fwd+bwd reference ms | fwd+bwd ratio |"
    )
    print(header)
    print("|" + "---|" * 7)
    worst = {"fwd": float("inf"), "fwd+bwd": float("inf")}
    for n in args.batch_sizes:
        for size, channels, group in STAGES:
            r = bench_case(n, size, channels, group, dtype, args.repeats)
            ratios = {k: r[k]["reference"] / r[k]["compiled"] for k in r}
            for k in worst:
                worst[k] = min(worst[k], ratios[k])
            print(
                f"| ({n}, {size}, {channels}, {group}) "
                f"| {r['fwd']['compiled'] * 1e3:.3f} | {r['fwd']['reference'] * 1e3:.3f} "
                f"| {ratios['fwd']:.1f}x "
                f"| {r['fwd+bwd']['compiled'] * 1e3:.3f} "
                f"| {r['fwd+bwd']['reference'] * 1e3:.3f} | {ratios['fwd+bwd']:.1f}x |",
                flush=True,
            )
    print(f"worst ratio: forward {worst['fwd']:.1f}x, forward+backward {worst['fwd+bwd']:.1f}x")


if __name__ == "__main__":
    main()
