"""The DCNv3 module of InternImage: projections, depthwise offset branch and the DCNv3 core.

Activations are channels-last: the module takes and returns ``(N, H, W, C)`` tensors, so every
projection is a plain :class:`~torch.nn.Linear` on the last dimension. The depthwise
convolution of the offset branch runs on ``x.permute(0, 3, 1, 2)``, a free view that is already
``channels_last`` in memory, and its channels_last output permutes back to a contiguous NHWC
tensor without a copy.

Parameter names follow the original ``DCNv3`` / ``DCNv3_pytorch`` modules except for the
depthwise branch, which the original wraps in ``nn.Sequential`` containers:

=============================  ===============================
original key                   this module
=============================  ===============================
``dw_conv.0.*``                ``dw_conv.*``
``dw_conv.1.1.*`` (LN)         ``dw_norm.*``
``dw_conv.1.0.*`` (BN)         ``dw_norm.*``
=============================  ===============================

:func:`convert_dcnv3_state_dict` performs that renaming; every other key (``input_proj``,
``offset``, ``mask``, ``output_proj``, ``center_feature_scale_proj_weight`` / ``_bias``) is
identical.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from internimage import ops
from internimage.ops import dcnv3_core

# The op layer's core, made a torch.fx leaf here (fx.wrap patches the name in the globals of the
# module that calls it).
torch.fx.wrap("dcnv3_core")

__all__ = [
    "DCNv3",
    "CORE_OPS",
    "LayerNormNCHW",
    "get_act_layer",
    "convert_dcnv3_state_dict",
]

#: Accepted ``core_op`` names: the compiled kernels and the pure-PyTorch reference.
CORE_OPS = ("DCNv3", "DCNv3_pytorch")

_ACT_LAYERS: dict[str, type[nn.Module]] = {"GELU": nn.GELU, "ReLU": nn.ReLU, "SiLU": nn.SiLU}
_NORM_LAYERS = ("LN", "BN")

# eps of the LayerNorms of both families (the iNaturalist metadata encoders' excepted)
LN_EPS = 1e-6


def get_act_layer(act_layer: str | type[nn.Module]) -> type[nn.Module]:
    """Resolves the original's activation names ('GELU', 'ReLU', 'SiLU') or a module class."""
    if isinstance(act_layer, str):
        if act_layer not in _ACT_LAYERS:
            raise ValueError(
                f"act_layer must be one of {sorted(_ACT_LAYERS)} or an nn.Module class, "
                f"got {act_layer!r}"
            )
        return _ACT_LAYERS[act_layer]
    if isinstance(act_layer, type) and issubclass(act_layer, nn.Module):
        return act_layer
    raise TypeError(
        f"act_layer must be a str or an nn.Module class, got {type(act_layer).__name__}"
    )


def check_norm_layer(norm_layer: str) -> str:
    """Validates the original's ``norm_layer`` names ('LN' or 'BN')."""
    if not isinstance(norm_layer, str):
        raise TypeError(f"norm_layer must be a str, got {type(norm_layer).__name__}")
    if norm_layer not in _NORM_LAYERS:
        raise ValueError(f"norm_layer must be one of {list(_NORM_LAYERS)}, got {norm_layer!r}")
    return norm_layer


class LayerNormNCHW(nn.LayerNorm):
    """LayerNorm over the channels of an ``(N, C, H, W)`` tensor; returns ``(N, C, H, W)``.

    Normalises ``x.permute(0, 2, 3, 1)``, which is contiguous (no copy) when ``x`` is
    channels_last in memory, and returns the NCHW view of the result (channels_last memory).
    Parameter names are those of :class:`torch.nn.LayerNorm`.
    """

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x.permute(0, 3, 1, 2)


def norm_nchw(norm_layer: str, num_channels: int, device=None, dtype=None) -> nn.Module:
    """The original's ``build_norm_layer(dim, norm_layer, 'channels_first', ...)`` on NCHW
    tensors: :class:`LayerNormNCHW` (eps 1e-6) for 'LN', :class:`~torch.nn.BatchNorm2d` for
    'BN'. Both return NCHW."""
    if check_norm_layer(norm_layer) == "LN":
        return LayerNormNCHW(num_channels, eps=LN_EPS, device=device, dtype=dtype)
    return nn.BatchNorm2d(num_channels, device=device, dtype=dtype)


@torch.fx.wrap  # a leaf for torch.fx: its shape tests cannot run on a Proxy
def check_nhwc_input(x: Tensor, channels: int, layer: str = "DCNv3") -> Tensor:
    """``x`` unchanged when it is ``(N, H, W, channels)``; ValueError naming ``layer``
    otherwise (an NCHW tensor would otherwise fail deep inside a matrix multiply, or run on a
    wrong layout). Shared by the DCNv3 and DCNv4 layers."""
    if x.dim() != 4 or x.shape[3] != channels:
        raise ValueError(
            f"{layer}: input must be channels-last (N, H, W, C) with C = {channels}, got shape "
            f"{list(x.shape)}" + (
                " (an NCHW tensor? pass x.permute(0, 2, 3, 1))"
                if x.dim() == 4 and x.shape[1] == channels else ""
            )
        )
    return x


def check_int(name: str, value: Any, minimum: int, layer: str = "DCNv3") -> int:
    """``value`` when it is an int (not a bool) >= ``minimum``; TypeError / ValueError naming
    ``layer`` and the argument otherwise. Shared by the DCNv3 and DCNv4 layers."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{layer}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{layer}: {name} must be >= {minimum}, got {value}")
    return value


class DCNv3(nn.Module):
    """DCNv3 token mixer of InternImage (the original ``DCNv3`` / ``DCNv3_pytorch`` module).

    Forward, for an NHWC input ``x`` of shape ``(N, H, W, C)`` with ``G = group`` groups of
    ``gc = C // G`` channels and ``P = kernel_size**2 - remove_center`` points per group:

    1. ``v = input_proj(x)``: the values to sample, ``(N, H, W, C)``;
    2. ``x1 = dw_act(dw_norm(dw_conv(x)))``: depthwise conv on the block input (not on
       ``v``), computed on the NCHW view ``(N, C, H, W)`` (channels_last memory);
    3. ``offset = offset(x1)`` ``(N, H, W, G*P*2)`` ordered [group][point][x, y];
       ``mask = softmax over the P points of each group of mask(x1)`` ``(N, H, W, G*P)``
       (:func:`~internimage.ops.softmax_over_points`, in at least float32);
    4. ``y = dcnv3(v, offset, mask, ...)`` ``(N, H, W, C)`` (offset and mask in ``v``'s dtype,
       as the original under autocast); in float32 on the CPU one op applies the softmax and
       samples (``internimage::_dcnv3_mask_logits``, with the same autograd);
    5. with ``center_feature_scale``: ``s = sigmoid(x1 @ Wcfs.T + bcfs)`` (one gate per group),
       ``y = y * (1 - s) + v * s``;
    6. ``output_proj(y)``.

    Every step calls its submodule, so forward hooks and replaced submodules take effect.
    The module preserves the spatial size, so it needs ``stride == 1`` and
    ``2 * pad == dilation * (kernel_size - 1)``.

    Args:
        channels: ``C``; must be divisible by ``group``.
        kernel_size: DCN kernel (square), 3 in every released model.
        dw_kernel_size: depthwise conv kernel of the offset branch; None means ``kernel_size``.
        stride, pad, dilation: DCN core geometry (see above).
        group: ``G``.
        offset_scale: scales the learned offsets and the regular kernel grid.
        act_layer: 'GELU' (default), 'ReLU', 'SiLU' or an nn.Module class.
        norm_layer: 'LN' (default) or 'BN' for the depthwise branch.
        center_feature_scale: add the per-group gate blending ``y`` with ``v`` (H/G).
        remove_center: drop the centre tap (odd kernels only).
        core_op: 'DCNv3' (compiled kernels, pure-PyTorch fallback when unavailable) or
            'DCNv3_pytorch' (always the pure-PyTorch reference).
        dw_dilation: dilation of the offset branch's depthwise conv (1 in the original, whose
            ``dilation`` applies to the core only); InternImage's dilated stages
            (``output_stride`` 8 or 16) dilate both alike.
    """

    # TorchScript constants: the scripted module holds only the chosen core and branches.
    __constants__ = ["core_op", "kernel_size", "pad", "dilation", "group", "group_channels",
                     "points", "remove_center"]

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        dw_kernel_size: int | None = None,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        act_layer: str | type[nn.Module] = "GELU",
        norm_layer: str = "LN",
        center_feature_scale: bool = False,
        remove_center: bool = False,
        core_op: str = "DCNv3",
        dw_dilation: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        channels = check_int("channels", channels, 1)
        dw_dilation = check_int("dw_dilation", dw_dilation, 1)
        kernel_size = check_int("kernel_size", kernel_size, 1)
        group = check_int("group", group, 1)
        stride = check_int("stride", stride, 1)
        pad = check_int("pad", pad, 0)
        dilation = check_int("dilation", dilation, 1)
        if dw_kernel_size is None:
            dw_kernel_size = kernel_size
        dw_kernel_size = check_int("dw_kernel_size", dw_kernel_size, 1)
        if dw_kernel_size % 2 == 0:
            raise ValueError(f"DCNv3: dw_kernel_size must be odd, got {dw_kernel_size}")
        if channels % group != 0:
            raise ValueError(
                f"DCNv3: channels must be divisible by group, got channels={channels}, "
                f"group={group}"
            )
        if stride != 1 or 2 * pad != dilation * (kernel_size - 1):
            raise ValueError(
                "DCNv3: the module computes offsets at the input resolution, so it needs "
                f"stride == 1 and 2 * pad == dilation * (kernel_size - 1); got stride={stride}, "
                f"pad={pad}, dilation={dilation}, kernel_size={kernel_size}"
            )
        if remove_center and kernel_size % 2 == 0:
            raise ValueError(
                f"DCNv3: remove_center needs an odd kernel_size, got {kernel_size}"
            )
        if core_op not in CORE_OPS:
            raise ValueError(f"DCNv3: core_op must be one of {list(CORE_OPS)}, got {core_op!r}")
        if isinstance(offset_scale, bool) or not isinstance(offset_scale, numbers.Real):
            raise TypeError(
                f"DCNv3: offset_scale must be a real number, got {type(offset_scale).__name__} "
                f"{offset_scale!r}"
            )
        if not math.isfinite(offset_scale):
            raise ValueError(f"DCNv3: offset_scale must be finite, got {offset_scale!r}")
        group_channels = channels // group
        if group_channels & (group_channels - 1):
            warnings.warn(
                f"DCNv3: group_channels = channels // group = {group_channels} is not a power "
                "of two; the CUDA kernels are fastest for powers of two",
                stacklevel=2,
            )

        self.channels = channels
        self.kernel_size = kernel_size
        self.dw_kernel_size = dw_kernel_size
        self.stride = stride
        self.pad = pad
        self.dilation = dilation
        self.group = group
        self.group_channels = group_channels
        self.offset_scale = float(offset_scale)
        self.center_feature_scale = bool(center_feature_scale)
        self.remove_center = bool(remove_center)
        self.points = kernel_size * kernel_size - int(self.remove_center)
        self.core_op = core_op

        act = get_act_layer(act_layer)
        self.dw_conv = nn.Conv2d(
            channels, channels, dw_kernel_size, padding=dw_dilation * (dw_kernel_size - 1) // 2,
            dilation=dw_dilation, groups=channels, **dd,
        )
        self.dw_norm = norm_nchw(norm_layer, channels, **dd)
        self.dw_act = act()
        self.offset = nn.Linear(channels, group * self.points * 2, **dd)
        self.mask = nn.Linear(channels, group * self.points, **dd)
        self.input_proj = nn.Linear(channels, channels, **dd)
        self.output_proj = nn.Linear(channels, channels, **dd)
        if self.center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(
                torch.empty(group, channels, **dd)
            )
            self.center_feature_scale_proj_bias = nn.Parameter(torch.empty(group, **dd))
        else:
            self.register_parameter("center_feature_scale_proj_weight", None)
            self.register_parameter("center_feature_scale_proj_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original initialisation: zero offset/mask projections (zero offsets, uniform
        mask 1/P), xavier-uniform input/output projections with zero bias, zero centre-feature
        gate (0.5 after the sigmoid). The depthwise conv and its norm keep PyTorch defaults."""
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        nn.init.zeros_(self.mask.weight)
        nn.init.zeros_(self.mask.bias)
        nn.init.xavier_uniform_(self.input_proj.weight)
        nn.init.zeros_(self.input_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)
        if self.center_feature_scale_proj_weight is not None:
            nn.init.zeros_(self.center_feature_scale_proj_weight)
            nn.init.zeros_(self.center_feature_scale_proj_bias)

    # Alias under the original's name, so ``model.apply`` style re-initialisation code works.
    _reset_parameters = reset_parameters

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, group={self.group}, "
            f"group_channels={self.group_channels}, offset_scale={self.offset_scale}, "
            f"center_feature_scale={self.center_feature_scale}, "
            f"remove_center={self.remove_center}, core_op={self.core_op!r}"
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(N, H, W, C)`` -> ``(N, H, W, C)``, channels-last in and out."""
        # Every tensor read by several ops is an NCHW view (x_nchw, x1): torch.compile's
        # layout optimisation gives such 4-D tensors channels_last strides, which keep an NCHW
        # view's memory NHWC but would scatter an NHWC tensor's.
        x_nchw = check_nhwc_input(x, self.channels).permute(0, 3, 1, 2)
        value = self.input_proj(x_nchw.permute(0, 2, 3, 1))
        x1 = self.dw_act(self.dw_norm(self.dw_conv(x_nchw)))  # (N, C, H, W)
        offset = self.offset(x1.permute(0, 2, 3, 1))
        y = dcnv3_core(
            value, offset, self.mask(x1.permute(0, 2, 3, 1)), self.kernel_size, self.pad,
            self.dilation, self.group, self.group_channels, self.offset_scale,
            self.remove_center, self.core_op == "DCNv3_pytorch",
        )
        if self.center_feature_scale_proj_weight is not None:
            scale = torch.sigmoid(F.linear(
                x1.permute(0, 2, 3, 1), self.center_feature_scale_proj_weight,
                self.center_feature_scale_proj_bias,
            )).unsqueeze(-1)  # (N, H, W, G, 1)
            groups = [self.group, self.group_channels]
            y = y.unflatten(-1, groups) * (1 - scale) + value.unflatten(-1, groups) * scale
            y = y.flatten(-2)
        return self.output_proj(y)

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script``: without the compiled extension core_op 'DCNv3'
        scripts to the reference, with the one-time warning of the eager fallback."""
        if self.core_op == "DCNv3":
            ops.kernel_for(ops.DCNV3, torch.device("cpu"))  # warns when it is the reference
        return self


# Original-module key -> this module's key (keys relative to the DCNv3 module).
_DCNV3_KEY_RULES = (
    (re.compile(r"^dw_conv\.0\."), "dw_conv."),
    (re.compile(r"^dw_conv\.1\.[01]\."), "dw_norm."),
)


def convert_dcnv3_state_dict(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict:
    """Renames an original ``DCNv3`` / ``DCNv3_pytorch`` module state dict to this module's.

    Only keys under ``prefix`` are renamed (``dw_conv.0.*`` -> ``dw_conv.*``,
    ``dw_conv.1.{0,1}.*`` -> ``dw_norm.*``); other keys pass through unchanged, and a dict
    already in this layout is returned unchanged.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for pattern, replacement in _DCNV3_KEY_RULES:
                rest, count = pattern.subn(replacement, rest, count=1)
                if count:
                    break
            key = prefix + rest
        out[key] = value
    return out
