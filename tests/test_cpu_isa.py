"""The CPU kernels' narrower instruction-set builds (AVX2, baseline x86-64) agree with the one
this machine picks: each runs in a subprocess with INTERNIMAGE_CPU_ISA capping the dispatch."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Runs every CPU kernel on fixed inputs and saves the results to the path in argv[1].
_SCRIPT = r"""
import sys
import torch
import internimage._C  # loads the ops

ops = torch.ops.internimage
torch.manual_seed(0)
results = {"isa": internimage._C.cpu_isa()}
# group_channels 16 and 32 take the fixed-length paths, 12 the generic one
for group, gc in [(4, 16), (2, 32), (3, 12)]:
    value = torch.randn(2, 7, 9, group * gc, dtype=torch.float64)
    offset = 2.0 * torch.randn(2, 7, 9, group * 18, dtype=torch.float64)
    logits = 2.0 * torch.randn(2, 7, 9, group * 9, dtype=torch.float64)
    mask = logits.unflatten(-1, (group, 9)).softmax(-1).flatten(-2)
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1], group, gc, 1.0, False)
    grad = torch.randn(2, 7, 9, group * gc, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        args = (value.to(dtype), offset.to(dtype), mask.to(dtype))
        results[f"forward_{group}_{gc}_{dtype}"] = ops.dcnv3(*args, *geometry)
        results[f"backward_{group}_{gc}_{dtype}"] = ops._dcnv3_backward(
            grad.to(dtype), *args, *geometry)
    results[f"mask_logits_{group}_{gc}"] = ops._dcnv3_mask_logits(
        value.float(), offset.float(), logits.float(), *geometry)
    # DCNv4: the same numbers packed per group (offsets, then the raw logits), 3 padding channels
    packed = torch.cat([offset.unflatten(-1, (group, 18)), logits.unflatten(-1, (group, 9))], -1)
    offset_mask = torch.cat([packed.flatten(-2), torch.randn(2, 7, 9, 3, dtype=torch.float64)], -1)
    for dtype in (torch.float32, torch.float64):
        args = (value.to(dtype), offset_mask.to(dtype))
        results[f"dcnv4_forward_{group}_{gc}_{dtype}"] = ops.dcnv4(*args, *geometry)
        results[f"dcnv4_backward_{group}_{gc}_{dtype}"] = ops._dcnv4_backward(
            grad.to(dtype), *args, *geometry)
x = torch.randn(2, 6, 5, 80)
results["offset_branch"] = ops._dwconv_layernorm_gelu(
    x, torch.randn(80, 1, 3, 3), torch.randn(80), torch.rand(80) + 0.5, torch.randn(80), 1e-6)
# every fused kernel of optimize_for_inference, in a small model with non-trivial offsets
from internimage import InternImage, optimize_for_inference
model = InternImage(channels=32, depths=(1, 1, 1, 1), groups=(2, 2, 4, 4), num_classes=10)
with torch.no_grad():
    for name, p in model.named_parameters():
        if ".offset." in name or ".mask." in name:
            p.normal_(0.0, 0.5)
    results["optimized_model"] = optimize_for_inference(model)(torch.randn(2, 3, 64, 64))
torch.save(results, sys.argv[1])
"""


def _run(tmp_path: Path, isa: str | None) -> dict:
    path = tmp_path / f"{isa or 'native'}.pt"
    env = dict(os.environ)
    env.pop("INTERNIMAGE_CPU_ISA", None)
    if isa is not None:
        env["INTERNIMAGE_CPU_ISA"] = isa
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(path, weights_only=True)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="instruction-set dispatch exists on x86-64 only")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_narrower_isa_builds_match(tmp_path: Path, isa: str) -> None:
    native = _run(tmp_path, None)
    capped = _run(tmp_path, isa)
    assert capped.pop("isa") == isa  # the cap took effect
    if native.pop("isa") == isa:
        pytest.skip(f"this CPU's own build is {isa}: nothing narrower to compare with")
    assert native.keys() == capped.keys()
    for name, expected in native.items():
        got = capped[name]
        if isinstance(expected, (tuple, list)):
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)
        else:
            # float64 agrees to rounding; float32 to a few ulp of the result's scale (FMA
            # contraction differs)
            tol = 1e-12 if expected.dtype == torch.float64 else 1e-5
            scale = max(1.0, expected.abs().max().item())
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol * scale, msg=name)
