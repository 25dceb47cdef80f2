"""ONNX export of an InternImage model: graph size and onnxruntime (CPU) vs PyTorch eager latency.

Exports the model with :func:`internimage.export_onnx` (standard-operator decomposition, and
the custom-op variant for its size), then times, interleaved in one run and with the same
thread count: PyTorch eager with the compiled DCNv3 op, PyTorch eager with the pure-PyTorch
reference op (what the ONNX graph decomposes to), and onnxruntime on the exported file.
Reports medians (and minima) over the repeats; the machine's load average is printed because
shared machines distort timings.

    python benchmarks/bench_onnx.py [--model internimage_t] [--img-size 224] [--batch 1]
                                    [--repeats 20] [--threads N] [--no-custom-op]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import timm
import torch

import internimage
from internimage.dcnv3 import DCNv3
from internimage.ops import extension_available


def file_size_mb(path: Path) -> float:
    """Size of an ONNX file plus its external-data side files, in MB (10^6 bytes)."""
    files = [path] + [p for p in path.parent.iterdir() if p.name.startswith(path.name + ".")]
    return sum(p.stat().st_size for p in files) / 1e6


def graph_stats(path: Path) -> tuple[int, Counter]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return len(proto.graph.node), Counter(
        f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in proto.graph.node
    )


def timed_export(model: torch.nn.Module, path: Path, img_size: int, custom_op: bool) -> float:
    start = time.perf_counter()
    internimage.export_onnx(model, path, img_size=img_size, custom_op=custom_op)
    return time.perf_counter() - start


def time_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def set_core_op(model: torch.nn.Module, core_op: str) -> None:
    for module in model.modules():
        if isinstance(module, DCNv3):
            module.core_op = core_op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="internimage_t")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-custom-op", action="store_true",
                        help="skip the custom-op export (its size and node count)")
    args = parser.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / f"{args.model}.onnx"
        export_s = timed_export(model, path, args.img_size, custom_op=False)
        size_mb = file_size_mb(path)
        nodes, op_types = graph_stats(path)
        custom = None
        if not args.no_custom_op and extension_available():
            custom_path = tmp / f"{args.model}_custom.onnx"
            custom_s = timed_export(model, custom_path, args.img_size, custom_op=True)
            custom = (custom_s, file_size_mb(custom_path), graph_stats(custom_path)[0])

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}

        def run_ort():
            return session.run(None, feed)[0]

        def run_torch(core_op: str):
            def run():
                set_core_op(model, core_op)
                with torch.no_grad():
                    return model(x)
            return run

        runners = {"pytorch eager, compiled op": run_torch("DCNv3")}
        runners["pytorch eager, reference op"] = run_torch("DCNv3_pytorch")
        runners["onnxruntime CPU (decomposed)"] = run_ort

        with torch.no_grad():
            expected = run_torch("DCNv3")()
        actual = torch.from_numpy(run_ort())
        rel_err = ((actual - expected).abs().max() / expected.abs().max()).item()

        for _ in range(args.warmup):
            for fn in runners.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.repeats):  # interleaved, so load changes hit every path alike
            for name, fn in runners.items():
                times[name].append(time_call(fn))
        set_core_op(model, "DCNv3")
    load_after = os.getloadavg()

    print(f"{args.model}, batch {args.batch}, {args.img_size}x{args.img_size}, float32, "
          f"{args.threads} threads; torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/"
          f"{load_before[2]:.2f}, after {load_after[0]:.2f}/{load_after[1]:.2f}/"
          f"{load_after[2]:.2f}")
    print()
    print("| ONNX graph                    | size (MB) | nodes | export (s) |")
    print("|-------------------------------|----------:|------:|-----------:|")
    print(f"| {'decomposed (GridSample)':29s} | {size_mb:9.1f} | {nodes:5d} | {export_s:10.1f} |")
    if custom is not None:
        print(f"| {'custom op internimage::DCNv3':29s} | {custom[1]:9.1f} | {custom[2]:5d} | "
              f"{custom[0]:10.1f} |")
    top = ", ".join(f"{op} {count}" for op, count in op_types.most_common(8))
    print(f"\ndecomposed graph, most frequent ops: {top}; GridSample {op_types['GridSample']}")
    print(f"onnxruntime vs PyTorch: max |diff| / max |PyTorch| = {rel_err:.2e}")
    print()
    print(f"| {f'path ({args.repeats} runs)':29s} | median (ms) |   min (ms) | vs compiled op |")
    print("|-------------------------------|------------:|-----------:|---------------:|")
    base = statistics.median(times["pytorch eager, compiled op"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name:29s} | {median * 1e3:11.1f} | {min(values) * 1e3:10.1f} | "
              f"{median / base:13.2f}x |")


if __name__ == "__main__":
    main()
