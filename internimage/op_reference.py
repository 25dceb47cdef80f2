"""The pure-PyTorch DCNv3/DCNv4 sampling behind :func:`internimage.ops.dcnv3_reference` and
:func:`internimage.ops.dcnv4_reference` (layouts and semantics: see :mod:`internimage.ops`).

The functions here take checked arguments: :mod:`internimage.ops` checks them, or the DCN
modules, whose geometry is valid by construction, call the TorchScript entry points
(``(h, w)`` lists, the compiled op's argument types). All of it compiles with TorchScript.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "dcnv3_reference_scripted",
    "dcnv4_reference_scripted",
    "output_size",
    "reference_sampling",
    "split_offset_mask",
]


def output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Output length of one spatial dimension (as a convolution's)."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def split_offset_mask(offset_mask: Tensor, group: int, points: int) -> tuple[Tensor, Tensor]:
    """DCNv4's packed ``(N, H, W, C)`` as DCNv3's offset ``(N, H, W, G, 2P)`` and mask
    ``(N, H, W, G, P)`` (views; the padding channels are dropped)."""
    per_group = offset_mask[..., : 3 * group * points].unflatten(-1, [group, 3 * points])
    return per_group[..., : 2 * points], per_group[..., 2 * points :]


def reference_sampling(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kh: int,
    kw: int,
    sh: int,
    sw: int,
    ph: int,
    pw: int,
    dh: int,
    dw: int,
    out_h: int,
    out_w: int,
    group: int,
    group_channels: int,
    points: int,
    offset_scale: float,
    remove_center: bool,
) -> Tensor:
    """The computation of :func:`dcnv3_reference` on checked arguments (also compiled by
    TorchScript, through :func:`dcnv3_reference_scripted`). ``offset`` and ``mask`` may have
    any shape that reshapes to DCNv3's."""
    n, height, width, _ = input.shape
    dtype, device = input.dtype, input.device
    half_h, half_w = dh * (kh - 1) // 2, dw * (kw - 1) // 2

    # Kernel taps, width index outer, height index inner; centre dropped if asked.
    tap_i, tap_j = torch.meshgrid(
        torch.arange(kw, device=device), torch.arange(kh, device=device), indexing="ij"
    )
    tap_i, tap_j = tap_i.reshape(-1), tap_j.reshape(-1)
    if remove_center:
        keep = ~((tap_i == kw // 2) & (tap_j == kh // 2))
        tap_i, tap_j = tap_i[keep], tap_j[keep]
    tap_x = (tap_i * dw - half_w).to(dtype)  # (P,)
    tap_y = (tap_j * dh - half_h).to(dtype)

    centre_x = (torch.arange(out_w, device=device) * sw - pw + half_w).to(dtype)  # (W_out,)
    centre_y = (torch.arange(out_h, device=device) * sh - ph + half_h).to(dtype)  # (H_out,)

    offset = offset.reshape(n, out_h, out_w, group, points, 2)
    loc_x = centre_x.view(1, 1, out_w, 1, 1) + (tap_x + offset[..., 0]) * offset_scale
    loc_y = centre_y.view(1, out_h, 1, 1, 1) + (tap_y + offset[..., 1]) * offset_scale

    # Samples outside -1 < loc < size (NaN included) contribute nothing: move them to a
    # location where every bilinear corner is outside, so grid_sample returns exact zeros.
    inside = (loc_x > -1) & (loc_x < width) & (loc_y > -1) & (loc_y < height)
    outside = torch.full((), -2.0, dtype=dtype, device=device)
    loc_x = torch.where(inside, loc_x, outside)
    loc_y = torch.where(inside, loc_y, outside)

    # grid_sample with align_corners=False maps pixel index p to (2p + 1) / size - 1.
    grid = torch.stack(((2 * loc_x + 1) / width - 1, (2 * loc_y + 1) / height - 1), dim=-1)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(n * group, out_h, out_w * points, 2)
    values = input.reshape(n, height, width, group, group_channels)
    values = values.permute(0, 3, 4, 1, 2).reshape(n * group, group_channels, height, width)
    sampled = F.grid_sample(
        values, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )  # (N * G, gc, H_out, W_out * P)
    sampled = sampled.view(n, group, group_channels, out_h, out_w, points)
    weights = mask.reshape(n, out_h, out_w, group, points).permute(0, 3, 1, 2, 4)
    output = (sampled * weights.unsqueeze(2)).sum(dim=-1)  # (N, G, gc, H_out, W_out)
    output = output.permute(0, 3, 4, 1, 2).reshape(n, out_h, out_w, group * group_channels)
    return output.contiguous()  # same layout as the compiled op's output


def dcnv3_reference_scripted(
    input: Tensor, offset: Tensor, mask: Tensor, kernel_size: list[int], stride: list[int],
    padding: list[int], dilation: list[int], group: int, group_channels: int,
    offset_scale: float, remove_center: bool,
) -> Tensor:
    """DCNv3's reference with the op's argument types (``(h, w)`` lists), on checked
    arguments."""
    kh, kw = kernel_size[0], kernel_size[1]
    out_h = output_size(input.shape[1], kh, stride[0], padding[0], dilation[0])
    out_w = output_size(input.shape[2], kw, stride[1], padding[1], dilation[1])
    return reference_sampling(
        input, offset, mask, kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0],
        dilation[1], out_h, out_w, group, group_channels, kh * kw - int(remove_center),
        offset_scale, remove_center,
    )


def dcnv4_reference_scripted(
    input: Tensor, offset_mask: Tensor, kernel_size: list[int], stride: list[int],
    padding: list[int], dilation: list[int], group: int, group_channels: int,
    offset_scale: float, remove_center: bool,
) -> Tensor:
    """DCNv4's reference (see :func:`dcnv3_reference_scripted`)."""
    points = kernel_size[0] * kernel_size[1] - int(remove_center)
    offset, mask = split_offset_mask(offset_mask, group, points)
    return dcnv3_reference_scripted(
        input, offset, mask, kernel_size, stride, padding, dilation, group, group_channels,
        offset_scale, remove_center,
    )
