"""The DCNv3 operator: functional API, pure-PyTorch reference, fake and autograd registrations.

Layouts (channels-last, as in the original InternImage):

* ``input``  ``(N, H_in, W_in, group * group_channels)``
* ``offset`` ``(N, H_out, W_out, group * P * 2)``, ordered ``[group][point][x, y]``
* ``mask``   ``(N, H_out, W_out, group * P)``, ordered ``[group][point]``, already normalised
* output     ``(N, H_out, W_out, group * group_channels)``

``P = kernel_h * kernel_w - remove_center``. Points are enumerated kernel-width index outer,
kernel-height index inner. A sample at ``(x, y)`` (pixel-centre coordinates) is

    x = w_out * stride_w - pad_w + half_w + (i * dilation_w - half_w + offset_x) * offset_scale

(likewise for y), bilinearly interpolated with zeros outside the image; it contributes only
when ``-1 < y < H_in`` and ``-1 < x < W_in``. NaN or infinite offsets fail that test, so such
a sample contributes zero to the output and gets zero gradients.

The compiled op ``torch.ops.internimage.dcnv3`` (CPU, and CUDA when built with it) is used when
the extension is importable; otherwise :func:`dcnv3` falls back to :func:`dcnv3_reference`
with a one-time warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dcnv3", "dcnv3_reference", "extension_available", "extension_error"]

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
    """Whether the compiled DCNv3 kernels (``internimage._C``) were loaded."""
    return _EXTENSION_ERROR is None


def extension_error() -> str | None:
    """Why the compiled extension failed to import, or None when it loaded."""
    return _EXTENSION_ERROR


def _pair(value: IntPair, name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"dcnv3: {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return value, value
    if isinstance(value, torch.SymInt):
        return value, value  # type: ignore[return-value]
    values = tuple(value)
    if len(values) != 2 or not all(
        isinstance(v, int | torch.SymInt) and not isinstance(v, bool) for v in values
    ):
        raise TypeError(f"dcnv3: {name} must be an int or a pair of ints, got {value!r}")
    return values  # type: ignore[return-value]


def _output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


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
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], int, int]:
    """Validates one call; returns the four pairs, the output size and P (points per group)."""
    for name, tensor in (("input", input), ("offset", offset), ("mask", mask)):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"dcnv3: {name} must be a Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(
                f"dcnv3: {name} must be 4-D (N, H, W, C), got {tensor.dim()}-D "
                f"with shape {tuple(tensor.shape)}"
            )
    if not input.dtype.is_floating_point:
        raise TypeError(f"dcnv3: input must be a floating-point tensor, got {input.dtype}")
    for name, tensor in (("offset", offset), ("mask", mask)):
        if tensor.dtype != input.dtype:
            raise TypeError(
                f"dcnv3: {name} must have the input's dtype {input.dtype}, got {tensor.dtype}"
            )
        if tensor.device != input.device:
            raise ValueError(
                f"dcnv3: {name} must be on the input's device {input.device}, "
                f"got {tensor.device}"
            )
    kernel = _pair(kernel_size, "kernel_size")
    strides = _pair(stride, "stride")
    pads = _pair(padding, "padding")
    dilations = _pair(dilation, "dilation")
    for name, pair, minimum in (
        ("kernel_size", kernel, 1),
        ("stride", strides, 1),
        ("padding", pads, 0),
        ("dilation", dilations, 1),
    ):
        if pair[0] < minimum or pair[1] < minimum:
            raise ValueError(f"dcnv3: {name} must be >= {minimum}, got {tuple(pair)}")
    for name, value in (("group", group), ("group_channels", group_channels)):
        if isinstance(value, bool) or not isinstance(value, int | torch.SymInt):
            raise TypeError(f"dcnv3: {name} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"dcnv3: {name} must be >= 1, got {value}")
    n, height, width, channels = input.shape
    if channels != group * group_channels:
        raise ValueError(
            f"dcnv3: input channels must equal group * group_channels = {group} * "
            f"{group_channels} = {group * group_channels}, got {channels}"
        )
    if height < 1 or width < 1:
        raise ValueError(f"dcnv3: input height and width must be >= 1, got ({height}, {width})")
    if remove_center and kernel[0] * kernel[1] == 1:
        raise ValueError(
            f"dcnv3: remove_center needs a kernel with more than one tap, got kernel_size {kernel}"
        )
    if not isinstance(offset_scale, int | float) or offset_scale != offset_scale:
        raise ValueError(f"dcnv3: offset_scale must be a finite number, got {offset_scale!r}")
    points = kernel[0] * kernel[1] - int(bool(remove_center))
    out_h = _output_size(height, kernel[0], strides[0], pads[0], dilations[0])
    out_w = _output_size(width, kernel[1], strides[1], pads[1], dilations[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"dcnv3: output size must be >= 1, got ({out_h}, {out_w}) from input "
            f"({height}, {width}), kernel_size {kernel}, stride {strides}, padding {pads}, "
            f"dilation {dilations}"
        )
    for name, tensor, last in (
        ("offset", offset, group * points * 2),
        ("mask", mask, group * points),
    ):
        expected = (n, out_h, out_w, last)
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"dcnv3: {name} must have shape {expected}, got {tuple(tensor.shape)}"
            )
    return kernel, strides, pads, dilations, (out_h, out_w), points


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
        ``(N, H_out, W_out, group * group_channels)`` in the input's dtype.
    """
    input, offset, mask = _autocast_inputs(input, offset, mask)
    kernel, strides, pads, dilations, _, _ = _check_args(
        input, offset, mask, kernel_size, stride, padding, dilation, group, group_channels,
        offset_scale, remove_center,
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


def _autocast_inputs(input: Tensor, offset: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
    """Autocast policy (the compiled op applies the same one): inside an autocast region, the
    float32 tensors among input, offset and mask are cast to the autocast dtype, so the op
    runs in bfloat16/float16 with float32 accumulation; float64 is left alone."""
    tensors = (input, offset, mask)
    if not isinstance(input, Tensor) or input.device.type not in ("cpu", "cuda"):
        return tensors
    if not torch.is_autocast_enabled(input.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(input.device.type)
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float32 else t for t in tensors
    )


def _kernel_device_types() -> frozenset[str]:
    """Device types the compiled op has kernels for (read once: torch.compile cannot trace it)."""
    if _EXTENSION_ERROR is not None:
        return frozenset()
    keys = {"cpu": "CPU", "cuda": "CUDA"}
    return frozenset(
        device
        for device, key in keys.items()
        if torch._C._dispatch_has_kernel_for_dispatch_key("internimage::dcnv3", key)
    ) | {"meta"}  # the fake kernel answers for meta tensors


_KERNEL_DEVICE_TYPES = _kernel_device_types()


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
        f"internimage: {reason}; DCNv3 falls back to the slow pure-PyTorch reference. "
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
        offset_scale, remove_center,
    )
    return _reference_sampling(
        input, offset, mask, kh, kw, sh, sw, ph, pw, dh, dw, out_h, out_w, group,
        group_channels, points, offset_scale, remove_center,
    )


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
    TorchScript, through :func:`_dcnv3_reference_scripted`)."""
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
# TorchScript entry points, called by the scripted DCNv3 module (internimage.dcnv3): argument
# checks are left to the op / the module, whose geometry is valid by construction.


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

else:
    # Without the extension the op does not exist for TorchScript to resolve; like dcnv3,
    # fall back to the reference (torch.jit.script of a DCNv3 module warns once).
    _dcnv3_scripted = _dcnv3_reference_scripted


# ---------------------------------------------------------------------------------------------
# Registrations for the compiled op: fake kernels (for torch.compile / meta tensors) and autograd.

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

    def _setup_context(ctx, inputs, output):
        input, offset, mask, *params = inputs
        ctx.save_for_backward(input, offset, mask)
        ctx.params = params

    def _backward(ctx, grad_output):
        input, offset, mask = ctx.saved_tensors
        grad_input, grad_offset, grad_mask = torch.ops.internimage._dcnv3_backward.default(
            grad_output, input, offset, mask, *ctx.params
        )
        return (grad_input, grad_offset, grad_mask) + (None,) * len(ctx.params)

    torch.library.register_autograd(
        "internimage::dcnv3", _backward, setup_context=_setup_context
    )

    def _no_double_backward(ctx, *grads):
        raise RuntimeError(
            "dcnv3: double backward (gradients of gradients) is not supported; "
            "use torch.func or finite differences on dcnv3_reference instead"
        )

    def _no_setup(ctx, inputs, output):
        pass

    torch.library.register_autograd(
        "internimage::_dcnv3_backward", _no_double_backward, setup_context=_no_setup
    )

    # Internal forward-only ops of the fused float32 CPU inference path
    # (internimage.cpu_inference): shapes for torch.compile / meta tensors.

    @torch.library.register_fake("internimage::_dwconv_layernorm_gelu")
    def _dwconv_layernorm_gelu_fake(input, conv_weight, conv_bias, norm_weight, norm_bias, eps):
        if input.dim() != 4:
            raise ValueError(
                f"dwconv_layernorm_gelu: input must be 4-D (N, H, W, C), got {input.dim()}-D"
            )
        return input.new_empty(input.shape)

    @torch.library.register_fake("internimage::_dcnv3_mask_logits")
    def _dcnv3_mask_logits_fake(
        input, offset, mask_logits, kernel_size, stride, padding, dilation, group,
        group_channels, offset_scale, remove_center,
    ):
        if input.dtype != torch.float32:
            raise ValueError(f"dcnv3_mask_logits: input must be float32, got {input.dtype}")
        return _dcnv3_fake(
            input, offset, mask_logits, kernel_size, stride, padding, dilation, group,
            group_channels, offset_scale, remove_center,
        )

    @torch.library.register_fake("internimage::_block_cpu_inference")
    def _block_cpu_inference_fake(
        x, norms, norm_eps, gamma1, gamma2, dcn, branch_eps, geometry, offset_scale, mlp
    ):
        if x.dim() != 4 or x.dtype != torch.float32:
            raise ValueError(
                "block_cpu_inference: x must be a 4-D (N, H, W, C) float32 tensor, got "
                f"{x.dim()}-D {x.dtype}"
            )
        return torch.empty_like(x)
