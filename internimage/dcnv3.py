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

import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import Tensor, nn

from internimage import cpu_inference
from internimage import ops as _ops
from internimage.ops import dcnv3 as _dcnv3_op
from internimage.ops import dcnv3_reference as _dcnv3_reference

__all__ = [
    "DCNv3",
    "CORE_OPS",
    "LayerNormNCHW",
    "BatchNormNCHW",
    "get_act_layer",
    "convert_dcnv3_state_dict",
]

#: Accepted ``core_op`` names: the compiled kernels and the pure-PyTorch reference.
CORE_OPS = ("DCNv3", "DCNv3_pytorch")

_ACT_LAYERS: dict[str, type[nn.Module]] = {"GELU": nn.GELU, "ReLU": nn.ReLU, "SiLU": nn.SiLU}
_NORM_LAYERS = ("LN", "BN")


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
    """LayerNorm over the channels of an ``(N, C, H, W)`` tensor.

    Normalises ``x.permute(0, 2, 3, 1)``, which is contiguous (no copy) when ``x`` is
    channels_last in memory. Returns the NHWC result when ``out_nhwc`` is True, else its NCHW
    view (channels_last memory). Parameter names are those of :class:`torch.nn.LayerNorm`.
    """

    def __init__(
        self, num_channels: int, eps: float = 1e-6, out_nhwc: bool = False, device=None, dtype=None
    ) -> None:
        super().__init__(num_channels, eps=eps, device=device, dtype=dtype)
        self.out_nhwc = out_nhwc

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return x if self.out_nhwc else x.permute(0, 3, 1, 2)


class BatchNormNCHW(nn.BatchNorm2d):
    """BatchNorm2d on an ``(N, C, H, W)`` tensor, optionally returning the NHWC view."""

    def __init__(self, num_channels: int, out_nhwc: bool = False, device=None, dtype=None) -> None:
        super().__init__(num_channels, device=device, dtype=dtype)
        self.out_nhwc = out_nhwc

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            x = self._batch_norm_scripted(x)  # TorchScript cannot call super().forward
        else:
            x = super().forward(x)
        return x.permute(0, 2, 3, 1) if self.out_nhwc else x

    def _batch_norm_scripted(self, x: Tensor) -> Tensor:
        """:meth:`torch.nn.BatchNorm2d.forward` written out for TorchScript: batch statistics
        in training mode (updating the running ones when tracked, by ``momentum`` or, when
        that is None, as a cumulative average) and in eval mode without running buffers."""
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        momentum = self.momentum
        factor = 0.0 if momentum is None else momentum
        if self.training and self.track_running_stats:
            count = self.num_batches_tracked
            if count is not None:
                count.add_(1)
                if momentum is None:
                    factor = 1.0 / float(count)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return F.batch_norm(
            x, self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None, self.weight, self.bias, batch_stats,
            factor, self.eps,
        )


def norm_nchw(
    norm_layer: str, num_channels: int, out_nhwc: bool, device=None, dtype=None
) -> nn.Module:
    """The original's ``build_norm_layer(dim, norm_layer, 'channels_first', out)``."""
    if check_norm_layer(norm_layer) == "LN":
        return LayerNormNCHW(num_channels, eps=1e-6, out_nhwc=out_nhwc, device=device,
                             dtype=dtype)
    return BatchNormNCHW(num_channels, out_nhwc=out_nhwc, device=device, dtype=dtype)


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_KERNEL_AVAILABLE: dict[str, bool] = {}


@torch.compiler.assume_constant_result
def _compiled_kernel_for(device_type: str) -> bool:
    """Whether ``torch.ops.internimage.dcnv3`` has a kernel for ``device_type`` (cached; a
    constant under torch.compile, so the dispatch query never enters a graph)."""
    available = _KERNEL_AVAILABLE.get(device_type)
    if available is None:
        if not _ops.extension_available():
            available = False
        elif device_type == "meta":
            available = True  # the fake kernel answers
        else:
            key = _DISPATCH_KEYS.get(device_type)
            available = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
                "internimage::dcnv3", key
            )
        _KERNEL_AVAILABLE[device_type] = available
    return available


def _group_softmax_mask(
    x1: Tensor, weight: Tensor, bias: Tensor, group: int, points: int
) -> Tensor:
    """``softmax`` over the points of each group of ``x1 @ weight.T + bias``.

    ``x1`` ``(..., C)``; ``weight`` ``(group * points, C)`` ordered [group][point]. Returns
    ``(..., group * points)`` in at least float32 (the softmax dtype).

    The logits are computed transposed, ``(group, points, M)`` with ``M`` the pixels, so the
    softmax reduces over a strided dimension with the pixels contiguous, which PyTorch's CPU
    kernel vectorises well; PyTorch's last-dimension softmax over 9 values is several times
    slower. One transposing copy brings the result back to ``(M, group * points)``. Same
    arithmetic as ``F.softmax(x1 @ weight.T + bias)`` up to float rounding.
    """
    shape = list(x1.shape)  # (..., C) -> (..., G * P), as a list for TorchScript
    shape[-1] = group * points
    rows = x1.reshape(-1, x1.shape[-1])
    logits = torch.addmm(bias.unsqueeze(1), weight, rows.t())  # (G * P, M)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    mask = logits.view(group, points, -1).softmax(dim=1)
    return mask.permute(2, 0, 1).reshape(shape)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"DCNv3: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"DCNv3: {name} must be >= {minimum}, got {value}")
    return value


@register_notrace_module  # a leaf for torch.fx (the kernel choice is Python control flow)
class DCNv3(nn.Module):
    """DCNv3 token mixer of InternImage (the original ``DCNv3`` / ``DCNv3_pytorch`` module).

    Forward, for an NHWC input ``x`` of shape ``(N, H, W, C)`` with ``G = group`` groups of
    ``gc = C // G`` channels and ``P = kernel_size**2 - remove_center`` points per group:

    1. ``v = input_proj(x)``: the values to sample, ``(N, H, W, C)``;
    2. ``x1 = act(norm(dw_conv(x)))``: depthwise conv on the block input (not on ``v``);
    3. ``offset = offset(x1)`` ``(N, H, W, G*P*2)`` ordered [group][point][x, y];
       ``mask = softmax over the P points of each group of mask(x1)`` ``(N, H, W, G*P)``,
       computed in at least float32 and cast to ``v``'s dtype (as the original under autocast);
    4. ``y = dcnv3(v, offset, mask, ...)`` ``(N, H, W, C)``;
    5. with ``center_feature_scale``: ``s = sigmoid(x1 @ Wcfs.T + bcfs)`` (one gate per group),
       ``y = y * (1 - s) + v * s``;
    6. ``output_proj(y)``.

    The module preserves the spatial size, so it needs ``stride == 1`` and
    ``2 * pad == dilation * (kernel_size - 1)`` (the original's only working setting).

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
    """

    # A TorchScript constant: the scripted module then holds only the chosen core.
    __constants__ = ["core_op"]

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
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        channels = _check_int("channels", channels, 1)
        kernel_size = _check_int("kernel_size", kernel_size, 1)
        group = _check_int("group", group, 1)
        stride = _check_int("stride", stride, 1)
        pad = _check_int("pad", pad, 0)
        dilation = _check_int("dilation", dilation, 1)
        if dw_kernel_size is None:
            dw_kernel_size = kernel_size
        dw_kernel_size = _check_int("dw_kernel_size", dw_kernel_size, 1)
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
        if not isinstance(offset_scale, int | float) or isinstance(offset_scale, bool):
            raise TypeError(
                f"DCNv3: offset_scale must be a number, got {type(offset_scale).__name__}"
            )
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
            channels, channels, dw_kernel_size, padding=(dw_kernel_size - 1) // 2,
            groups=channels, **dd,
        )
        self.dw_norm = norm_nchw(norm_layer, channels, out_nhwc=True, **dd)
        self.dw_act = act()
        # LN + exact GELU can run as one fused CPU kernel (see internimage.cpu_inference)
        self.fuse_offset_branch = (
            isinstance(self.dw_norm, LayerNormNCHW)
            and type(self.dw_act) is nn.GELU and self.dw_act.approximate == "none"
        )
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

    def offset_branch(self, x: Tensor) -> Tensor:
        """``act(norm(dw_conv(x)))`` for an NHWC ``x``; returns NHWC ``(N, H, W, C)``."""
        if self.fuse_offset_branch:
            fused = cpu_inference.dwconv_layernorm_gelu(x, self.dw_conv, self.dw_norm)
            if fused is not None:
                return fused
        x1 = self.dw_conv(x.permute(0, 3, 1, 2))  # channels_last view in, channels_last out
        return self.dw_act(self.dw_norm(x1))

    def offset_and_mask(self, x1: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Offsets ``(N, H, W, G*P*2)`` and per-group softmax mask ``(N, H, W, G*P)``.

        The softmax runs in at least float32 and the mask is cast to ``dtype`` (the values'
        dtype), as the original module does under autocast; see
        :func:`_group_softmax_mask` for the CPU-friendly layout of the computation.
        """
        offset = cpu_inference.linear(x1, self.offset)
        mask = _group_softmax_mask(x1, self.mask.weight, self.mask.bias, self.group,
                                   self.points)
        if offset.dtype != dtype:
            offset = offset.to(dtype)
        if mask.dtype != dtype:
            mask = mask.to(dtype)
        return offset, mask

    def core(self, value: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """The DCNv3 operator on NHWC ``value`` with this module's geometry.

        'DCNv3' calls the compiled op directly when it has a kernel for the device, skipping
        the functional wrapper's Python argument checks (the op repeats them); otherwise
        :func:`internimage.ops.dcnv3` falls back to the reference with a warning.
        'DCNv3_pytorch' always runs :func:`internimage.ops.dcnv3_reference`.
        """
        if self.core_op == "DCNv3" and _compiled_kernel_for(value.device.type):
            k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
            return torch.ops.internimage.dcnv3.default(
                value, offset, mask, [k, k], [s, s], [p, p], [d, d], self.group,
                self.group_channels, self.offset_scale, self.remove_center,
            )
        op = _dcnv3_reference if self.core_op == "DCNv3_pytorch" else _dcnv3_op
        return op(
            value, offset, mask, self.kernel_size, self.stride, self.pad, self.dilation,
            self.group, self.group_channels, self.offset_scale, self.remove_center,
        )

    @torch.jit.unused
    def fused_kernels_apply(self) -> bool:
        """Whether :meth:`forward_cpu_inference` can run this module: the compiled core
        ('DCNv3') and an offset branch the fused kernel covers (LN + exact GELU)."""
        return (
            self.core_op == "DCNv3" and self.fuse_offset_branch
            and cpu_inference.offset_branch_fusable(self.dw_conv, self.dw_norm)
        )

    @torch.jit.unused
    def forward_cpu_inference(self, x: Tensor) -> Tensor:
        """:meth:`forward` in float32 CPU inference with the fused kernels called directly:
        the caller has checked ``cpu_inference.fused_cpu_inference(x)`` and
        :meth:`fused_kernels_apply`. ``(N, H, W, C)`` -> ``(N, H, W, C)``."""
        value = cpu_inference.onednn_linear(x, self.input_proj)
        x1 = cpu_inference.offset_branch_core(x, self.dw_conv, self.dw_norm)
        y = cpu_inference.mask_logits_core(value, x1, self)
        if self.center_feature_scale_proj_weight is not None:
            y = self._centre_feature_scale(y, value, x1)
        return cpu_inference.onednn_linear(y, self.output_proj)

    def _centre_feature_scale(self, y: Tensor, value: Tensor, x1: Tensor) -> Tensor:
        """Blends the core's output ``y`` with ``value`` by one sigmoid gate per group."""
        scale = torch.sigmoid(
            F.linear(x1, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias)
        ).unsqueeze(-1)  # (N, H, W, G, 1)
        groups = (self.group, self.group_channels)
        y = y.unflatten(-1, groups) * (1 - scale) + value.unflatten(-1, groups) * scale
        return y.flatten(-2)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, H, W, C)`` -> ``(N, H, W, C)``, channels-last in and out."""
        if torch.jit.is_scripting():
            return self._forward_scripted(x)
        if cpu_inference.fused_cpu_inference(x) and self.fused_kernels_apply():
            return self.forward_cpu_inference(x)
        value = cpu_inference.linear(x, self.input_proj)
        x1 = self.offset_branch(x)
        # float32 CPU inference: offsets, mask softmax and core in one call (cpu_inference)
        y = cpu_inference.dcnv3_mask_logits(value, x1, self) if self.core_op == "DCNv3" else None
        if y is None:
            offset, mask = self.offset_and_mask(x1, value.dtype)
            y = self.core(value, offset, mask)
        if self.center_feature_scale_proj_weight is not None:
            y = self._centre_feature_scale(y, value, x1)
        return cpu_inference.linear(y, self.output_proj)

    def _forward_scripted(self, x: Tensor) -> Tensor:
        """:meth:`forward` as TorchScript compiles it: the same arithmetic through the plain
        modules, without the eager-only fused CPU kernels and kernel query. 'DCNv3' calls
        ``torch.ops.internimage.dcnv3``, which must have a kernel for the device (the
        reference only when the extension is not built: ``ops._dcnv3_scripted``)."""
        value = self.input_proj(x)
        x1 = self.dw_act(self.dw_norm(self.dw_conv(x.permute(0, 3, 1, 2))))
        offset = self.offset(x1).to(value.dtype)
        mask = _group_softmax_mask(x1, self.mask.weight, self.mask.bias, self.group,
                                   self.points).to(value.dtype)
        k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
        if self.core_op == "DCNv3":
            y = _ops._dcnv3_scripted(
                value, offset, mask, [k, k], [s, s], [p, p], [d, d], self.group,
                self.group_channels, self.offset_scale, self.remove_center,
            )
        else:
            y = _ops._dcnv3_reference_scripted(
                value, offset, mask, [k, k], [s, s], [p, p], [d, d], self.group,
                self.group_channels, self.offset_scale, self.remove_center,
            )
        if self.center_feature_scale_proj_weight is not None:
            scale = torch.sigmoid(
                F.linear(x1, self.center_feature_scale_proj_weight,
                         self.center_feature_scale_proj_bias)
            ).unsqueeze(-1)
            groups = [self.group, self.group_channels]
            y = y.unflatten(-1, groups) * (1 - scale) + value.unflatten(-1, groups) * scale
            y = y.flatten(-2)
        return self.output_proj(y)

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script``: without the compiled extension core_op 'DCNv3'
        scripts to the reference, with the one-time warning of the eager fallback."""
        if self.core_op == "DCNv3" and not _ops.extension_available():
            _ops._warn_fallback(torch.device("cpu"))
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
