"""The timing library of ``internimage bench`` (:mod:`internimage.cli.bench`) and the
scripts in ``benchmarks/``: cases, their set-up and interleaved timing, peak memory, the
environment, the report and the warnings. Errors are ``ValueError`` naming the argument.

A run has two parts, each case timed the same way (warm-up iterations, then up to ``iters``
timed rounds or until ``budget`` seconds per case have passed, whichever comes first; the
median is reported):

1. the model's DCN op (DCNv3 for InternImage, DCNv4 for FlashInternImage), compiled kernels
   (``torch.ops.internimage.dcnv3`` / ``dcnv4``) vs the pure-PyTorch reference
   (``internimage.ops.dcnv3_reference`` / ``dcnv4_reference``), at the model's stage shapes for the
   chosen batch and image size;
2. the model (``internimage_t`` by default) vs a timm baseline (``convnext_tiny``): images/s,
   latency per batch, peak memory, parameters and GMACs, and the ratios.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` (reset before each case) minus
the allocation before the case was set up; on the CPU, the peak resident set size of the
process (``VmHWM`` from ``/proc/self/status``, reset per case through
``/proc/self/clear_refs``; ``resource.getrusage`` max RSS where that is unavailable) minus the
RSS before the case was set up, after returning freed heap memory to the OS. Both include the
model weights, inputs, activations and (with ``--train``) gradients and optimizer state.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from internimage.factory import available_cores, build_model
from internimage.table import format_table

__all__ = ["Case", "PeakMemory", "parse_dtype", "parse_paths", "dcn_stage_shapes", "op_cases",
           "PATHS", "DEFAULT_PATHS", "model_case", "prepare_case", "time_interleaved",
           "run_cases", "complexities", "environment", "report", "model_table",
           "gemm_peak_flops", "cpu_name", "busy_warnings"]

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(name: str, option: str = "dtype") -> torch.dtype:
    """'float32' / 'bfloat16' / 'float16' (or fp32 / bf16 / fp16) -> torch dtype; otherwise
    ``ValueError`` naming ``option``."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(
            f"{option}: expected one of float32, bfloat16, float16, got {name!r}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Memory


def _read_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of one benchmark case on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.method = ""
        self._resettable = False

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return
        _malloc_trim()
        self._resettable = False
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current RSS
            self._resettable = _read_status_kib("VmHWM") is not None
        except OSError:
            pass
        rss = _read_status_kib("VmRSS")
        if self._resettable and rss is not None:
            self.base = rss * 1024
            self.method = "peak RSS (VmHWM, reset per case)"
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "max RSS (getrusage; monotonic, so only growth beyond earlier cases)"

    def peak(self) -> int:
        """Bytes above the level measured at :meth:`start`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)
        if self._resettable:
            hwm = _read_status_kib("VmHWM") or 0
            return max(0, hwm * 1024 - self.base)
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base)


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass(eq=False)  # identity-hashed: cases key the timing rounds
class Case:
    """One timed workload: ``setup()`` builds it and returns the step to time."""

    part: str  # 'op' or 'model'
    label: str
    setup: Callable[[], Callable[[], Any]]
    batch: int
    info: dict[str, Any] = field(default_factory=dict)
    samples: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")


def dcn_stage_shapes(model: nn.Module, img_size: int) -> list[dict[str, Any]]:
    """The DCN geometry of each stage at ``img_size`` (first block's module): ``op`` is
    'DCNv3' or 'DCNv4' (FlashInternImage, with its ``offset_mask`` width)."""
    from internimage import DCNv3, DCNv4

    shapes = []
    for index, stage in enumerate(getattr(model, "stages", [])):
        dcn = next((m for m in stage.modules() if isinstance(m, DCNv3 | DCNv4)), None)
        if dcn is None:
            continue
        size = -(-img_size // 4)
        for _ in range(index):
            size = -(-size // 2)
        shapes.append(dict(stage=index, size=size, channels=dcn.channels, group=dcn.group,
                           group_channels=dcn.group_channels, kernel=dcn.kernel_size,
                           offset_scale=dcn.offset_scale, remove_center=dcn.remove_center,
                           op=type(dcn).__name__))
        if isinstance(dcn, DCNv4):
            shapes[-1]["offset_mask_channels"] = dcn.offset_mask.out_features
    return shapes


def _op_case(shape: dict[str, Any], impl: str, batch: int, dtype: torch.dtype,
             device: torch.device, train: bool) -> Case:
    from internimage import ops

    dcnv4 = shape["op"] == "DCNv4"
    name = "dcnv4" if dcnv4 else "dcnv3"
    op = getattr(ops, name if impl == "compiled" else f"{name}_reference")
    k, g, gc_, size = shape["kernel"], shape["group"], shape["group_channels"], shape["size"]
    points = k * k - int(shape["remove_center"])

    def setup() -> Callable[[], Any]:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, size, size, g * gc_, generator=gen).to(device, dtype)
        if dcnv4:  # one packed tensor: per group 2P offsets, P raw mask values, padding
            sampling = [torch.randn(batch, size, size, shape["offset_mask_channels"],
                                    generator=gen).to(device, dtype)]
        else:
            offset = torch.randn(batch, size, size, g * points * 2, generator=gen)
            mask = torch.softmax(torch.randn(batch, size, size, g, points, generator=gen), -1)
            sampling = [offset.to(device, dtype), mask.flatten(-2).to(device, dtype)]
        args = (k, 1, (k - 1) // 2, 1, g, gc_, shape["offset_scale"], shape["remove_center"])
        if not train:
            def step() -> Any:
                with torch.no_grad():
                    return op(x, *sampling, *args)
            return step
        leaves = [t.detach().requires_grad_() for t in (x, *sampling)]
        grad = torch.randn(batch, size, size, g * gc_, generator=gen).to(device, dtype)

        def train_step() -> Any:
            out = op(*leaves, *args)
            out.backward(grad)
            return out
        return train_step

    label = f"stage {shape['stage']} {impl}"
    info = dict(shape, impl=impl, input_shape=[batch, size, size, g * gc_])
    return Case("op", label, setup, batch, info)


#: How a model runs: as built, after internimage.optimize_for_inference, torch.compile'd (with
#: Inductor freezing for inference, which folds the frozen weights into the graph), or both.
PATHS = ("eager", "optimized", "compiled", "optimized+compiled")


def model_case(name: str, path: str, batch: int, img_size: int, dtype: torch.dtype,
                device: torch.device, train: bool, channels_last: bool) -> Case:
    def setup() -> Callable[[], Any]:
        torch.manual_seed(0)
        model = build_model(name, device=device)
        use_autocast = train and dtype != torch.float32
        if not train:
            model = model.to(dtype=dtype)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train(train)
        x = torch.randn(batch, 3, img_size, img_size, device=device,
                        dtype=torch.float32 if use_autocast else dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if "optimized" in path:
            from internimage.inference import optimize_for_inference

            model = optimize_for_inference(model)
        runner: nn.Module | Callable = model
        if "compiled" in path:
            runner = torch.compile(model)
        if not train:
            def step() -> Any:
                with torch.inference_mode():
                    return runner(x)
            if "compiled" in path:  # compiles now, with the weights frozen into the graph
                import torch._inductor.config as inductor_config

                with inductor_config.patch(freezing=True):
                    step()
            return step
        target = torch.randint(0, model.num_classes, (batch,), device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def train_step() -> Any:
            with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
                loss = F.cross_entropy(runner(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss
        return train_step

    return Case("model", f"{name} {path}", setup, batch, {"model": name, "path": path})


def gemm_peak_flops(device: torch.device, size: int = 4096, iters: int = 3) -> float:
    """The machine's float32 matrix-multiply rate, FLOP/s: a ``size``-cubed GEMM, oneDNN's
    linear on the CPU (the primitive behind the models' linears), ``torch.mm`` on CUDA."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device)
    b = torch.randn(size, size, generator=gen).to(device)
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        def step() -> Tensor:
            return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    else:
        def step() -> Tensor:
            return torch.mm(a, b)
    with torch.inference_mode():
        step()
        _sync(device)
        best = float("inf")
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_case(case: Case, device: torch.device, warmup: int,
                  progress: Any = None) -> Callable[[], Any] | None:
    """Sets ``case`` up and warms it up; records its peak memory. None when it failed.
    ``progress``: a tqdm bar to show the warm-up on, or None."""
    memory = PeakMemory(device)
    memory.start()
    try:
        step = case.setup()
        for i in range(warmup):
            if progress is not None:
                progress.set_postfix_str(f"warm-up {i + 1}/{warmup}", refresh=True)
            step()
            _sync(device)
        case.peak_bytes = memory.peak()
        case.info["memory_method"] = memory.method
        return step
    except (RuntimeError, NotImplementedError, ValueError) as error:
        case.error = _one_line(error)[:200]
        gc.collect()
        return None


def time_interleaved(steps: dict[Case, Callable[[], Any]], device: torch.device, iters: int,
                     budget: float = float("inf"), progress: Any = None) -> None:
    """Times ``steps`` in rounds, one iteration of each per round (so that drift in the
    machine's speed hits every case alike), until each has ``iters`` samples or the rounds
    have taken ``budget`` seconds per case. Appends wall-clock seconds to ``case.samples``
    and process CPU seconds (all threads) to ``case.info['cpu_s']``."""
    started = time.perf_counter()
    for i in range(iters):
        if progress is not None:
            progress.set_postfix_str(f"round {i + 1}/{iters}", refresh=True)
        for case, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                step()
                _sync(device)
            except (RuntimeError, NotImplementedError) as error:
                case.error = _one_line(error)[:200]
                continue
            case.samples.append(time.perf_counter() - t0)
            case.info.setdefault("cpu_s", []).append(time.process_time() - c0)
        if time.perf_counter() - started > budget * len(steps):
            break


# ---------------------------------------------------------------------------------------------
# A run


def op_cases(probe: nn.Module, img_size: int, batch: int, dtype: torch.dtype,
             device: torch.device, train: bool) -> list[Case]:
    """The DCN op of ``probe`` (a model, e.g. built on the meta device) at each stage shape:
    compiled kernels and pure-PyTorch reference, one case each."""
    return [_op_case(shape, impl, batch, dtype, device, train)
            for shape in dcn_stage_shapes(probe, img_size)
            for impl in ("compiled", "reference")]


def run_cases(cases: list[Case], device: torch.device, *, warmup: int, iters: int,
              budget: float = float("inf"), progress: Any = None) -> None:
    """Sets up and times ``cases``: part by part ('op', then 'model'), each case set up (with
    its memory peak) and warmed up one by one, then the part's cases timed interleaved
    (:func:`time_interleaved`). ``progress``: a tqdm-like display advanced once per case."""
    for part in dict.fromkeys(c.part for c in cases):
        steps = {}
        for case in (c for c in cases if c.part == part):
            if progress is not None:
                progress.set_description(f"set up {case.label}")
            step = prepare_case(case, device, warmup, progress)
            if step is not None:
                steps[case] = step
            if progress is not None:
                progress.update(1)
        if steps:
            if progress is not None:
                progress.set_description(f"timing {len(steps)} {part} cases")
            time_interleaved(steps, device, iters, budget, progress)
        steps.clear()
        gc.collect()


def complexities(names: list[str], img_size: int) -> dict[str, dict[str, Any]]:
    """Parameters and multiply-adds of each model at ``img_size`` (counted on the meta
    device); parameters only for a model the counter cannot run."""
    from internimage.flops import count_params, model_complexity

    out: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            out[name] = model_complexity(name, (3, img_size, img_size))
        except Exception:  # a baseline the meta-device counter cannot run: params only
            with torch.device("meta"):
                out[name] = {"params": count_params(build_model(name)), "macs": None}
    return out


def environment(device: torch.device, dtype: torch.dtype, *, batch_size: int, img_size: int,
                train: bool, channels_last: bool, paths: list[str]) -> dict[str, Any]:
    """What a reader of the results needs to know about the run and the machine."""
    import timm

    import internimage
    from internimage.ops import extension_available

    env: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "internimage": internimage.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": batch_size,
        "img_size": img_size,
        "mode": "train (forward+backward+AdamW step)" if train else "inference",
        "channels_last": channels_last,
        "paths": ",".join(paths),
        "extension": extension_available(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu"] = cpu_name()
        env["threads"] = torch.get_num_threads()
        env["cpu_count"] = available_cores()
        try:
            env["load_average_1min"] = round(os.getloadavg()[0], 2)
        except OSError:
            pass
    return env


def busy_warnings(cases: list[Case], env: dict[str, Any]) -> list[str]:
    """One-line warnings when other work shared the cores during a CPU run: the 1-minute load
    average above the cores available before the run, or a model case whose median CPU time
    per iteration stayed below 60 % of its wall time times the threads it ran with (its
    threads waited for the cores)."""
    if env.get("device") != "cpu":
        return []
    warnings_: list[str] = []
    cores, threads = env.get("cpu_count") or 1, env.get("threads") or 1
    advice = ("close other work, or compare with --threads 1, and rerun; ratios measured in "
              "one run stay comparable")
    load = env.get("load_average_1min")
    if load is not None and load > cores - 0.5:
        warnings_.append(f"WARNING: the 1-minute load average was {load:.1f} on {cores} "
                         f"core(s) before the run: other work shared the cores and these "
                         f"times are slower than the machine's; {advice}")
    starved = []
    for case in cases:  # the models only: an op case of a few ms is mostly synchronisation
        cpu, wall = case.info.get("cpu_s"), case.samples
        if case.part != "model" or not cpu or not wall or case.error:
            continue
        usage = statistics.median(cpu) / statistics.median(wall)
        if usage < 0.6 * min(threads, cores):
            starved.append((case.label, usage))
    if starved:
        worst = min(starved, key=lambda item: item[1])
        warnings_.append(f"WARNING: {len(starved)} case(s) got less CPU time than their "
                         f"{min(threads, cores)} thread(s) could use (lowest: {worst[0]}, "
                         f"{worst[1]:.2f} CPU s per wall s): other work ran on the cores; "
                         f"{advice}")
    return warnings_


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}" if seconds == seconds else "-"


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.0f}"


#: The paths ``internimage bench`` times by default: no torch.compile, whose Inductor
#: compilation takes minutes of a CPU run.
DEFAULT_PATHS = ("eager", "optimized")


def parse_paths(value: str | None, train: bool, cpu_float32: bool = True,
                option: str = "paths") -> list[str]:
    """A comma-separated subset of :data:`PATHS` (default: :data:`DEFAULT_PATHS`; 'eager'
    only with ``train`` or off float32 CPU inference, where the optimized model, which is
    float32 CPU inference only, cannot run). A bad value is a ``ValueError`` naming
    ``option``."""
    if value in (None, ""):
        return ["eager"] if train or not cpu_float32 else list(DEFAULT_PATHS)
    paths = [p.strip() for p in value.split(",") if p.strip()]
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise ValueError(f"{option}: expected a comma-separated subset of {','.join(PATHS)}, "
                         f"got {value!r}")
    if train and any("optimized" in p for p in paths):
        raise ValueError(f"{option}: 'optimized' is inference-only (optimize_for_inference "
                         "freezes the model); use eager or compiled with --train")
    if not cpu_float32 and any("optimized" in p for p in paths):
        raise ValueError(f"{option}: 'optimized' runs float32 on the CPU only "
                         "(optimize_for_inference's fused kernels); use eager or compiled")
    return list(dict.fromkeys(paths))


def optimizable(name: str) -> bool:
    """Whether optimize_for_inference has fused kernels for the model: InternImage (DCNv3)
    only; it leaves FlashInternImage's DCNv4 modules as they are."""
    return name.split(".")[0].startswith("internimage_")


def report(cases: list[Case], complexity: dict[str, dict[str, Any]], env: dict[str, Any], *,
           model: str, iters: int, budget: float, skip_op: bool, train: bool) -> str:
    """The run as text: the environment, the op table, the models' table, failures."""
    device = env["device"]
    where = env.get("gpu") or f"{env['cpu']}, {env['threads']} threads"
    lines = [
        f"internimage bench: {device} ({where}), torch {env['torch']}, timm "
        f"{env['timm']}, {env['dtype']}, batch {env['batch_size']}, "
        f"{env['img_size']}x{env['img_size']}, {env['mode']}"
        + (", channels_last" if env["channels_last"] else "")
        + (f", load average {env['load_average_1min']}" if "load_average_1min" in env else ""),
        f"timing: median of up to {iters} iterations after warm-up (at most "
        f"{budget:g} s per case); memory: "
        + ("torch.cuda.max_memory_allocated above the pre-case level"
           if device.startswith("cuda") else
           "peak RSS above the pre-case RSS (VmHWM reset per case)"),
    ]
    if not env["extension"]:
        lines.append("WARNING: the compiled extension internimage._C is not loaded: the "
                     "'compiled' op timings are the pure-PyTorch fallback")
    op_cases_ = [c for c in cases if c.part == "op"]
    if not op_cases_ and not skip_op:
        lines += ["", f"DCN op: skipped ({model} has no DCNv3 / DCNv4 stages)"]
    if op_cases_:
        rows = []
        by_stage: dict[int, dict[str, Case]] = {}
        for case in op_cases_:
            by_stage.setdefault(case.info["stage"], {})[case.info["impl"]] = case
        for stage, pair in sorted(by_stage.items()):
            comp, ref = pair.get("compiled"), pair.get("reference")
            info = (comp or ref).info
            n, h, w, c = info["input_shape"]
            speedup = (ref.median / comp.median
                       if comp and ref and comp.samples and ref.samples else float("nan"))
            rows.append([
                stage, f"({n}, {h}, {w}, {c}) G={info['group']}",
                _cell(comp, _fmt_ms), _cell(ref, _fmt_ms),
                f"{speedup:.1f}x" if speedup == speedup else "-",
                _cell(comp, lambda c: _mib(c.peak_bytes)),
                _cell(ref, lambda c: _mib(c.peak_bytes)),
            ])
        mode = "forward+backward" if train else "forward"
        lines += ["", f"{info['op']} op ({mode}) at {model}'s stage shapes: compiled "
                      "kernels vs pure-PyTorch reference", format_table(
                          ["stage", "input (N, H, W, C)", "compiled ms", "reference ms",
                           "speed-up", "compiled peak MiB", "reference peak MiB"],
                          rows, align="llrrrrr")]
    model_cases = [c for c in cases if c.part == "model"]
    if model_cases:
        lines += ["", *model_table(model_cases, complexity, env)]
    for case in cases:
        if case.error:
            lines.append(f"FAILED {case.label}: {case.error}")
    return "\n".join(lines)


def _one_line(error: BaseException) -> str:
    return "; ".join(part.strip() for part in str(error).splitlines() if part.strip())


def _best(cases: list[Case]) -> Case | None:
    timed = [c for c in cases if c.samples and not c.error]
    return min(timed, key=lambda c: c.median) if timed else None


def model_table(model_cases: list[Case], complexity: dict[str, dict[str, Any]],
                env: dict[str, Any]) -> list[str]:
    """The models' table (one row per model and path) and the latency ratios of each model to
    each model after it: path by path, and best against best. With ``gemm_peak_gflops``
    in ``env``, each row's multiply-adds per second as a share of that GEMM rate."""
    peak = env.get("gemm_peak_gflops")
    rows = []
    for case in model_cases:
        info = complexity.get(case.info["model"], {})
        macs = info.get("macs")
        share = "-"
        if peak and macs and case.samples and not case.error:
            share = f"{macs * case.batch / case.median / (peak * 1e9 / 2):.2f}"
        rows.append([
            case.info["model"], case.info["path"],
            f"{info['params'] / 1e6:.2f}" if info.get("params") else "-",
            f"{macs / 1e9:.2f}" if macs else "-",
            _cell(case, lambda c: f"{c.batch / c.median:.1f}"),
            _cell(case, lambda c: _fmt_ms(c.median)),
            _cell(case, lambda c: _fmt_ms(statistics.median(c.info["cpu_s"]))),
            _cell(case, lambda c: f"{len(c.samples)}"),
            _cell(case, lambda c: _mib(c.peak_bytes)),
            share,
        ])
    batch = model_cases[0].batch
    lines = [f"Models ({env['mode']})", format_table(
        ["model", "path", "params (M)", "GMACs", "images/s", f"latency ms (batch {batch})",
         "cpu ms", "iters", "peak MiB", "MAC/s ÷ GEMM peak"], rows, align="llrrrrrrrr")]
    if peak:
        lines.append(f"GEMM peak: {peak:.0f} GFLOP/s (float32, 4096^3, same run)")
    names = list(dict.fromkeys(c.info["model"] for c in model_cases))
    for index, name in enumerate(names):
        for baseline in names[index + 1:]:
            ratios = _ratios(model_cases, name, baseline)
            if ratios:
                lines.append(f"latency {name} / {baseline}: " + ", ".join(ratios))
    return lines


def _ratios(model_cases: list[Case], name: str, baseline: str) -> list[str]:
    """``name``'s latency over ``baseline``'s, path by path, then best path against best."""
    ours = {c.info["path"]: c for c in model_cases if c.info["model"] == name}
    base = {c.info["path"]: c for c in model_cases if c.info["model"] == baseline}
    ratios = []
    for path, case in ours.items():
        other = base.get(path)
        if other is not None and case.samples and other.samples:
            ratios.append(f"{path} {case.median / other.median:.2f}x")
    best_ours, best_base = _best(list(ours.values())), _best(list(base.values()))
    if best_ours is not None and best_base is not None:
        ratios.append(f"best ({best_ours.info['path']}) / best ({best_base.info['path']}) "
                      f"{best_ours.median / best_base.median:.2f}x")
    return ratios


def _cell(case: Case | None, fmt: Callable[[Any], str]) -> str:
    if case is None:
        return "-"
    if case.error:
        return "error"
    if not case.samples:
        return "-"
    return fmt(case.median if fmt is _fmt_ms else case)
