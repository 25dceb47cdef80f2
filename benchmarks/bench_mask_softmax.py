"""Does the mask softmax inside the DCNv3 core pay? InternImage-T with its DCNv3 modules as
built (float32 CPU: ``internimage::_dcnv3_mask_logits``, the softmax inside the sampling
kernel) against the same model whose modules run the softmax as its own step
(``softmax_over_points``, then ``internimage::dcnv3``), eager and compiled (Inductor
freezing), timed interleaved in one process; medians and the ratio fused ÷ separate.

    python benchmarks/bench_mask_softmax.py                  # batch 1 and 8, 12 rounds
    python benchmarks/bench_mask_softmax.py --batch-sizes 1 --no-compile
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch
import torch._inductor.config as inductor_config
from torch import Tensor

import internimage  # noqa: F401  (registers the timm models)
from internimage.bench import Case, cpu_name, time_interleaved
from internimage.dcnv3 import DCNv3, check_nhwc_input
from internimage.ops import softmax_over_points


class SeparateSoftmaxDCNv3(DCNv3):
    """DCNv3 with the mask softmax as its own step before the public op (what the module
    ran before the softmax moved into the core), without the centre-feature gate, which
    InternImage-T does not have."""

    def forward(self, x: Tensor) -> Tensor:
        x_nchw = check_nhwc_input(x, self.channels).permute(0, 3, 1, 2)
        value = self.input_proj(x_nchw.permute(0, 2, 3, 1))
        x1 = self.dw_act(self.dw_norm(self.dw_conv(x_nchw)))
        offset = self.offset(x1.permute(0, 2, 3, 1))
        mask = softmax_over_points(self.mask(x1.permute(0, 2, 3, 1)), self.group, self.points)
        k, p, d = self.kernel_size, self.pad, self.dilation
        y = torch.ops.internimage.dcnv3.default(
            value, offset, mask, [k, k], [1, 1], [p, p], [d, d], self.group,
            self.group_channels, self.offset_scale, self.remove_center,
        )
        return self.output_proj(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=12, help="timed rounds (default: 12)")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    args = parser.parse_args()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"internimage_t, float32, inference_mode, 224x224, {args.runs} interleaved rounds")
    for batch in args.batch_sizes:
        torch.manual_seed(0)
        fused = timm.create_model("internimage_t").eval()
        separate = copy.deepcopy(fused)
        for module in separate.modules():
            if type(module) is DCNv3:
                module.__class__ = SeparateSoftmaxDCNv3
        x = torch.randn(batch, 3, 224, 224)
        runners = {("eager", "fused"): fused, ("eager", "separate"): separate}
        if not args.no_compile:
            runners[("compiled", "fused")] = torch.compile(fused)
            runners[("compiled", "separate")] = torch.compile(separate)
        steps = {}
        for (path, softmax), runner in runners.items():
            def step(runner=runner, x=x):
                with torch.inference_mode():
                    return runner(x)
            case = Case("model", f"{path} {softmax}", lambda step=step: step, batch,
                        {"path": path, "softmax": softmax})
            steps[case] = step
        with inductor_config.patch(freezing=True):
            with torch.inference_mode():
                torch.testing.assert_close(fused(x), separate(x), rtol=1e-4, atol=1e-4)
            for step in steps.values():  # warm-up (and compilation, with frozen weights)
                for _ in range(2):
                    step()
        time_interleaved(steps, torch.device("cpu"), args.runs)
        median = {(c.info["path"], c.info["softmax"]): c.median * 1e3 for c in steps}
        for path in dict.fromkeys(path for path, _ in runners):
            a, b = median[(path, "fused")], median[(path, "separate")]
            print(f"batch {batch} {path}: softmax in the core {a:.1f} ms, separate {b:.1f} ms, "
                  f"ratio {a / b:.3f}", flush=True)

if __name__ == "__main__":
    main()
