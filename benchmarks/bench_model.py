"""CPU latency of InternImage-T against timm's ConvNeXt-T (eval, inference_mode, float32).

Both models run in one process on the same inputs; after a warm-up, the timed forwards are
interleaved (internimage, convnext, internimage, ...) so machine-load drift hits both alike,
and the median of each is reported with the latency ratio. The same InternImage-T also runs
with the fused CPU inference kernels switched off (``unfused``: the plain modules), so the
table shows what those kernels buy. Next to wall-clock latency the
table gives the median process CPU time per forward (all threads), which is far less
sensitive to other processes competing for the cores (on a loaded machine, OpenMP threads
wait for each other and wall time measures the contention more than the model).
``--profile`` adds a torch.profiler table of InternImage-T's most expensive operators.

    python benchmarks/bench_model.py                  # batch 1 and 8 at 224x224
    python benchmarks/bench_model.py --runs 20 --threads 2 --profile
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import timm
import torch

import internimage  # noqa: F401  (registers the internimage_* models)
from internimage.cpu_inference import unfused


def _time_once(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    start, start_cpu = time.perf_counter(), time.process_time()
    model(x)
    return time.perf_counter() - start, time.process_time() - start_cpu


class Unfused(torch.nn.Module):
    """Runs ``model`` with the fused CPU inference kernels switched off (the plain modules)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with unfused():
            return self.model(x)


def bench(
    model_name: str, baseline: str, batch: int, size: int, runs: int, warmup: int,
    channels_last: bool,
) -> dict[str, list[tuple[float, float]]]:
    """(wall, cpu) seconds per forward of the model (fused kernels on, then off) and the
    baseline, interleaved run by run."""
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    models = {
        model_name: model,
        "unfused": Unfused(model),
        baseline: timm.create_model(baseline, pretrained=False).eval(),
    }
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m(x)
        for _ in range(runs):
            for name, m in models.items():
                samples[name].append(_time_once(m, x))
    return samples


def profile(name: str, batch: int, size: int, rows: int) -> None:
    """Prints the top operators (self CPU time) of a few forwards of ``name``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model(x)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                model(x)
    print(f"\nprofile: {name}, batch {batch}, {size}x{size}, 3 forwards")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="internimage_t")
    parser.add_argument("--baseline", default="convnext_tiny")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=10, help="timed forwards per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--channels-last", action="store_true", help="channels_last input")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table")
    parser.add_argument("--profile-rows", type=int, default=15)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, timm {timm.__version__}, threads "
          f"{torch.get_num_threads()} of {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}, float32, eval, inference_mode, {args.size}x{args.size}, "
          f"{args.warmup} warm-up + {args.runs} interleaved runs per model, medians")
    a, b = args.model, args.baseline
    header = (f"{'batch':>5} | {a + ' ms':>17} | {b + ' ms':>18} | {'ratio':>5} | "
              f"{a + ' cpu-ms':>21} | {b + ' cpu-ms':>22} | {'cpu ratio':>9} | "
              f"{'unfused ms':>10} | {'unfused ratio':>13}")
    print(header)
    print("-" * len(header))
    for batch in args.batch_sizes:
        samples = bench(a, b, batch, args.size, args.runs, args.warmup, args.channels_last)
        wall = {n: statistics.median(s[0] for s in samples[n]) * 1e3 for n in samples}
        cpu = {n: statistics.median(s[1] for s in samples[n]) * 1e3 for n in samples}
        print(f"{batch:>5} | {wall[a]:>17.1f} | {wall[b]:>18.1f} | {wall[a] / wall[b]:>5.2f} | "
              f"{cpu[a]:>21.1f} | {cpu[b]:>22.1f} | {cpu[a] / cpu[b]:>9.2f} | "
              f"{wall['unfused']:>10.1f} | {wall['unfused'] / wall[b]:>13.2f}")
    if args.profile:
        for batch in args.batch_sizes:
            profile(args.model, batch, args.size, args.profile_rows)


if __name__ == "__main__":
    main()
