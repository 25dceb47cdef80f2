"""The DCNv3 and DCNv4 operators: functional API, pure-PyTorch references, fake and autograd
registrations.

Layouts (channels-last, as in the original InternImage and DCNv4 code):

* ``input``  ``(N, H_in, W_in, group * group_channels)``
* output     ``(N, H_out, W_out, group * group_channels)``
* DCNv3: ``offset`` ``(N, H_out, W_out, group * P * 2)``, ordered ``[group][point][x, y]``;
  ``mask`` ``(N, H_out, W_out, group * P)``, ordered ``[group][point]``, used as given (the
  DCNv3 module softmaxes it).
* DCNv4: one ``offset_mask`` ``(N, H_out, W_out, C)`` with ``C >= 3 * group * P``: for each
  group in turn, its ``2P`` offsets (``[point][x, y]``) then its ``P`` mask values, used raw
  (no softmax). Channels from ``3 * group * P`` on are padding: never read, zero gradient.

``P = kernel_h * kernel_w - remove_center``. Points are enumerated kernel-width index outer,
kernel-height index inner. A sample at ``(x, y)`` (pixel-centre coordinates) is

    x = w_out * stride_w - pad_w + half_w + (i * dilation_w - half_w + offset_x) * offset_scale

(likewise for y), bilinearly interpolated with zeros outside the image; it contributes only
when ``-1 < y < H_in`` and ``-1 < x < W_in``. NaN or infinite offsets fail that test, so such
a sample contributes zero to the output and gets zero gradients. DCNv4 samples exactly as
DCNv3 does; only the layout of offsets and mask differs.

The compiled ops ``torch.ops.internimage.dcnv3`` / ``dcnv4`` (CPU, and CUDA when built with
it) are used when the extension is importable; otherwise :func:`dcnv3` / :func:`dcnv4` fall
back to :func:`dcnv3_reference` / :func:`dcnv4_reference` with a one-time warning.

Autocast: the ops' one policy is registered with the dispatcher (``csrc/autocast.cpp``), so
eager code, ``torch.compile`` and ``torch.export`` all see it: inside an autocast region every
floating-point tensor argument except float64 (float32 and float16 alike) is cast to the
autocast dtype, and the kernels accumulate in float32. The functions here only let mixed
dtypes through to the op inside such a region. The pure-PyTorch references follow PyTorch's
own autocast rules for the operators they are made of.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "dcnv3",
    "dcnv3_reference",
    "dcnv4",
    "dcnv4_reference",
    "extension_available",
    "extension_error",
]

try:
    from internimage import _C  # noqa: F401  (importing registers torch.ops.internimage.*)

    _EXTENSION_ERROR: str | None = None
except ImportError as error:  # the package stays usable through the reference path
    _EXTENSION_ERROR = f"{type(error).__name__}: {error}"

_BUILD_HINT = (
    "build it with: pip install torch==2.14.1 torchvision==0.29.1 && "
    "pip install --no-build-isolation -e ."
)
_warned_fallback = False

IntPair = int | Sequence[int]


def extension_available() -> bool:
    """Whether the compiled DCNv3/DCNv4 kernels (``internimage._C``) were loaded."""
    return _EXTENSION_ERROR is None


def extension_error() -> str | None:
    """Why the compiled extension failed to import, or None when it loaded."""
    return _EXTENSION_ERROR


def cuda_emulation_available() -> bool:
    """Whether ``internimage._C`` holds the CUDA kernels compiled for the CPU emulation of the
    CUDA execution model (the internal ops ``internimage::_emulated_cuda_dcnv3``,
    ``_emulated_cuda_dcnv3_backward``, ``_emulated_cuda_dcnv4`` and
    ``_emulated_cuda_dcnv4_backward``, CPU tensors in and out; see docs/cuda.md)."""
    return _EXTENSION_ERROR is None and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"internimage::_emulated_cuda_{op}", "CPU")
        for op in ("dcnv3", "dcnv3_backward", "dcnv4", "dcnv4_backward")
    )


def _pair(op: str, value: IntPair, name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return value, value
    if isinstance(value, torch.SymInt):
        return value, value  # type: ignore[return-value]
    values = tuple(value)
    if len(values) != 2 or not all(
        isinstance(v, int | torch.SymInt) and not isinstance(v, bool) for v in values
    ):
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {value!r}")
    return values  # type: ignore[return-value]


def _output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def _check_tensors(op: str, tensors: dict[str, Tensor], same_dtype: bool) -> None:
    """Ranks of every tensor, then the input's dtype, then the others' dtypes and devices."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(
                f"{op}: {name} must be 4-D (N, H, W, C), got {tensor.dim()}-D "
                f"with shape {tuple(tensor.shape)}"
            )
    input = tensors["input"]
    if not input.dtype.is_floating_point:
        raise TypeError(f"{op}: input must be a floating-point tensor, got {input.dtype}")
    for name, tensor in tensors.items():
        if name == "input":
            continue
        if same_dtype and tensor.dtype != input.dtype:
            raise TypeError(
                f"{op}: {name} must have the input's dtype {input.dtype}, got {tensor.dtype}"
            )
        if tensor.device != input.device:
            raise ValueError(
                f"{op}: {name} must be on the input's device {input.device}, "
                f"got {tensor.device}"
            )


def _check_geometry(
    op: str,
    input: Tensor,
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int],
           int]:
    """Checks what both ops share; returns the four pairs, the output size and P."""
    kernel = _pair(op, kernel_size, "kernel_size")
    strides = _pair(op, stride, "stride")
    pads = _pair(op, padding, "padding")
    dilations = _pair(op, dilation, "dilation")
    for name, pair, minimum in (
        ("kernel_size", kernel, 1),
        ("stride", strides, 1),
        ("padding", pads, 0),
        ("dilation", dilations, 1),
    ):
        if pair[0] < minimum or pair[1] < minimum:
            raise ValueError(f"{op}: {name} must be >= {minimum}, got {tuple(pair)}")
    for name, value in (("group", group), ("group_channels", group_channels)):
        if isinstance(value, bool) or not isinstance(value, int | torch.SymInt):
            raise TypeError(f"{op}: {name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{op}: {name} must be >= 1, got {value}")
    _, height, width, channels = input.shape
    if channels != group * group_channels:
        raise ValueError(
            f"{op}: input channels must equal group * group_channels = {group} * "
            f"{group_channels} = {group * group_channels}, got {channels}"
        )
    if height < 1 or width < 1:
        raise ValueError(f"{op}: input height and width must be >= 1, got ({height}, {width})")
    if remove_center and kernel[0] * kernel[1] == 1:
        raise ValueError(
            f"{op}: remove_center needs a kernel with more than one tap, got kernel_size "
            f"{kernel}"
        )
    if (
        isinstance(offset_scale, bool) or not isinstance(offset_scale, int | float)
        or offset_scale != offset_scale or offset_scale in (float("inf"), float("-inf"))
    ):
        raise ValueError(f"{op}: offset_scale must be a finite number, got {offset_scale!r}")
    points = kernel[0] * kernel[1] - int(bool(remove_center))
    out_h = _output_size(height, kernel[0], strides[0], pads[0], dilations[0])
    out_w = _output_size(width, kernel[1], strides[1], pads[1], dilations[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"{op}: output size must be >= 1, got ({out_h}, {out_w}) from input "
            f"({height}, {width}), kernel_size {kernel}, stride {strides}, padding {pads}, "
            f"dilation {dilations}"
        )
    return kernel, strides, pads, dilations, (out_h, out_w), points


def _mixed_dtypes_allowed(input: Tensor) -> bool:
    """Inside an autocast region the op's dispatcher policy makes the dtypes agree."""
    return torch.is_autocast_enabled(input.device.type)


def _check_args(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool,
    same_dtype: bool = True,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int],
           int]:
    """Validates one dcnv3 call; returns the four pairs, the output size and P."""
    op = "dcnv3"
    _check_tensors(op, {"input": input, "offset": offset, "mask": mask}, same_dtype)
    result = _check_geometry(
        op, input, kernel_size, stride, padding, dilation, group, group_channels, offset_scale,
        remove_center,
    )
    (out_h, out_w), points = result[4], result[5]
    n = input.shape[0]
    for name, tensor, last in (
        ("offset", offset, group * points * 2),
        ("mask", mask, group * points),
    ):
        expected = (n, out_h, out_w, last)
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"{op}: {name} must have shape {expected}, got {tuple(tensor.shape)}"
            )
    return result


def _check_dcnv4_args(
    input: Tensor,
    offset_mask: Tensor,
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool,
    same_dtype: bool = True,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int],
           int]:
    """Validates one dcnv4 call; returns the four pairs, the output size and P."""
    op = "dcnv4"
    _check_tensors(op, {"input": input, "offset_mask": offset_mask}, same_dtype)
    result = _check_geometry(
        op, input, kernel_size, stride, padding, dilation, group, group_channels, offset_scale,
        remove_center,
    )
    (out_h, out_w), points = result[4], result[5]
    n, used = input.shape[0], 3 * group * points
    shape = tuple(offset_mask.shape)
    if shape[:3] != (n, out_h, out_w) or shape[3] < used:
        raise ValueError(
            f"{op}: offset_mask must have shape ({n}, {out_h}, {out_w}, C) with C >= "
            f"3 * group * points = 3 * {group} * {points} = {used}, got {shape}"
        )
    return result


def _is_int(value: object) -> bool:
    return type(value) is int


def _fast_path(input: Tensor, group: int, group_channels: int) -> bool:
    """Whether an eager call goes straight to the compiled op, which checks its arguments
    itself (a failure is then re-checked in Python for an error of the right type)."""
    return (
        isinstance(input, Tensor)
        and input.device.type in _KERNEL_DEVICE_TYPES
        and _is_int(group)
        and _is_int(group_channels)
        and not torch.compiler.is_compiling()
    )


def dcnv3(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool = False,
) -> Tensor:
    """DCNv3 core: deformable, mask-weighted bilinear sampling per group (see module doc).

    Args:
        input: ``(N, H_in, W_in, group * group_channels)``.
        offset: ``(N, H_out, W_out, group * P * 2)``, pairs ordered (x, y).
        mask: ``(N, H_out, W_out, group * P)``, used as given (the module applies softmax).
        kernel_size, stride, padding, dilation: an int or an ``(h, w)`` pair.
        group, group_channels: number of groups and channels per group.
        offset_scale: scales the learned offsets and the regular kernel grid.
        remove_center: drop the centre tap (P = kh * kw - 1).

    Returns:
        ``(N, H_out, W_out, group * group_channels)`` in the input's dtype (the autocast
        dtype inside an autocast region, unless the input is float64).
    """
    if _fast_path(input, group, group_channels):
        try:
            return _DCNV3(
                input, offset, mask, kernel_size, stride, padding, dilation, group,
                group_channels, offset_scale, remove_center,
            )
        except (RuntimeError, TypeError):
            _check_args(
                input, offset, mask, kernel_size, stride, padding, dilation, group,
                group_channels, offset_scale, remove_center, not _mixed_dtypes_allowed(input),
            )
            raise
    kernel, strides, pads, dilations, _, _ = _check_args(
        input, offset, mask, kernel_size, stride, padding, dilation, group, group_channels,
        offset_scale, remove_center, not _mixed_dtypes_allowed(input),
    )
    if not _has_kernel_for(input.device):
        _warn_fallback(input.device)
        return dcnv3_reference(
            input, offset, mask, kernel, strides, pads, dilations, group, group_channels,
            offset_scale, remove_center,
        )
    return torch.ops.internimage.dcnv3.default(
        input, offset, mask, list(kernel), list(strides), list(pads), list(dilations),
        group, group_channels, float(offset_scale), bool(remove_center),
    )


def dcnv4(
    input: Tensor,
    offset_mask: Tensor,
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool = False,
) -> Tensor:
    """DCNv4 core: DCNv3's sampling with one packed, raw offset_mask (see module doc).

    Args:
        input: ``(N, H_in, W_in, group * group_channels)``.
        offset_mask: ``(N, H_out, W_out, C)``, ``C >= 3 * group * P``: per group its ``2P``
            offsets (pairs ordered (x, y)) then its ``P`` mask values (no softmax); the
            channels from ``3 * group * P`` on are ignored (zero gradient).
        kernel_size, stride, padding, dilation: an int or an ``(h, w)`` pair.
        group, group_channels: number of groups and channels per group (any values).
        offset_scale: scales the learned offsets and the regular kernel grid.
        remove_center: drop the centre tap (P = kh * kw - 1).

    Returns:
        ``(N, H_out, W_out, group * group_channels)`` in the input's dtype (the autocast
        dtype inside an autocast region, unless the input is float64).
    """
    if _fast_path(input, group, group_channels):
        try:
            return _DCNV4(
                input, offset_mask, kernel_size, stride, padding, dilation, group,
                group_channels, offset_scale, remove_center,
            )
        except (RuntimeError, TypeError):
            _check_dcnv4_args(
                input, offset_mask, kernel_size, stride, padding, dilation, group,
                group_channels, offset_scale, remove_center, not _mixed_dtypes_allowed(input),
            )
            raise
    kernel, strides, pads, dilations, _, _ = _check_dcnv4_args(
        input, offset_mask, kernel_size, stride, padding, dilation, group, group_channels,
        offset_scale, remove_center, not _mixed_dtypes_allowed(input),
    )
    if not _has_kernel_for(input.device):
        _warn_fallback(input.device)
        return dcnv4_reference(
            input, offset_mask, kernel, strides, pads, dilations, group, group_channels,
            offset_scale, remove_center,
        )
    return torch.ops.internimage.dcnv4.default(
        input, offset_mask, list(kernel), list(strides), list(pads), list(dilations),
        group, group_channels, float(offset_scale), bool(remove_center),
    )


def _kernel_device_types() -> frozenset[str]:
    """Device types the compiled ops have kernels for (read once: torch.compile cannot trace
    it). dcnv3 and dcnv4 come from the same library, so they have the same ones."""
    if _EXTENSION_ERROR is None:
        keys = {"cpu": "CPU", "cuda": "CUDA"}
        return frozenset(
            device
            for device, key in keys.items()
            if torch._C._dispatch_has_kernel_for_dispatch_key("internimage::dcnv3", key)
        ) | {"meta"}  # the fake kernel answers for meta tensors
    return frozenset()


_KERNEL_DEVICE_TYPES = _kernel_device_types()

if _EXTENSION_ERROR is None:
    _DCNV3 = torch.ops.internimage.dcnv3.default
    _DCNV4 = torch.ops.internimage.dcnv4.default


def _has_kernel_for(device: torch.device) -> bool:
    return device.type in _KERNEL_DEVICE_TYPES


def _warn_fallback(device: torch.device) -> None:
    global _warned_fallback
    if _warned_fallback:
        return
    _warned_fallback = True
    if _EXTENSION_ERROR is not None:
        reason = f"the compiled extension internimage._C failed to import ({_EXTENSION_ERROR})"
    else:
        reason = f"internimage._C was built without kernels for device '{device.type}'"
    warnings.warn(
        f"internimage: {reason}; dcnv3 and dcnv4 each falls back to its slow pure-PyTorch "
        f"reference. "
        f"To {_BUILD_HINT}",
        RuntimeWarning,
        stacklevel=3,
    )


def dcnv3_reference(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool = False,
) -> Tensor:
    """Pure-PyTorch DCNv3 with the same signature and semantics as :func:`dcnv3`.

    Builds every sampling location explicitly in the input's dtype (so it is exact in float64)
    and samples all points of a group with one ``grid_sample`` call. Differentiable by autograd;
    also the decomposition used for ONNX export.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (out_h, out_w), points = _check_args(
        input, offset, mask, kernel_size, stride, padding, dilation, group, group_channels,
        offset_scale, remove_center, not _mixed_dtypes_allowed(input),
    )
    return _reference_sampling(
        input, offset, mask, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w, group,
        group_channels, points, offset_scale, remove_center,
    )


def dcnv4_reference(
    input: Tensor,
    offset_mask: Tensor,
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool = False,
) -> Tensor:
    """Pure-PyTorch DCNv4 with the same signature and semantics as :func:`dcnv4`: the packed
    ``offset_mask`` split into DCNv3's offsets and (raw) mask, then DCNv3's reference
    sampling. Exact in float64; differentiable by autograd (the padding channels get zero
    gradient); also the decomposition used for ONNX export."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (out_h, out_w), points = _check_dcnv4_args(
        input, offset_mask, kernel_size, stride, padding, dilation, group, group_channels,
        offset_scale, remove_center, not _mixed_dtypes_allowed(input),
    )
    offset, mask = _split_offset_mask(offset_mask, group, points)
    return _reference_sampling(
        input, offset, mask, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w, group,
        group_channels, points, offset_scale, remove_center,
    )


def _split_offset_mask(offset_mask: Tensor, group: int, points: int) -> tuple[Tensor, Tensor]:
    """DCNv4's packed ``(N, H, W, C)`` as DCNv3's offset ``(N, H, W, G, 2P)`` and mask
    ``(N, H, W, G, P)`` (views; the padding channels are dropped)."""
    per_group = offset_mask[..., : 3 * group * points].unflatten(-1, [group, 3 * points])
    return per_group[..., : 2 * points], per_group[..., 2 * points :]


def _reference_sampling(
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
    TorchScript, through :func:`_dcnv3_reference_scripted`). ``offset`` and ``mask`` may have
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


# ---------------------------------------------------------------------------------------------
# TorchScript entry points, called by the scripted DCNv3/DCNv4 modules: argument checks are
# left to the op / the module, whose geometry is valid by construction.


def _dcnv3_reference_scripted(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool,
) -> Tensor:
    """:func:`dcnv3_reference` for TorchScript, with the op's argument types (``(h, w)`` lists)
    and without the Python argument checks."""
    kh, kw = kernel_size[0], kernel_size[1]
    out_h = _output_size(input.shape[1], kh, stride[0], padding[0], dilation[0])
    out_w = _output_size(input.shape[2], kw, stride[1], padding[1], dilation[1])
    return _reference_sampling(
        input, offset, mask, kh, kw, stride[0], stride[1], padding[0], padding[1], dilation[0],
        dilation[1], out_h, out_w, group, group_channels, kh * kw - int(remove_center),
        offset_scale, remove_center,
    )


def _dcnv4_reference_scripted(
    input: Tensor,
    offset_mask: Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool,
) -> Tensor:
    """:func:`dcnv4_reference` for TorchScript (see :func:`_dcnv3_reference_scripted`)."""
    points = kernel_size[0] * kernel_size[1] - int(remove_center)
    offset, mask = _split_offset_mask(offset_mask, group, points)
    return _dcnv3_reference_scripted(
        input, offset, mask, kernel_size, stride, padding, dilation, group, group_channels,
        offset_scale, remove_center,
    )


if _EXTENSION_ERROR is None:

    def _dcnv3_scripted(
        input: Tensor,
        offset: Tensor,
        mask: Tensor,
        kernel_size: list[int],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        group: int,
        group_channels: int,
        offset_scale: float,
        remove_center: bool,
    ) -> Tensor:
        """``torch.ops.internimage.dcnv3`` for TorchScript (the scripted code calls the op)."""
        return torch.ops.internimage.dcnv3(
            input, offset, mask, kernel_size, stride, padding, dilation, group, group_channels,
            offset_scale, remove_center,
        )

    def _dcnv4_scripted(
        input: Tensor,
        offset_mask: Tensor,
        kernel_size: list[int],
        stride: list[int],
        padding: list[int],
        dilation: list[int],
        group: int,
        group_channels: int,
        offset_scale: float,
        remove_center: bool,
    ) -> Tensor:
        """``torch.ops.internimage.dcnv4`` for TorchScript (the scripted code calls the op)."""
        return torch.ops.internimage.dcnv4(
            input, offset_mask, kernel_size, stride, padding, dilation, group, group_channels,
            offset_scale, remove_center,
        )

else:
    # Without the extension the ops do not exist for TorchScript to resolve; like dcnv3 and
    # dcnv4, fall back to the references (torch.jit.script of a module warns once).
    _dcnv3_scripted = _dcnv3_reference_scripted
    _dcnv4_scripted = _dcnv4_reference_scripted


# ---------------------------------------------------------------------------------------------
# Registrations for the compiled ops: fake kernels (for torch.compile / meta tensors) and
# autograd. The backward ops have no double backward.


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "dcnv3/dcnv4: double backward (gradients of gradients) is not supported; "
        "use torch.func or finite differences on dcnv3_reference / dcnv4_reference instead"
    )


def _no_setup(ctx, inputs, output):
    pass


if _EXTENSION_ERROR is None:

    @torch.library.register_fake("internimage::dcnv3")
    def _dcnv3_fake(
        input, offset, mask, kernel_size, stride, padding, dilation, group, group_channels,
        offset_scale, remove_center,
    ):
        _, _, _, _, (out_h, out_w), _ = _check_args(
            input, offset, mask, kernel_size, stride, padding, dilation, group,
            group_channels, offset_scale, remove_center,
        )
        return input.new_empty((input.shape[0], out_h, out_w, input.shape[3]))

    @torch.library.register_fake("internimage::_dcnv3_backward")
    def _dcnv3_backward_fake(
        grad_output, input, offset, mask, kernel_size, stride, padding, dilation, group,
        group_channels, offset_scale, remove_center,
    ):
        return (
            input.new_empty(input.shape),
            offset.new_empty(offset.shape),
            mask.new_empty(mask.shape),
        )

    def _dcnv3_setup_context(ctx, inputs, output):
        input, offset, mask, *params = inputs
        ctx.save_for_backward(input, offset, mask)
        ctx.params = params

    def _dcnv3_backward(ctx, grad_output):
        input, offset, mask = ctx.saved_tensors
        grad_input, grad_offset, grad_mask = torch.ops.internimage._dcnv3_backward.default(
            grad_output, input, offset, mask, *ctx.params
        )
        return (grad_input, grad_offset, grad_mask) + (None,) * len(ctx.params)

    torch.library.register_autograd(
        "internimage::dcnv3", _dcnv3_backward, setup_context=_dcnv3_setup_context
    )
    torch.library.register_autograd(
        "internimage::_dcnv3_backward", _no_double_backward, setup_context=_no_setup
    )

    @torch.library.register_fake("internimage::dcnv4")
    def _dcnv4_fake(
        input, offset_mask, kernel_size, stride, padding, dilation, group, group_channels,
        offset_scale, remove_center=False,
    ):
        _, _, _, _, (out_h, out_w), _ = _check_dcnv4_args(
            input, offset_mask, kernel_size, stride, padding, dilation, group,
            group_channels, offset_scale, remove_center,
        )
        return input.new_empty((input.shape[0], out_h, out_w, input.shape[3]))

    @torch.library.register_fake("internimage::_dcnv4_backward")
    def _dcnv4_backward_fake(
        grad_output, input, offset_mask, kernel_size, stride, padding, dilation, group,
        group_channels, offset_scale, remove_center,
    ):
        return input.new_empty(input.shape), offset_mask.new_empty(offset_mask.shape)

    def _dcnv4_setup_context(ctx, inputs, output):
        input, offset_mask, *params = inputs
        ctx.save_for_backward(input, offset_mask)
        ctx.params = params

    def _dcnv4_backward(ctx, grad_output):
        input, offset_mask = ctx.saved_tensors
        grad_input, grad_offset_mask = torch.ops.internimage._dcnv4_backward.default(
            grad_output, input, offset_mask, *ctx.params
        )
        return (grad_input, grad_offset_mask) + (None,) * len(ctx.params)

    torch.library.register_autograd(
        "internimage::dcnv4", _dcnv4_backward, setup_context=_dcnv4_setup_context
    )
    torch.library.register_autograd(
        "internimage::_dcnv4_backward", _no_double_backward, setup_context=_no_setup
    )

    # _dcnv3_mask_logits: dcnv3 of softmax(mask_logits) over each group's points, float32 CPU
    # (the DCNv3 module's core there). The backward recomputes the softmax rather than saving
    # it: the forward never materialises it.

    def _dcnv3_mask_logits_backward(ctx, grad_output):
        input, offset, mask_logits = ctx.saved_tensors
        group = ctx.params[4]
        mask = mask_logits.unflatten(-1, (group, -1)).softmax(-1)
        grad_input, grad_offset, grad_mask = torch.ops.internimage._dcnv3_backward.default(
            grad_output, input, offset, mask.flatten(-2), *ctx.params
        )
        grad_mask = grad_mask.unflatten(-1, (group, -1))
        grad_logits = mask * (grad_mask - (mask * grad_mask).sum(-1, keepdim=True))
        return (grad_input, grad_offset, grad_logits.flatten(-2)) + (None,) * len(ctx.params)

    torch.library.register_autograd(
        "internimage::_dcnv3_mask_logits", _dcnv3_mask_logits_backward,
        setup_context=_dcnv3_setup_context,  # saves (input, offset, mask_logits)
    )

    # Internal forward-only op of the fused float32 CPU inference path
    # (internimage.inference): shapes, so that torch.compile can trace a model after
    # optimize_for_inference.

    @torch.library.register_fake("internimage::_dwconv_layernorm_gelu")
    def _dwconv_layernorm_gelu_fake(input, conv_weight, conv_bias, norm_weight, norm_bias, eps):
        if input.dim() != 4:
            raise ValueError(
                f"_dwconv_layernorm_gelu: input must be 4-D (N, H, W, C), got {input.dim()}-D"
            )
        return input.new_empty(input.shape)

    @torch.library.register_fake("internimage::_dcnv3_mask_logits")
    def _dcnv3_mask_logits_fake(
        input, offset, mask_logits, kernel_size, stride, padding, dilation, group,
        group_channels, offset_scale, remove_center,
    ):
        if input.dtype != torch.float32:
            raise ValueError(f"_dcnv3_mask_logits: input must be float32, got {input.dtype}")
        return _dcnv3_fake(
            input, offset, mask_logits, kernel_size, stride, padding, dilation, group,
            group_channels, offset_scale, remove_center,
        )
