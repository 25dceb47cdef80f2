"""DCNv3 and DCNv4 on CUDA: the compiled kernels against the pure-PyTorch reference and
against each other, side by side.

Times forward and backward at InternImage-T's stage shapes (3x3, stride 1, pad 1, 16 channels
per group) with CUDA events, and reports each time as a share of the card's copy bandwidth,
measured in the same run. Compulsory bytes per output pixel, with s bytes per element and
P = 9 points: DCNv3 forward (2C + 3GP)s (read input and offset+mask, write output), backward
(3C + 6GP)s (read input, grad_output and offset+mask, write the three gradients); DCNv4 the
same with its padded offset_mask width Cp = ceil(3GP / 8) * 8 for 3GP: forward (2C + Cp)s,
backward (3C + 2Cp)s. DCNv4 gets the same numbers as DCNv3 (its packed offset_mask is DCNv3's
offset and mask interleaved per group).
If ``timm.create_model("internimage_t")`` works, it also times the whole model in bf16 against
convnext_tiny. Ends with a short table.

    python benchmarks/bench_gpu.py [--batch-sizes 1 8 64] [--dtypes float32 bfloat16] [--no-model]
    python benchmarks/bench_gpu.py --dry-run   # the same code on tiny CPU inputs (no GPU)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable

import torch

STAGES = ((56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32))  # (size, C, G) at 224 px
POINTS = 9
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_time_us(fn: Callable[[], object], target_ms: float = 0.0, repeats: int = 1) -> float:
    """Wall time of one call, in microseconds (``--dry-run`` only: checks the code runs)."""
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def cuda_time_us(fn: Callable[[], object], target_ms: float = 20.0, repeats: int = 3) -> float:
    """Median over `repeats` of the mean time of back-to-back calls, in microseconds."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    iters = int(min(1000, max(5, target_ms / max(start.elapsed_time(end), 1e-3))))
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000 / iters)
    return statistics.median(samples)


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = cuda_time_us(lambda: dst.copy_(src), target_ms=50.0)
    return 2 * nbytes / (us * 1e-6)


def make_inputs(n: int, size: int, channels: int, group: int, dtype: torch.dtype,
                device: str = "cuda"):
    """input, DCNv3's offset and mask, DCNv4's packed offset_mask (the same numbers), and a
    grad_output, all in `dtype` on `device`."""
    gen = torch.Generator(device=device).manual_seed(0)
    kw = {"generator": gen, "device": device}
    x = torch.randn(n, size, size, channels, **kw).to(dtype)
    offset = torch.randn(n, size, size, group, POINTS * 2, **kw)
    mask = torch.softmax(torch.randn(n, size, size, group, POINTS, **kw), -1)
    packed = torch.cat([offset, mask], -1).flatten(-2)
    width = math.ceil(3 * group * POINTS / 8) * 8
    offset_mask = torch.zeros(n, size, size, width, device=device)
    offset_mask[..., : packed.shape[-1]] = packed
    grad = torch.randn(n, size, size, channels, **kw).to(dtype)
    return (x, offset.flatten(-2).to(dtype), mask.flatten(-2).to(dtype), offset_mask.to(dtype),
            grad)


def bench_op_case(n, size, channels, group, dtype, bandwidth, timer=cuda_time_us):
    from internimage.ops import dcnv3_reference

    x, offset, mask, offset_mask, grad = make_inputs(
        n, size, channels, group, dtype, "cpu" if timer is cpu_time_us else "cuda"
    )
    params = ([3, 3], [1, 1], [1, 1], [1, 1], group, channels // group, 1.0, False)
    op = torch.ops.internimage.dcnv3.default
    op_backward = torch.ops.internimage._dcnv3_backward.default
    op4 = torch.ops.internimage.dcnv4.default
    op4_backward = torch.ops.internimage._dcnv4_backward.default

    with torch.no_grad():
        fwd = timer(lambda: op(x, offset, mask, *params))
        fwd4 = timer(lambda: op4(x, offset_mask, *params))
        ref_fwd = timer(lambda: dcnv3_reference(x, offset, mask, *params))
    bwd = timer(lambda: op_backward(grad, x, offset, mask, *params))
    bwd4 = timer(lambda: op4_backward(grad, x, offset_mask, *params))
    leaves = [t.detach().requires_grad_() for t in (x, offset, mask)]
    ref_out = dcnv3_reference(*leaves, *params)
    ref_bwd = timer(
        lambda: torch.autograd.grad(ref_out, leaves, grad, retain_graph=True)
    )
    pixels = n * size * size
    elem = x.element_size()
    fwd_bytes = pixels * (2 * channels + 3 * group * POINTS) * elem
    bwd_bytes = pixels * (3 * channels + 6 * group * POINTS) * elem
    packed = offset_mask.shape[-1]
    fwd4_bytes = pixels * (2 * channels + packed) * elem
    bwd4_bytes = pixels * (3 * channels + 2 * packed) * elem
    return {
        "stage": f"{size}^2x{channels} g{group}",
        "N": n,
        "dtype": str(dtype).removeprefix("torch."),
        "fwd_us": fwd,
        "ref_fwd_us": ref_fwd,
        "fwd_bw": fwd_bytes / (fwd * 1e-6) / bandwidth,
        "bwd_us": bwd,
        "ref_bwd_us": ref_bwd,
        "bwd_bw": bwd_bytes / (bwd * 1e-6) / bandwidth,
        "fwd4_us": fwd4,
        "fwd4_bw": fwd4_bytes / (fwd4 * 1e-6) / bandwidth,
        "bwd4_us": bwd4,
        "bwd4_bw": bwd4_bytes / (bwd4 * 1e-6) / bandwidth,
    }


def bench_model(name: str, batch: int, train: bool, steps: int = 10) -> float:
    """Images/s of `name` in bf16 autocast: inference forward, or a full SGD training step."""
    import timm

    model = timm.create_model(name, num_classes=1000).cuda()
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    target = torch.randint(0, 1000, (batch,), device="cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if not train:
                with torch.inference_mode():
                    return model(x)
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train(train)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument(
        "--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"]
    )
    parser.add_argument("--model-batch", type=int, default=64)
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model timings")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="run every op path once on tiny CPU inputs (checks the script without a GPU)",
    )
    args = parser.parse_args()
    if args.dry_run:
        return dry_run()

    if not torch.cuda.is_available():
        print(
            "bench_gpu.py: CUDA is not available (torch.cuda.is_available() is False); "
            "run it on a machine with an NVIDIA GPU and a CUDA build of torch.",
            file=sys.stderr,
        )
        return 2
    import internimage  # noqa: F401  (registers the ops and the timm models)
    from internimage.ops import extension_error

    if not all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"internimage::{op}", "CUDA")
        for op in ("dcnv3", "dcnv4")
    ):
        print(
            "bench_gpu.py: internimage._C has no CUDA kernels "
            f"({extension_error() or 'built without CUDA'}); rebuild with "
            "FORCE_CUDA=1 pip install --no-build-isolation -e .",
            file=sys.stderr,
        )
        return 2

    torch.backends.cudnn.benchmark = True
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    print(
        f"device {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
        f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (2 x bytes / time)"
    )

    rows = []
    for dtype_name in args.dtypes:
        for size, channels, group in STAGES:
            for n in args.batch_sizes:
                row = bench_op_case(n, size, channels, group, DTYPES[dtype_name], bandwidth)
                rows.append(row)
                print(
                    f"  {row['stage']:>14} N={n:<3} {row['dtype']:>8}: fwd {row['fwd_us']:8.1f} us "
                    f"(ref {row['ref_fwd_us']:8.1f}, dcnv4 {row['fwd4_us']:8.1f}), "
                    f"bwd {row['bwd_us']:8.1f} us (ref {row['ref_bwd_us']:8.1f}, "
                    f"dcnv4 {row['bwd4_us']:8.1f})"
                )
        torch.cuda.empty_cache()

    model_rows = []
    if not args.no_model:
        for name in ("internimage_t", "convnext_tiny"):
            try:
                infer = bench_model(name, args.model_batch, train=False)
                train = bench_model(name, args.model_batch, train=True)
            except Exception as error:  # the model may not exist yet; report and go on
                print(f"model {name}: skipped ({type(error).__name__}: {error})")
                continue
            finally:
                torch.cuda.empty_cache()
            model_rows.append((name, infer, train))

    print()
    print(
        "DCNv3 op, CUDA events, us per call; x = reference time / op time; "
        "%bw = compulsory bytes / time / copy bandwidth"
    )
    header = (
        f"{'stage':>14} {'N':>3} {'dtype':>8} | {'fwd us':>8} {'x':>6} {'%bw':>5} "
        f"| {'bwd us':>8} {'x':>6} {'%bw':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['stage']:>14} {r['N']:>3} {r['dtype']:>8} | {r['fwd_us']:8.1f} "
            f"{r['ref_fwd_us'] / r['fwd_us']:6.1f} {100 * r['fwd_bw']:5.1f} | "
            f"{r['bwd_us']:8.1f} {r['ref_bwd_us'] / r['bwd_us']:6.1f} {100 * r['bwd_bw']:5.1f}"
        )
    print_dcnv4_table(rows)
    if model_rows:
        print(f"\nmodel, bf16 autocast, batch {args.model_batch}: images/s")
        print(f"{'model':>14} | {'forward':>9} | {'train step':>10}")
        for name, infer, train in model_rows:
            print(f"{name:>14} | {infer:9.0f} | {train:10.0f}")
    return 0


def print_dcnv4_table(rows: list[dict]) -> None:
    """DCNv4 beside DCNv3: times, shares of the copy bandwidth, ratios (the targets: forward
    >= 50 % of copy bandwidth at 56^2x64 g4, N=64, float32 and bfloat16; backward <= 3x its
    forward)."""
    print(
        "\nDCNv4 op, CUDA events, us per call; v4/v3 = DCNv4 time / DCNv3 time; "
        "%bw as above (packed offset_mask width); bwd/fwd = DCNv4 backward / forward"
    )
    header = (
        f"{'stage':>14} {'N':>3} {'dtype':>8} | {'fwd us':>8} {'%bw':>5} {'v4/v3':>6} "
        f"| {'bwd us':>8} {'%bw':>5} {'v4/v3':>6} {'bwd/fwd':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['stage']:>14} {r['N']:>3} {r['dtype']:>8} | {r['fwd4_us']:8.1f} "
            f"{100 * r['fwd4_bw']:5.1f} {r['fwd4_us'] / r['fwd_us']:6.2f} | "
            f"{r['bwd4_us']:8.1f} {100 * r['bwd4_bw']:5.1f} {r['bwd4_us'] / r['bwd_us']:6.2f} "
            f"{r['bwd4_us'] / r['fwd4_us']:7.2f}"
        )


def dry_run() -> int:
    """Every op path and both tables once on tiny CPU inputs: checks the script (argument
    handling, inputs, byte counts, tables) on a machine without a GPU. Times are meaningless."""
    import internimage  # noqa: F401  (registers the ops)

    rows = [
        bench_op_case(n, size, channels, group, dtype, bandwidth=1e10, timer=cpu_time_us)
        for size, channels, group in ((5, 64, 4), (3, 32, 2))
        for n in (1, 2)
        for dtype in (torch.float32, torch.bfloat16)
    ]
    print_dcnv4_table(rows)
    print("bench_gpu.py --dry-run: ok (CPU, tiny shapes; times are not meaningful)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
