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

This module is the one op layer: each operator is described once (:class:`DcnOp`: its name,
its tensors and the layout of their offsets and mask), and the argument checks, the public
function, the reference, the fake and autograd registrations and the export decompositions
are written once for both from that description. :func:`kernel_for` is the one place that
chooses between the compiled kernel and the reference. The DCN modules call
:func:`dcnv3_core` / :func:`dcnv4_core`, the operators with a module's square stride-1 (DCNv3)
or square (DCNv4) geometry, which also serve TorchScript.

Autocast: the ops' one policy is registered with the dispatcher (``csrc/autocast.cpp``), so
eager code, ``torch.compile`` and ``torch.export`` all see it: inside an autocast region every
floating-point tensor argument except float64 (float32 and float16 alike) is cast to the
autocast dtype, and the kernels accumulate in float32. The functions here only let mixed
dtypes through to the op inside such a region. The pure-PyTorch references follow PyTorch's
own autocast rules for the operators they are made of.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from internimage.op_reference import (
    dcnv3_reference_scripted,
    dcnv4_reference_scripted,
    output_size,
    reference_sampling,
    split_offset_mask,
)

__all__ = [
    "DcnOp",
    "DCNV3",
    "DCNV4",
    "dcnv3",
    "dcnv3_core",
    "dcnv3_reference",
    "dcnv4",
    "dcnv4_core",
    "dcnv4_core_reference",
    "dcnv4_reference",
    "extension_available",
    "extension_error",
    "kernel_for",
    "mask_logits_decompositions",
    "reference_decompositions",
    "softmax_over_points",
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

# The operators' arguments after their tensors, in schema order.
_PARAM_NAMES = ("kernel_size", "stride", "padding", "dilation", "group", "group_channels",
                "offset_scale", "remove_center")


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


# ---------------------------------------------------------------------------------------------
# The two operators' descriptions


@dataclass(frozen=True)
class DcnOp:
    """One deformable-sampling operator: everything that tells DCNv3 and DCNv4 apart.

    ``name``: the op ``torch.ops.internimage.<name>`` (its backward ``_<name>_backward``);
    ``tensor_names``: its tensor arguments, ``input`` first, then the offset/mask tensors;
    ``check_layout(op, tensors, expected)``: ValueError unless the offset/mask tensors
    (a dict by name) fit ``expected = (N, H_out, W_out, group, P)``;
    ``split(tensors, group, points)``: the offset/mask tensors as DCNv3's ``offset``
    (reshapable to ``(N, H_out, W_out, G, P, 2)``) and ``mask`` (to ``(N, H_out, W_out, G,
    P)``). Its arguments after the tensors are the same for both: ``kernel_size``, ``stride``,
    ``padding``, ``dilation``, ``group``, ``group_channels``, ``offset_scale``,
    ``remove_center``.
    """

    name: str
    tensor_names: tuple[str, ...]
    check_layout: Callable[[str, dict[str, Tensor], tuple[int, ...]], None]
    split: Callable[[tuple[Tensor, ...], int, int], tuple[Tensor, Tensor]]

    @property
    def compiled(self) -> Any:
        """``torch.ops.internimage.<name>.default`` (the extension must be loaded)."""
        return _COMPILED[self.name]

    @property
    def backward(self) -> Any:
        """``torch.ops.internimage._<name>_backward.default``."""
        return _BACKWARD[self.name]

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple[Tensor, ...], tuple]:
        """An op call's ``(tensors, params)``, positional or by keyword (``remove_center``
        defaults to False)."""
        values = dict(zip(self.tensor_names + _PARAM_NAMES, args), **kwargs)
        values.setdefault("remove_center", False)
        return (tuple(values[n] for n in self.tensor_names),
                tuple(values[n] for n in _PARAM_NAMES))


# The compiled ops by name, filled once the extension is loaded (see the end of the module).
_COMPILED: dict[str, Any] = {}
_BACKWARD: dict[str, Any] = {}


def _check_separate(op: str, tensors: dict[str, Tensor], expected: tuple[int, ...]) -> None:
    n, out_h, out_w, group, points = expected
    for name, last in (("offset", group * points * 2), ("mask", group * points)):
        shape = (n, out_h, out_w, last)
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{op}: {name} must have shape {shape}, got {tuple(tensors[name].shape)}"
            )


def _check_packed(op: str, tensors: dict[str, Tensor], expected: tuple[int, ...]) -> None:
    n, out_h, out_w, group, points = expected
    used = 3 * group * points
    shape = tuple(tensors["offset_mask"].shape)
    if shape[:3] != (n, out_h, out_w) or shape[3] < used:
        raise ValueError(
            f"{op}: offset_mask must have shape ({n}, {out_h}, {out_w}, C) with C >= "
            f"3 * group * points = 3 * {group} * {points} = {used}, got {shape}"
        )


#: DCNv3: separate ``offset`` and ``mask``.
DCNV3 = DcnOp("dcnv3", ("input", "offset", "mask"), _check_separate,
              lambda tensors, group, points: (tensors[1], tensors[2]))
#: DCNv4: one packed ``offset_mask``.
DCNV4 = DcnOp("dcnv4", ("input", "offset_mask"), _check_packed,
              lambda tensors, group, points: split_offset_mask(tensors[1], group, points))


# ---------------------------------------------------------------------------------------------
# Argument checks


class Geometry(NamedTuple):
    """Checked geometry of one call: the four ``(h, w)`` pairs, the output size and P."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    out_size: tuple[int, int]
    points: int


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


def _check(
    op: DcnOp,
    tensors: tuple[Tensor, ...],
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool = False,
    same_dtype: bool = True,
) -> Geometry:
    """Validates one call of ``op``; TypeError / ValueError naming the op and the argument."""
    name = op.name
    named = dict(zip(op.tensor_names, tensors))
    _check_tensors(name, named, same_dtype)
    kernel = _pair(name, kernel_size, "kernel_size")
    strides = _pair(name, stride, "stride")
    pads = _pair(name, padding, "padding")
    dilations = _pair(name, dilation, "dilation")
    for arg, pair, minimum in (
        ("kernel_size", kernel, 1),
        ("stride", strides, 1),
        ("padding", pads, 0),
        ("dilation", dilations, 1),
    ):
        if pair[0] < minimum or pair[1] < minimum:
            raise ValueError(f"{name}: {arg} must be >= {minimum}, got {tuple(pair)}")
    for arg, value in (("group", group), ("group_channels", group_channels)):
        if isinstance(value, bool) or not isinstance(value, int | torch.SymInt):
            raise TypeError(f"{name}: {arg} must be an int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name}: {arg} must be >= 1, got {value}")
    input = named["input"]
    n, height, width, channels = input.shape
    if channels != group * group_channels:
        raise ValueError(
            f"{name}: input channels must equal group * group_channels = {group} * "
            f"{group_channels} = {group * group_channels}, got {channels}"
        )
    if height < 1 or width < 1:
        raise ValueError(f"{name}: input height and width must be >= 1, got ({height}, {width})")
    if remove_center and kernel[0] * kernel[1] == 1:
        raise ValueError(
            f"{name}: remove_center needs a kernel with more than one tap, got kernel_size "
            f"{kernel}"
        )
    if (
        isinstance(offset_scale, bool) or not isinstance(offset_scale, int | float)
        or offset_scale != offset_scale or offset_scale in (float("inf"), float("-inf"))
    ):
        raise ValueError(f"{name}: offset_scale must be a finite number, got {offset_scale!r}")
    points = kernel[0] * kernel[1] - int(bool(remove_center))
    out_h = output_size(height, kernel[0], strides[0], pads[0], dilations[0])
    out_w = output_size(width, kernel[1], strides[1], pads[1], dilations[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"{name}: output size must be >= 1, got ({out_h}, {out_w}) from input "
            f"({height}, {width}), kernel_size {kernel}, stride {strides}, padding {pads}, "
            f"dilation {dilations}"
        )
    op.check_layout(name, named, (n, out_h, out_w, group, points))
    return Geometry(kernel, strides, pads, dilations, (out_h, out_w), points)


def _mixed_dtypes_allowed(input: Tensor) -> bool:
    """Inside an autocast region the op's dispatcher policy makes the dtypes agree."""
    return torch.is_autocast_enabled(input.device.type)


# ---------------------------------------------------------------------------------------------
# Which kernel runs


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
        stacklevel=5,
    )


def kernel_for(op: DcnOp, device: torch.device) -> Callable[..., Tensor]:
    """The kernel that runs ``op`` on ``device``: the compiled op when the extension has a
    kernel for that device type, else the reference (:func:`dcnv3_reference` /
    :func:`dcnv4_reference`) after a one-time RuntimeWarning. The one place that chooses."""
    if device.type in _KERNEL_DEVICE_TYPES:
        return op.compiled
    _warn_fallback(device)
    return _REFERENCES[op.name]


def _fast_path(input: Tensor, group: Any, group_channels: Any) -> bool:
    """Whether an eager call goes straight to the compiled op, which checks its arguments
    itself (a failure is then re-checked in Python for an error of the right type)."""
    return (
        isinstance(input, Tensor)
        and input.device.type in _KERNEL_DEVICE_TYPES
        and type(group) is int
        and type(group_channels) is int
        and not torch.compiler.is_compiling()
    )


def _call(op: DcnOp, tensors: tuple[Tensor, ...], *params: Any) -> Tensor:
    """The public function of ``op``: checks, then the kernel :func:`kernel_for` picks."""
    input = tensors[0]
    if _fast_path(input, params[4], params[5]):
        try:
            return op.compiled(*tensors, *params)
        except (RuntimeError, TypeError):
            _check(op, tensors, *params, same_dtype=not _mixed_dtypes_allowed(input))
            raise
    g = _check(op, tensors, *params, same_dtype=not _mixed_dtypes_allowed(input))
    group, group_channels, offset_scale, remove_center = params[4:]
    return kernel_for(op, input.device)(
        *tensors, list(g.kernel), list(g.stride), list(g.padding), list(g.dilation), group,
        group_channels, float(offset_scale), bool(remove_center),
    )


def _reference(op: DcnOp, tensors: tuple[Tensor, ...], *params: Any) -> Tensor:
    """The reference of ``op`` on checked arguments."""
    g = _check(op, tensors, *params, same_dtype=not _mixed_dtypes_allowed(tensors[0]))
    offset, mask = op.split(tensors, params[4], g.points)
    return reference_sampling(
        tensors[0], offset, mask, *g.kernel, *g.stride, *g.padding, *g.dilation, *g.out_size,
        params[4], params[5], g.points, params[6], params[7],
    )


# ---------------------------------------------------------------------------------------------
# Public functions


def dcnv3(input: Tensor, offset: Tensor, mask: Tensor, kernel_size: IntPair, stride: IntPair,
          padding: IntPair, dilation: IntPair, group: int, group_channels: int,
          offset_scale: float, remove_center: bool = False) -> Tensor:
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
    return _call(DCNV3, (input, offset, mask), kernel_size, stride, padding, dilation, group,
                 group_channels, offset_scale, remove_center)


def dcnv4(input: Tensor, offset_mask: Tensor, kernel_size: IntPair, stride: IntPair,
          padding: IntPair, dilation: IntPair, group: int, group_channels: int,
          offset_scale: float, remove_center: bool = False) -> Tensor:
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
    return _call(DCNV4, (input, offset_mask), kernel_size, stride, padding, dilation, group,
                 group_channels, offset_scale, remove_center)


def dcnv3_reference(input: Tensor, offset: Tensor, mask: Tensor, kernel_size: IntPair,
                    stride: IntPair, padding: IntPair, dilation: IntPair, group: int,
                    group_channels: int, offset_scale: float,
                    remove_center: bool = False) -> Tensor:
    """Pure-PyTorch DCNv3 with the same signature and semantics as :func:`dcnv3`.

    Builds every sampling location explicitly in the input's dtype (so it is exact in float64)
    and samples all points of a group with one ``grid_sample`` call. Differentiable by autograd;
    also the decomposition used for ONNX export.
    """
    return _reference(DCNV3, (input, offset, mask), kernel_size, stride, padding, dilation,
                      group, group_channels, offset_scale, remove_center)


def dcnv4_reference(input: Tensor, offset_mask: Tensor, kernel_size: IntPair, stride: IntPair,
                    padding: IntPair, dilation: IntPair, group: int, group_channels: int,
                    offset_scale: float, remove_center: bool = False) -> Tensor:
    """Pure-PyTorch DCNv4 with the same signature and semantics as :func:`dcnv4`: the packed
    ``offset_mask`` split into DCNv3's offsets and (raw) mask, then DCNv3's reference
    sampling. Exact in float64; differentiable by autograd (the padding channels get zero
    gradient); also the decomposition used for ONNX export."""
    return _reference(DCNV4, (input, offset_mask), kernel_size, stride, padding, dilation,
                      group, group_channels, offset_scale, remove_center)


_REFERENCES: dict[str, Callable[..., Tensor]] = {"dcnv3": dcnv3_reference,
                                                 "dcnv4": dcnv4_reference}



# ---------------------------------------------------------------------------------------------
# The DCN modules' entry points: the operators with a module's geometry, fx leaves (see
# dcnv3.py / dcnv4.py), compiled by TorchScript to a call of the op or of the reference.


@torch.fx.wrap  # a leaf for torch.fx: it branches on the dtype
def softmax_over_points(logits: Tensor, group: int, points: int) -> Tensor:
    """Softmax over the ``points`` logits of each group: ``(..., group * points)`` ordered
    [group][point] -> the same shape, in at least float32 (the original's softmax dtype under
    autocast).

    Written out as ``exp(x - max) / sum`` rather than ``Tensor.softmax(-1)``: PyTorch's CPU
    softmax over a last dimension of 9 is 3x slower, and the transposed ``(points, pixels)``
    layout that suits its kernel makes torch.compile's generated code 2x slower.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    by_point = logits.unflatten(-1, (group, points))
    by_point = (by_point - by_point.amax(-1, keepdim=True)).exp()
    return (by_point / by_point.sum(-1, keepdim=True)).flatten(-2)


def _offset_and_mask(value: Tensor, offset: Tensor, mask_logits: Tensor, group: int,
                     points: int) -> tuple[Tensor, Tensor]:
    """``offset`` and the softmax of ``mask_logits`` over each group's points, both in
    ``value``'s dtype (as the original under autocast): the inputs of ``internimage::dcnv3``."""
    mask = softmax_over_points(mask_logits, group, points)
    return offset.to(value.dtype), mask.to(value.dtype)


def dcnv3_core(
    value: Tensor, offset: Tensor, mask_logits: Tensor, kernel_size: int, pad: int,
    dilation: int, group: int, group_channels: int, offset_scale: float, remove_center: bool,
    reference: bool,
) -> Tensor:
    """The DCNv3 operator with a module's stride-1 geometry, NHWC in and out, applied to the
    softmax of ``mask_logits`` over each group's points.

    ``reference`` runs :func:`dcnv3_reference`; otherwise the kernel :func:`kernel_for`
    picks (scripted code calls the op, or the reference when the extension is not built). On
    the CPU in float32 the compiled op applies the softmax itself (``_dcnv3_mask_logits``).
    """
    k, p, d = [kernel_size, kernel_size], [pad, pad], [dilation, dilation]
    if not reference and not torch.jit.is_scripting():
        return _dcnv3_module_eager(value, offset, mask_logits, k, p, d, group, group_channels,
                                   offset_scale, remove_center)
    points = kernel_size * kernel_size - int(remove_center)
    offset, mask = _offset_and_mask(value, offset, mask_logits, group, points)
    geometry = (k, [1, 1], p, d, group, group_channels, offset_scale, remove_center)
    if reference:
        return dcnv3_reference_scripted(value, offset, mask, *geometry)
    return _dcnv3_scripted(value, offset, mask, *geometry)


def dcnv4_core(
    value: Tensor, offset_mask: Tensor, kernel_size: int, stride: int, pad: int, dilation: int,
    group: int, group_channels: int, offset_scale: float, remove_center: bool,
) -> Tensor:
    """The DCNv4 operator with a module's square geometry, NHWC in and out, on the kernel
    :func:`kernel_for` picks (scripted code calls the op, or the reference when the extension
    is not built)."""
    geometry = ([kernel_size, kernel_size], [stride, stride], [pad, pad],
                [dilation, dilation], group, group_channels, offset_scale, remove_center)
    if torch.jit.is_scripting():
        return _dcnv4_scripted(value, offset_mask, *geometry)
    return _dcnv4_module_eager(value, offset_mask, *geometry)


def dcnv4_core_reference(
    value: Tensor, offset_mask: Tensor, kernel_size: int, stride: int, pad: int, dilation: int,
    group: int, group_channels: int, offset_scale: float, remove_center: bool,
) -> Tensor:
    """:func:`dcnv4_core` on the reference (:func:`dcnv4_reference`), for ``core_op=
    'DCNv4_pytorch'``: a separate function, so that a scripted module holds only one."""
    return dcnv4_reference_scripted(
        value, offset_mask, [kernel_size, kernel_size], [stride, stride], [pad, pad],
        [dilation, dilation], group, group_channels, offset_scale, remove_center,
    )


@torch.jit.unused
def _dcnv3_module_eager(
    value: Tensor, offset: Tensor, mask_logits: Tensor, k: list[int], p: list[int],
    d: list[int], group: int, group_channels: int, offset_scale: float, remove_center: bool,
) -> Tensor:
    geometry = (k, [1, 1], p, d, group, group_channels, offset_scale, remove_center)
    # The softmax inside the kernel: one pass over the logits instead of five. Not in a
    # torch.jit.trace, so saved TorchScript files call only the public op.
    if (
        value.device.type == "cpu" and "cpu" in _KERNEL_DEVICE_TYPES
        and value.dtype == offset.dtype == mask_logits.dtype == torch.float32
        and not torch.jit.is_tracing()
    ):
        return torch.ops.internimage._dcnv3_mask_logits.default(
            value, offset, mask_logits, *geometry
        )
    points = k[0] * k[1] - int(remove_center)
    offset, mask = _offset_and_mask(value, offset, mask_logits, group, points)
    # The module's geometry is valid by construction and the op checks the tensors.
    return kernel_for(DCNV3, value.device)(value, offset, mask, *geometry)


@torch.jit.unused
def _dcnv4_module_eager(
    value: Tensor, offset_mask: Tensor, k: list[int], s: list[int], p: list[int],
    d: list[int], group: int, group_channels: int, offset_scale: float, remove_center: bool,
) -> Tensor:
    # The module's geometry is valid by construction and the op checks the tensors.
    return kernel_for(DCNV4, value.device)(
        value, offset_mask, k, s, p, d, group, group_channels, offset_scale, remove_center
    )


# What scripted code calls for the compiled path: the ops themselves (TorchScript resolves them
# as builtins) or, without the extension, whose ops do not exist for TorchScript to resolve,
# the references, as dcnv3 and dcnv4 fall back (torch.jit.script of a module warns once).
if _EXTENSION_ERROR is None:
    _dcnv3_scripted = torch.ops.internimage.dcnv3
    _dcnv4_scripted = torch.ops.internimage.dcnv4
else:
    _dcnv3_scripted = dcnv3_reference_scripted
    _dcnv4_scripted = dcnv4_reference_scripted


# ---------------------------------------------------------------------------------------------
# Export: the compiled ops as standard operators


def _decomposition(op: DcnOp) -> Callable[..., Tensor]:
    def decomposition(*args: Any, **kwargs: Any) -> Tensor:
        tensors, params = op.bind(args, kwargs)
        return _reference(op, tensors, *params).contiguous()

    return decomposition


def reference_decompositions() -> dict[Any, Callable[..., Tensor]]:
    """``internimage::dcnv3`` / ``dcnv4`` as standard aten ops (grid_sample based: their
    references), for ``ExportedProgram.run_decompositions``. Made contiguous like the op's
    output: the traced graph may ``view`` the op's result, and the reference returns a
    permuted (channels-first strided) tensor. The extension must be loaded."""
    return {op.compiled: _decomposition(op) for op in (DCNV3, DCNV4)}


def _mask_logits_decomposition(*args: Any, **kwargs: Any) -> Tensor:
    (input, offset, mask_logits), params = DCNV3.bind(args, kwargs)
    kernel_size, group, remove_center = params[0], params[4], params[7]
    points = kernel_size[0] * kernel_size[1] - int(remove_center)
    mask = softmax_over_points(mask_logits, group, points)
    return DCNV3.compiled(input, offset, mask, *params)


def mask_logits_decompositions() -> dict[Any, Callable[..., Tensor]]:
    """``internimage::_dcnv3_mask_logits`` (what a float32 CPU DCNv3 module calls) as the mask
    softmax and ``internimage::dcnv3``: exported graphs hold only the public op. The extension
    must be loaded."""
    return {torch.ops.internimage._dcnv3_mask_logits.default: _mask_logits_decomposition}


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


def _save_tensors(op: DcnOp) -> Callable[..., None]:
    """Autograd ``setup_context`` of ``op``: saves its tensors, keeps the rest."""
    count = len(op.tensor_names)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:count])
        ctx.params = inputs[count:]

    return setup_context


def _register(op: DcnOp) -> None:
    """Fake kernels of ``op`` and its backward, and its autograd formula (the backward op)."""

    def fake(*args, **kwargs):
        tensors, params = op.bind(args, kwargs)
        g = _check(op, tensors, *params)
        input = tensors[0]
        return input.new_empty((input.shape[0], *g.out_size, input.shape[3]))

    def backward_fake(grad_output, *args, **kwargs):
        tensors, _ = op.bind(args, kwargs)
        return tuple(t.new_empty(t.shape) for t in tensors)

    def backward(ctx, grad_output):
        grads = op.backward(grad_output, *ctx.saved_tensors, *ctx.params)
        return (*grads, *(None,) * len(ctx.params))

    torch.library.register_fake(f"internimage::{op.name}", fake)
    torch.library.register_fake(f"internimage::_{op.name}_backward", backward_fake)
    torch.library.register_autograd(f"internimage::{op.name}", backward,
                                    setup_context=_save_tensors(op))
    torch.library.register_autograd(f"internimage::_{op.name}_backward", _no_double_backward,
                                    setup_context=_no_setup)


if _EXTENSION_ERROR is None:
    _COMPILED.update({op.name: getattr(torch.ops.internimage, op.name).default
                      for op in (DCNV3, DCNV4)})
    _BACKWARD.update({op.name: getattr(torch.ops.internimage, f"_{op.name}_backward").default
                      for op in (DCNV3, DCNV4)})
    _register(DCNV3)
    _register(DCNV4)

    # _dcnv3_mask_logits: dcnv3 of softmax(mask_logits) over each group's points, float32 CPU
    # (the DCNv3 module's core there). The backward recomputes the softmax rather than saving
    # it: the forward never materialises it.

    def _dcnv3_mask_logits_backward(ctx, grad_output):
        input, offset, mask_logits = ctx.saved_tensors
        group = ctx.params[4]
        mask = mask_logits.unflatten(-1, (group, -1)).softmax(-1)
        grad_input, grad_offset, grad_mask = DCNV3.backward(
            grad_output, input, offset, mask.flatten(-2), *ctx.params
        )
        grad_mask = grad_mask.unflatten(-1, (group, -1))
        grad_logits = mask * (grad_mask - (mask * grad_mask).sum(-1, keepdim=True))
        return (grad_input, grad_offset, grad_logits.flatten(-2)) + (None,) * len(ctx.params)

    torch.library.register_autograd(
        "internimage::_dcnv3_mask_logits", _dcnv3_mask_logits_backward,
        setup_context=_save_tensors(DCNV3),  # saves (input, offset, mask_logits)
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
    def _dcnv3_mask_logits_fake(*args, **kwargs):
        (input, offset, mask_logits), params = DCNV3.bind(args, kwargs)
        if input.dtype != torch.float32:
            raise ValueError(f"_dcnv3_mask_logits: input must be float32, got {input.dtype}")
        g = _check(DCNV3, (input, offset, mask_logits), *params)
        return input.new_empty((input.shape[0], *g.out_size, input.shape[3]))
