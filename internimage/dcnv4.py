"""The DCNv4 module of FlashInternImage: projections, the packed offset/mask projection and the
DCNv4 core.

Activations are channels-last: the module takes and returns ``(N, H, W, C)`` tensors (the
original takes ``(N, H*W, C)`` plus ``shape=(H, W)``; reshape around the call to use it that
way). Parameters and state-dict keys are exactly the original ``DCNv4`` module's
(``offset_mask_dw.*`` only with ``dw_kernel_size``, ``value_proj.*`` / ``output_proj.*`` only
without ``without_pointwise``, ``output_proj.bias`` only with ``output_bias``,
``center_feature_scale_proj_weight`` / ``_bias`` only with ``center_feature_scale``), so
original checkpoints load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from internimage import ops
from internimage.dcnv3 import check_int, check_nhwc_input
from internimage.ops import dcnv4_core, dcnv4_core_reference

__all__ = ["DCNv4", "DCNV4_CORE_OPS"]

#: Accepted ``core_op`` names: the compiled kernels and the pure-PyTorch reference.
DCNV4_CORE_OPS = ("DCNv4", "DCNv4_pytorch")


# The op layer's cores and DCNv3's input check, made torch.fx leaves here (fx.wrap patches
# the name in the globals of the module that calls it).
torch.fx.wrap("dcnv4_core")
torch.fx.wrap("dcnv4_core_reference")
torch.fx.wrap("check_nhwc_input")


class DCNv4(nn.Module):
    """DCNv4 token mixer of FlashInternImage (the original ``DCNv4`` module).

    Forward, for an NHWC input ``x`` of shape ``(N, H, W, C)`` with ``G = group`` groups of
    ``gc = C // G`` channels and ``P = kernel_size**2 - remove_center`` points per group:

    1. ``v = value_proj(x)`` (``x`` itself with ``without_pointwise``);
    2. ``offset_mask = offset_mask(offset_mask_dw(x))`` ``(N, H, W, ceil(3GP / 8) * 8)``: from
       the block input (not from ``v``), through the depthwise conv only with
       ``dw_kernel_size``; per group its ``2P`` offsets then its ``P`` raw mask values, no
       softmax and no norm (the padding channels are ignored by the core);
    3. ``y = dcnv4(v, offset_mask, ...)`` ``(N, H, W, C)``;
    4. with ``center_feature_scale``: ``s = sigmoid(y @ Wcfs.T + bcfs)``, one gate per group
       computed from the core's output, ``y = y * (1 - s) + v * s``;
    5. ``output_proj(y)`` (skipped with ``without_pointwise``).

    The module preserves the spatial size, so it needs ``stride == 1`` and
    ``2 * pad == dilation * (kernel_size - 1)``. Unlike the original, any ``group_channels``
    (not only multiples of 16), batch size and map size work.

    Args:
        channels: ``C``; must be divisible by ``group``.
        kernel_size: DCN kernel (square); 3 in every released model.
        stride, pad, dilation: DCN core geometry (see above).
        group: ``G``.
        offset_scale: scales the learned offsets and the regular kernel grid.
        dw_kernel_size: kernel of the depthwise conv (``offset_mask_dw``, odd) applied to the
            input of the offset/mask projection; None: no conv.
        center_feature_scale: add the per-group gate blending ``y`` with ``v``.
        remove_center: drop the centre tap (odd kernels only).
        output_bias: give ``output_proj`` a bias (the module's default; FlashInternImage
            passes ``dcn_output_bias``, False except for L).
        without_pointwise: no ``value_proj`` / ``output_proj``.
        core_op: 'DCNv4' (compiled kernels, pure-PyTorch fallback when unavailable) or
            'DCNv4_pytorch' (always the pure-PyTorch reference).
        dw_dilation: dilation of ``offset_mask_dw`` (1 in the original, whose ``dilation``
            applies to the core only); FlashInternImage's dilated stages (``output_stride`` 8
            or 16) dilate both alike.
    """

    __constants__ = ["core_op"]

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        dw_kernel_size: int | None = None,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        output_bias: bool = True,
        without_pointwise: bool = False,
        core_op: str = "DCNv4",
        dw_dilation: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        channels = check_int("channels", channels, 1, "DCNv4")
        dw_dilation = check_int("dw_dilation", dw_dilation, 1, "DCNv4")
        kernel_size = check_int("kernel_size", kernel_size, 1, "DCNv4")
        stride = check_int("stride", stride, 1, "DCNv4")
        pad = check_int("pad", pad, 0, "DCNv4")
        dilation = check_int("dilation", dilation, 1, "DCNv4")
        group = check_int("group", group, 1, "DCNv4")
        if dw_kernel_size is not None:
            dw_kernel_size = check_int("dw_kernel_size", dw_kernel_size, 1, "DCNv4")
            if dw_kernel_size % 2 == 0:
                raise ValueError(f"DCNv4: dw_kernel_size must be odd, got {dw_kernel_size}")
        if channels % group != 0:
            raise ValueError(
                f"DCNv4: channels must be divisible by group, got channels={channels}, "
                f"group={group}"
            )
        if stride != 1 or 2 * pad != dilation * (kernel_size - 1):
            raise ValueError(
                "DCNv4: the module computes offsets at the input resolution, so it needs "
                f"stride == 1 and 2 * pad == dilation * (kernel_size - 1); got stride={stride}, "
                f"pad={pad}, dilation={dilation}, kernel_size={kernel_size}"
            )
        if remove_center and kernel_size % 2 == 0:
            raise ValueError(f"DCNv4: remove_center needs an odd kernel_size, got {kernel_size}")
        if isinstance(offset_scale, bool) or not isinstance(offset_scale, int | float):
            raise TypeError(
                f"DCNv4: offset_scale must be a number, got {type(offset_scale).__name__}"
            )
        for name, flag in (
            ("center_feature_scale", center_feature_scale),
            ("remove_center", remove_center),
            ("output_bias", output_bias),
            ("without_pointwise", without_pointwise),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"DCNv4: {name} must be a bool, got {type(flag).__name__}")
        if core_op not in DCNV4_CORE_OPS:
            raise ValueError(
                f"DCNv4: core_op must be one of {list(DCNV4_CORE_OPS)}, got {core_op!r}"
            )

        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.pad = pad
        self.dilation = dilation
        self.group = group
        self.group_channels = channels // group
        self.offset_scale = float(offset_scale)
        self.dw_kernel_size = dw_kernel_size
        self.center_feature_scale = center_feature_scale
        self.remove_center = remove_center
        self.output_bias = output_bias
        self.without_pointwise = without_pointwise
        self.points = kernel_size * kernel_size - int(remove_center)
        self.core_op = core_op

        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels,
                                                                              **dd))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group, **dd))
        else:
            self.register_parameter("center_feature_scale_proj_weight", None)
            self.register_parameter("center_feature_scale_proj_bias", None)
        # Absent layers are identities: no parameters (so the state dict is the original's),
        # and the forward calls every layer as a module.
        self.offset_mask_dw = (
            nn.Conv2d(channels, channels, dw_kernel_size,
                      padding=dw_dilation * (dw_kernel_size - 1) // 2, dilation=dw_dilation,
                      groups=channels, **dd)
            if dw_kernel_size is not None else nn.Identity()
        )
        self.offset_mask = nn.Linear(
            channels, int(math.ceil(3 * group * self.points / 8) * 8), **dd
        )
        self.value_proj = nn.Identity() if without_pointwise else nn.Linear(channels, channels,
                                                                            **dd)
        self.output_proj = (
            nn.Identity() if without_pointwise
            else nn.Linear(channels, channels, bias=output_bias, **dd)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original initialisation: zero offset/mask projection (so the core's output is
        exactly 0 at init), xavier-uniform value/output projections with zero bias. The
        depthwise conv keeps PyTorch's default; the centre-feature gate starts at zero."""
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        for layer in (self.value_proj, self.output_proj):
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    # Alias under the original's name.
    _reset_parameters = reset_parameters

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, group={self.group}, "
            f"group_channels={self.group_channels}, offset_scale={self.offset_scale}, "
            f"dw_kernel_size={self.dw_kernel_size}, "
            f"center_feature_scale={self.center_feature_scale}, "
            f"remove_center={self.remove_center}, core_op={self.core_op!r}"
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(N, H, W, C)`` -> ``(N, H, W, C)``, channels-last in and out."""
        x = check_nhwc_input(x, self.channels, "DCNv4")
        value = self.value_proj(x)
        # The depthwise conv runs on the NCHW view of the NHWC input (channels_last memory);
        # its channels_last output permutes back to contiguous NHWC without a copy.
        offset_mask = self.offset_mask(
            self.offset_mask_dw(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        )
        args = (self.kernel_size, self.stride, self.pad, self.dilation, self.group,
                self.group_channels, self.offset_scale, self.remove_center)
        if self.core_op == "DCNv4_pytorch":  # a constant: TorchScript keeps one branch
            y = dcnv4_core_reference(value, offset_mask, *args)
        else:
            y = dcnv4_core(value, offset_mask, *args)
        weight, bias = self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias
        if weight is not None:
            # One gate per group, computed from the core's output.
            scale = torch.sigmoid(F.linear(y, weight, bias)).unsqueeze(-1)  # (N, H, W, G, 1)
            groups = [self.group, self.group_channels]
            y = (y.unflatten(-1, groups) * (1 - scale) + value.unflatten(-1, groups) * scale)
            y = y.flatten(-2)
        return self.output_proj(y)

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script``: without the compiled extension core_op 'DCNv4'
        scripts to the reference, with the one-time warning of the eager fallback."""
        if self.core_op == "DCNv4":
            ops.kernel_for(ops.DCNV4, torch.device("cpu"))  # warns when it is the reference
        return self
