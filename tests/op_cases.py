"""The DCNv3/DCNv4 CUDA kernels' test cases, shared by tests/test_ops_cuda.py (on a GPU) and
tests/test_ops_cuda_emulated.py (the same .cu under the CPU emulation), so that a case added for
one runs on the other too; plus the inputs, tolerances and golden-file arguments they use."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# (rtol, atol relative to the largest expected magnitude) for CUDA against CPU in one dtype.
# Reduced types: both sides accumulate in float32 and round once, so about one ulp apart.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


@dataclass(frozen=True)
class Case:
    n: int
    height: int
    width: int
    group: int
    group_channels: int
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    pad: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    offset_scale: float = 1.0  # powers of two keep CPU and GPU sampling locations bit-equal
    remove_center: bool = False

    @property
    def points(self) -> int:
        return self.kernel[0] * self.kernel[1] - int(self.remove_center)

    def out_size(self) -> tuple[int, int]:
        return tuple(
            (size + 2 * p - (d * (k - 1) + 1)) // s + 1
            for size, k, s, p, d in zip(
                (self.height, self.width), self.kernel, self.stride, self.pad, self.dilation,
                strict=True,
            )
        )

    def params(self) -> tuple:
        return (
            list(self.kernel), list(self.stride), list(self.pad), list(self.dilation),
            self.group, self.group_channels, self.offset_scale, self.remove_center,
        )


# DCNv3, every dtype. Lanes per slot: the smallest power of two >= group_channels / VEC, at
# most 32, where VEC is 16 bytes' worth of channels when group_channels allows, else 1.
CASES = {
    # InternImage's 16 channels per group: the 16-byte vector path in every dtype.
    "gc16": Case(2, 9, 11, 4, 16),
    # Odd widths: scalar path; 71 and 1025 need several channel rounds per lane.
    "gc71_stride2_dil2": Case(2, 9, 8, 2, 71, stride=(2, 2), pad=(2, 2), dilation=(2, 2)),
    "gc1025": Case(1, 4, 5, 1, 1025),
    "gc1024_g2": Case(1, 3, 4, 2, 1024),
    "gc5_scale0.5": Case(3, 7, 6, 3, 5, offset_scale=0.5),
    "gc8_remove_center": Case(2, 6, 7, 2, 8, remove_center=True),
    "gc32_k5x3_scale2": Case(2, 8, 7, 2, 32, kernel=(5, 3), pad=(2, 1), offset_scale=2.0),
    "gc2_g8_k1": Case(2, 5, 5, 8, 2, kernel=(1, 1), pad=(0, 0)),
    # One lane per slot (scalar, and one vector in float32/float64), then 16 and 32 lanes
    # with one and four vector rounds.
    "gc1": Case(2, 5, 6, 3, 1),
    "gc4_stride2": Case(2, 7, 6, 2, 4, stride=(2, 2)),
    "gc64": Case(1, 5, 4, 2, 64),
    "gc512": Case(1, 3, 3, 1, 512),
    # No batch: empty outputs and gradients, no launch.
    "empty_batch": Case(0, 5, 6, 2, 16),
}

# DCNv4 (the packed offset_mask, with padding channels), every dtype.
DCNV4_CASES = {
    "gc3_rc": Case(2, 6, 7, 3, 3, remove_center=True),
    "gc24_k5x3_scale2": Case(2, 8, 7, 2, 24, kernel=(5, 3), pad=(2, 1), offset_scale=2.0),
    "gc16_stride2_dil2": Case(2, 9, 8, 4, 16, stride=(2, 2), pad=(2, 2), dilation=(2, 2)),
    "gc1025": Case(1, 4, 5, 1, 1025),
    "gc8_n3": Case(3, 5, 6, 2, 8),
    "gc64_n1": Case(1, 5, 6, 2, 64),
}


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0):
    """input, offset, mask, grad_output in `dtype` on the CPU (drawn in float64 first)."""
    gen = torch.Generator().manual_seed(seed)
    out_h, out_w = case.out_size()
    channels = case.group * case.group_channels
    f64 = torch.float64
    x = torch.randn(case.n, case.height, case.width, channels, generator=gen, dtype=f64)
    offset = 2 * torch.randn(
        case.n, out_h, out_w, case.group * case.points * 2, generator=gen, dtype=f64
    )
    logits = torch.randn(case.n, out_h, out_w, case.group, case.points, generator=gen, dtype=f64)
    mask = torch.softmax(logits, -1).flatten(-2)
    grad = torch.randn(case.n, out_h, out_w, channels, generator=gen, dtype=f64)
    return tuple(t.to(dtype) for t in (x, offset, mask, grad))


def make_dcnv4_inputs(case: Case, dtype: torch.dtype, extra: int = 5, seed: int = 0):
    """input, offset_mask (per group 2P offsets then P raw mask values, then `extra` padding
    channels of garbage), grad_output in `dtype` on the CPU (drawn in float64 first)."""
    gen = torch.Generator().manual_seed(seed)
    out_h, out_w = case.out_size()
    f64 = torch.float64
    x = torch.randn(case.n, case.height, case.width, case.group * case.group_channels,
                    generator=gen, dtype=f64)
    offsets = 2 * torch.randn(case.n, out_h, out_w, case.group, 2 * case.points, generator=gen,
                              dtype=f64)
    mask = torch.randn(case.n, out_h, out_w, case.group, case.points, generator=gen, dtype=f64)
    padding = 50 * torch.randn(case.n, out_h, out_w, extra, generator=gen, dtype=f64)
    offset_mask = torch.cat([torch.cat([offsets, mask], -1).flatten(-2), padding], -1)
    grad = torch.randn(case.n, out_h, out_w, case.group * case.group_channels, generator=gen,
                       dtype=f64)
    return tuple(t.to(dtype) for t in (x, offset_mask, grad))


def assert_close_scaled(actual, expected, rtol, atol_rel, name):
    """assert_close with the absolute tolerance scaled by the largest expected magnitude."""
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.cpu(), expected, rtol=rtol, atol=atol_rel * scale, equal_nan=True,
        msg=lambda m: f"{name}: {m}",
    )


def golden_args(hparams: dict) -> tuple:
    """The op arguments after the tensors (kernel_size ... remove_center) of a golden op file."""
    h = hparams
    return (
        (h["kernel_h"], h["kernel_w"]),
        (h["stride_h"], h["stride_w"]),
        (h["pad_h"], h["pad_w"]),
        (h["dilation_h"], h["dilation_w"]),
        h["group"],
        h["group_channels"],
        h["offset_scale"],
        bool(h["remove_center"]),
    )
