"""benchmarks/bench_model.py --profile: each op's self time lands in its kind (GEMM, conv,
internimage ops, other), so the split can bound one model's time against another's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from internimage.bench import Case

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_model.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_op_kinds() -> None:
    bench = load_script()
    assert bench._kind("aten::addmm") == "GEMM"
    assert bench._kind("mkl::_mkl_linear") == "GEMM"
    assert bench._kind("mkldnn::_convolution_pointwise") == "conv"
    assert bench._kind("aten::mkldnn_convolution") == "conv"
    assert bench._kind("internimage::_dcnv3_mask_logits") == "internimage ops"
    assert bench._kind("aten::gelu") == "other"
    assert bench._kind("graph_0_cpp_fused_add_addmm_gelu_0") == "other"  # Inductor kernel


def test_profile_table_splits_a_forward() -> None:
    bench = load_script()
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 64),
                          nn.GELU()).eval()
    x = torch.randn(2, 3, 32, 32)

    def step():
        with torch.inference_mode():
            return model(x)

    case = Case("model", "toy eager", lambda: step, 2, {"model": "toy", "path": "eager"})
    lines = bench.profile_table({case: step}, batch=2, forwards=2)
    assert lines[1] == "| model | path | GEMM | conv | internimage ops | other | total |"
    cells = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert cells[:2] == ["toy", "eager"]
    gemm, conv, ours, other, total = map(float, cells[2:])
    assert gemm > 0 and conv > 0 and ours == 0 and other > 0
    assert abs(gemm + conv + ours + other - total) < 0.2  # rounding of the printed cells
