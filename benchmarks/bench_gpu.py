"""DCNv3 on CUDA: the compiled kernels against the pure-PyTorch reference, side by side.

Times forward and backward at InternImage-T's stage shapes (3x3, stride 1, pad 1, 16 channels
per group) with CUDA events, and reports each time as a share of the card's copy bandwidth,
measured in the same run. Compulsory bytes per output pixel, with s bytes per element and
P = 9 points: forward (2C + 3GP)s (read input and offset+mask, write output); backward
(3C + 6GP)s (read input, grad_output and offset+mask, write the three gradients).
If ``timm.create_model("internimage_t")`` works, it also times the whole model in bf16 against
convnext_tiny. Ends with a short table.

    python benchmarks/bench_gpu.py [--batch-sizes 1 8 64] [--dtypes float32 bfloat16] [--no-model]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

STAGES = ((56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32))  # (size, C, G) at 224 px
POINTS = 9
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def make_inputs(n: int, size: int, channels: int, group: int, dtype: torch.dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    kw = {"generator": gen, "device": "cuda"}
    x = torch.randn(n, size, size, channels, **kw).to(dtype)
    offset = torch.randn(n, size, size, group * POINTS * 2, **kw).to(dtype)
    mask = torch.softmax(torch.randn(n, size, size, group, POINTS, **kw), -1).flatten(-2)
    grad = torch.randn(n, size, size, channels, **kw).to(dtype)
    return x, offset, mask.to(dtype), grad


def bench_op_case(n, size, channels, group, dtype, bandwidth):
    from internimage.ops import dcnv3_reference

    x, offset, mask, grad = make_inputs(n, size, channels, group, dtype)
    params = ([3, 3], [1, 1], [1, 1], [1, 1], group, channels // group, 1.0, False)
    op = torch.ops.internimage.dcnv3.default
    op_backward = torch.ops.internimage._dcnv3_backward.default

    with torch.no_grad():
        fwd = cuda_time_us(lambda: op(x, offset, mask, *params))
        ref_fwd = cuda_time_us(lambda: dcnv3_reference(x, offset, mask, *params))
    bwd = cuda_time_us(lambda: op_backward(grad, x, offset, mask, *params))
    leaves = [t.detach().requires_grad_() for t in (x, offset, mask)]
    ref_out = dcnv3_reference(*leaves, *params)
    ref_bwd = cuda_time_us(
        lambda: torch.autograd.grad(ref_out, leaves, grad, retain_graph=True)
    )
    pixels = n * size * size
    elem = x.element_size()
    fwd_bytes = pixels * (2 * channels + 3 * group * POINTS) * elem
    bwd_bytes = pixels * (3 * channels + 6 * group * POINTS) * elem
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
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print(
            "bench_gpu.py: CUDA is not available (torch.cuda.is_available() is False); "
            "run it on a machine with an NVIDIA GPU and a CUDA build of torch.",
            file=sys.stderr,
        )
        return 2
    import internimage  # noqa: F401  (registers the ops and the timm models)
    from internimage.ops import extension_error

    if not torch._C._dispatch_has_kernel_for_dispatch_key("internimage::dcnv3", "CUDA"):
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
                    f"(ref {row['ref_fwd_us']:8.1f}), bwd {row['bwd_us']:8.1f} us "
                    f"(ref {row['ref_bwd_us']:8.1f})"
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
    if model_rows:
        print(f"\nmodel, bf16 autocast, batch {args.model_batch}: images/s")
        print(f"{'model':>14} | {'forward':>9} | {'train step':>10}")
        for name, infer, train in model_rows:
            print(f"{name:>14} | {infer:9.0f} | {train:10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
