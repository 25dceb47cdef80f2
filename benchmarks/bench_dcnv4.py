"""DCNv4 against DCNv3 on CPU: the two compiled ops side by side in one run.

Shapes are InternImage-T's four stages for a 224x224 input (3x3 kernel, stride 1, pad 1,
16 channels per group), batch 8 by default. Both ops get the same numbers: DCNv4's packed
``offset_mask`` (per group 18 offsets then 9 mask values, padded to a multiple of 8, as the
DCNv4 module's projection makes it) is DCNv3's ``offset`` and ``mask`` interleaved. Columns:

* ``dcnv3`` / ``dcnv4``: the op's forward (no grad), ms;
* ``v4/v3``: the ops' ratio, the issue's target being <= 0.9;
* ``dcnv3+softmax``: DCNv3's op plus the per-group softmax of its mask logits that the
  DCNv3 module runs before it, laid out as the module computes it (logits ``(G, P, pixels)``,
  softmax over P, one transposing copy); DCNv4 uses its mask raw. And ``v4/(v3+sm)``;
* ``fwd+bwd`` ratio: forward and backward of both ops (autograd).

Rounds alternate between the paths (each round runs one path several times back to back
and takes the mean); the table reports the median round.

    python benchmarks/bench_dcnv4.py [--batch-sizes 8] [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import internimage
from internimage.bench import cpu_name
from internimage.ops import dcnv3, dcnv4

STAGES = ((56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32))
POINTS = 9


def make_inputs(n: int, size: int, channels: int, group: int):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, size, size, channels, generator=generator)
    offset = torch.randn(n, size, size, group, 2 * POINTS, generator=generator)
    logits = torch.randn(group, POINTS, n * size * size, generator=generator)
    mask = torch.softmax(logits, 1).permute(2, 0, 1).reshape(n, size, size, group, POINTS)
    packed = torch.cat([offset, mask], -1).flatten(-2)
    padding = (-packed.shape[-1]) % 8
    offset_mask = torch.cat([packed, torch.zeros(*packed.shape[:-1], padding)], -1)
    return x, offset.flatten(-2).contiguous(), mask.flatten(-2).contiguous(), logits, offset_mask


def time_round(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def bench_case(n: int, size: int, channels: int, group: int, repeats: int) -> dict[str, float]:
    x, offset, mask, logits, offset_mask = make_inputs(n, size, channels, group)
    args = (3, 1, 1, 1, group, channels // group, 1.0)
    grad = torch.randn(n, size, size, channels)

    def v3():
        with torch.no_grad():
            dcnv3(x, offset, mask, *args)

    def v3_softmax():
        with torch.no_grad():
            normalised = logits.softmax(1).permute(2, 0, 1).reshape(mask.shape)
            dcnv3(x, offset, normalised, *args)

    def v4():
        with torch.no_grad():
            dcnv4(x, offset_mask, *args)

    def v3_train():
        leaves = [t.detach().requires_grad_() for t in (x, offset, mask)]
        dcnv3(*leaves, *args).backward(grad)

    def v4_train():
        leaves = [t.detach().requires_grad_() for t in (x, offset_mask)]
        dcnv4(*leaves, *args).backward(grad)

    paths = {"v3": v3, "v3_softmax": v3_softmax, "v4": v4, "v3_train": v3_train,
             "v4_train": v4_train}
    calls = max(2, int(2e6 / (n * size * size * channels)))
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for fn in paths.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in paths.items():
            samples[name].append(time_round(fn, calls))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not internimage.ops.extension_available():
        raise SystemExit(f"compiled extension missing: {internimage.ops.extension_error()}")

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}, "
        f"CPU kernels: {internimage._C.cpu_isa()}, float32, median of {args.repeats} rounds"
    )
    print(
        "| shape (N, H=W, C, G) | dcnv3 ms | dcnv4 ms | v4/v3 | dcnv3+softmax ms "
        "| v4/(v3+sm) | fwd+bwd v4/v3 |"
    )
    print("|" + "---|" * 7)
    worst = {"v4/v3": 0.0, "v4/(v3+sm)": 0.0, "train": 0.0}
    for n in args.batch_sizes:
        for size, channels, group in STAGES:
            r = bench_case(n, size, channels, group, args.repeats)
            ratios = {
                "v4/v3": r["v4"] / r["v3"],
                "v4/(v3+sm)": r["v4"] / r["v3_softmax"],
                "train": r["v4_train"] / r["v3_train"],
            }
            for key, value in ratios.items():
                worst[key] = max(worst[key], value)
            print(
                f"| ({n}, {size}, {channels}, {group}) | {r['v3'] * 1e3:.3f} "
                f"| {r['v4'] * 1e3:.3f} | {ratios['v4/v3']:.2f}x "
                f"| {r['v3_softmax'] * 1e3:.3f} | {ratios['v4/(v3+sm)']:.2f}x "
                f"| {ratios['train']:.2f}x |",
                flush=True,
            )
    print(
        f"worst ratio: dcnv4/dcnv3 forward {worst['v4/v3']:.2f}x (target <= 0.9x), "
        f"dcnv4/(dcnv3 + mask softmax) {worst['v4/(v3+sm)']:.2f}x, "
        f"forward+backward {worst['train']:.2f}x"
    )


if __name__ == "__main__":
    main()
