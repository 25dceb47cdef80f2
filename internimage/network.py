"""The network InternImage and FlashInternImage share: the stem, downsampling layers, MLP,
block, stage, and :class:`InternImageBase`, which assembles them with a head and holds the timm
API (``forward_features``, ``forward_head``, ``forward_intermediates``, ``group_matcher``,
``reset_classifier``, ...).

The two families differ only in the blocks' token mixer (``dcn_layer``: DCNv3 or DCNv4) and
the MLP's ``fc2`` bias; each family's file (``internimage.py``, ``flash_internimage.py``)
subclasses :class:`InternImageBase` with its own constructor keywords.

Memory layout: stage inputs and outputs are NCHW tensors with channels_last memory; inside a
stage activations are contiguous NHWC, so every Linear runs without a permute and each
``permute`` between the two is a free view. ``forward_features`` returns the NCHW final map.
"""

# No ``from __future__ import annotations`` here: torch.fx copies the root ``forward``'s
# annotations into the code it generates, and TorchScript cannot resolve them as strings
# (timm's scripted FX feature extractor).
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from timm.layers import DropPath, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch import Tensor, nn

from internimage.dcnv3 import (
    LN_EPS,
    DCNv3,
    LayerNormNCHW,
    check_norm_layer,
    get_act_layer,
    norm_nchw,
)
from internimage.heads import CLIP_EMBED_DIM, ClipClassifierHead, ClipFusion, ConvClassifierHead
from internimage.metadata import MetadataHead

__all__ = [
    "InternImageBase",
    "InternImageStem",
    "InternImageDownsample",
    "InternImageMlp",
    "InternImageBlock",
    "InternImageStage",
    "dcn_offset_param_names",
]


# ---------------------------------------------------------------------------------------------
# Layers


class _StaysEvalWhenFrozen(nn.Module):
    """A part of the model that :meth:`InternImageBase.freeze_stages` can freeze: once
    ``frozen``, ``train()`` leaves it in eval mode (as the original's det/seg backbones
    re-apply after every ``train()``), also when a wrapper such as timm's feature extractor
    calls ``train()`` on it directly."""

    frozen = False

    def train(self, mode: bool = True) -> nn.Module:
        return super().train(mode and not self.frozen)


class InternImageStem(_StaysEvalWhenFrozen):
    """Stem: conv 3x3/2 (C/2) -> norm -> act -> conv 3x3/2 (C) -> norm -> dropout.

    Input ``(N, in_chans, H, W)`` NCHW (any memory format); output ``(N, C, ceil(H/4),
    ceil(W/4))`` NCHW with channels_last memory. The input is converted to channels_last first
    (a no-op when it already is), so both convs and norms run without layout copies.
    """

    def __init__(
        self,
        in_chans: int = 3,
        out_chs: int = 64,
        act_layer: str | type[nn.Module] = "GELU",
        norm_layer: str = "LN",
        drop_rate: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv1 = nn.Conv2d(in_chans, out_chs // 2, 3, stride=2, padding=1, **dd)
        self.norm1 = norm_nchw(norm_layer, out_chs // 2, **dd)
        self.act = get_act_layer(act_layer)()
        self.conv2 = nn.Conv2d(out_chs // 2, out_chs, 3, stride=2, padding=1, **dd)
        self.norm2 = norm_nchw(norm_layer, out_chs, **dd)
        self.drop = nn.Dropout(drop_rate)  # the original's ``pos_drop``

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.act(self.norm1(self.conv1(x)))
        x = self.norm2(self.conv2(x))
        return self.drop(x)


class InternImageDownsample(nn.Module):
    """Conv 3x3/2 without bias (C -> 2C) then norm: ``(N, C, H, W)`` -> ``(N, 2C, H/2, W/2)``,
    NCHW with channels_last memory. In a dilated stage (``output_stride`` 8 or 16) the conv
    keeps the resolution (``stride=1``) and is dilated like the stage before it."""

    def __init__(
        self, in_chs: int, out_chs: int, norm_layer: str = "LN", stride: int = 2,
        dilation: int = 1, device=None, dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=dilation,
                              dilation=dilation, bias=False, **dd)
        self.norm = norm_nchw(norm_layer, out_chs, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class InternImageMlp(nn.Module):
    """fc1 -> act -> dropout -> fc2 -> dropout on the last dimension (the original MLPLayer):
    ``(..., dim)`` -> ``(..., dim)``. ``fc2_bias``: False for FlashInternImage without
    ``mlp_fc2_bias`` (InternImage's fc2 always has one)."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        act_layer: str | type[nn.Module] = "GELU",
        drop: float = 0.0,
        fc2_bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.act = get_act_layer(act_layer)()
        self.fc2 = nn.Linear(hidden, dim, bias=fc2_bias, device=device, dtype=dtype)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class InternImageBlock(nn.Module):
    """InternImage layer: a deformable-convolution token mixer and an MLP, each with a residual.

    Input and output ``(N, C, H, W)`` NCHW with channels_last memory; the mixer and the MLP
    (and the norms around them) run on the channels-last view ``(N, H, W, C)``, as in the
    original. The mixer is ``dcn_layer(channels=dim, kernel_size=3, stride=1, pad=dilation,
    dilation=dilation, dw_dilation=dilation, group=group, **dcn_kwargs)``: :class:`DCNv3`
    for InternImage, :class:`~internimage.DCNv4` for FlashInternImage, which otherwise share
    this block. Residual branches, in the original's order of precedence:

    * ``layer_scale`` set: ``x + dp(gamma1 * norm1(dcn(x)))`` with ``post_norm``, else
      ``x + dp(gamma1 * dcn(norm1(x)))`` (``res_post_norm`` is then ignored, as in the
      original, though its norms exist);
    * ``post_norm``: ``x + dp(norm1(dcn(x)))``;
    * ``res_post_norm``: ``x + dp(res_post_norm1(dcn(norm1(x))))``;
    * otherwise: ``x + dp(dcn(norm1(x)))``;

    and the same pattern for the MLP with ``norm2`` / ``gamma2`` / ``res_post_norm2``.
    ``dilation`` dilates the DCN sampling grid and its offset branch's depthwise conv (the
    dilated stages of ``output_stride`` 8 and 16; 1 in the original).
    """

    # A TorchScript constant: the scripted block then holds only its own mode's branch.
    __constants__ = ["mode"]

    def __init__(
        self,
        dim: int,
        group: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: str | type[nn.Module] = "GELU",
        post_norm: bool = False,
        layer_scale: float | None = None,
        res_post_norm: bool = False,
        mlp_fc2_bias: bool = True,
        dilation: int = 1,
        dcn_layer: Callable[..., nn.Module] = DCNv3,
        dcn_kwargs: Mapping[str, Any] | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS, **dd)
        self.dcn = dcn_layer(
            channels=dim, kernel_size=3, stride=1, pad=dilation, dilation=dilation,
            dw_dilation=dilation, group=group, **(dcn_kwargs or {}), **dd,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS, **dd)
        self.mlp = InternImageMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop,
                                  fc2_bias=mlp_fc2_bias, **dd)
        self.layer_scale_init = layer_scale
        if layer_scale is not None:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale), **dd))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale), **dd))
        else:
            self.register_parameter("gamma1", None)
            self.register_parameter("gamma2", None)
        if res_post_norm:
            self.res_post_norm1 = nn.LayerNorm(dim, eps=LN_EPS, **dd)
            self.res_post_norm2 = nn.LayerNorm(dim, eps=LN_EPS, **dd)
        else:
            self.res_post_norm1 = self.res_post_norm2 = None
        if layer_scale is not None:
            self.mode = "ls_post_norm" if post_norm else "ls_pre_norm"
        elif post_norm:
            self.mode = "post_norm"
        elif res_post_norm:
            self.mode = "res_post_norm"
        else:
            self.mode = "pre_norm"

    def _mixer(self, x: Tensor) -> Tensor:
        """The mixer's residual branch on NHWC ``x``."""
        mode = self.mode
        if mode == "pre_norm":
            return self.dcn(self.norm1(x))
        if mode == "post_norm":
            return self.norm1(self.dcn(x))
        # The remaining modes are told apart by which of gamma1 / res_post_norm1 exist: the
        # `is not None` tests are constants for TorchScript, which skips the missing branch.
        gamma1 = self.gamma1
        if gamma1 is not None:
            if mode == "ls_post_norm":
                return gamma1 * self.norm1(self.dcn(x))
            return gamma1 * self.dcn(self.norm1(x))  # ls_pre_norm
        if self.res_post_norm1 is not None:  # res_post_norm
            return self.res_post_norm1(self.dcn(self.norm1(x)))
        raise RuntimeError("InternImageBlock: unknown mode " + mode)

    def _ffn(self, x: Tensor) -> Tensor:
        """The MLP's residual branch on NHWC ``x``."""
        mode = self.mode
        if mode == "pre_norm":
            return self.mlp(self.norm2(x))
        if mode == "post_norm":
            return self.norm2(self.mlp(x))
        gamma2 = self.gamma2  # as in _mixer
        if gamma2 is not None:
            if mode == "ls_post_norm":
                return gamma2 * self.norm2(self.mlp(x))
            return gamma2 * self.mlp(self.norm2(x))  # ls_pre_norm
        if self.res_post_norm2 is not None:  # res_post_norm
            return self.res_post_norm2(self.mlp(self.norm2(x)))
        raise RuntimeError("InternImageBlock: unknown mode " + mode)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, C, H, W)`` -> ``(N, C, H, W)``."""
        # The residual sums stay NCHW views (see DCNv3.forward on torch.compile's layouts).
        x = x + self.drop_path(self._mixer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return x + self.drop_path(self._ffn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class InternImageStage(_StaysEvalWhenFrozen):
    """One stage: optional downsample, blocks, optional post norms and level norm.

    Input ``(N, C_in, H, W)`` NCHW (channels_last memory); output ``(N, C, H', W')`` NCHW with
    channels_last memory. ``post_norm_block_ids[k]`` names the block after which
    ``post_norms[k]`` is applied (InternImage-H/G level 2).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        depth: int,
        group: int,
        downsample: bool,
        drop_path_rates: Sequence[float],
        level_norm: bool,
        post_norm_block_ids: Sequence[int] | None = None,
        norm_layer: str = "LN",
        downsample_stride: int = 2,
        downsample_dilation: int = 1,
        dilation: int = 1,
        device=None,
        dtype=None,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.grad_checkpointing = False
        self.downsample = (
            InternImageDownsample(in_chs, out_chs, norm_layer=norm_layer,
                                  stride=downsample_stride, dilation=downsample_dilation, **dd)
            if downsample else nn.Identity()
        )
        self.blocks = nn.Sequential(*[
            InternImageBlock(out_chs, group, drop_path=drop_path_rates[i], dilation=dilation,
                             **block_kwargs, **dd)
            for i in range(depth)
        ])
        if post_norm_block_ids:
            ids = [int(i) for i in post_norm_block_ids]
            bad = [i for i in ids if not 0 <= i < depth]
            if bad:
                raise ValueError(
                    f"level2_post_norm_block_ids must index the {depth} blocks of level 2 "
                    f"(0..{depth - 1}), got {list(post_norm_block_ids)}"
                )
            self.post_norm_block_ids = ids
            self.post_norms = nn.ModuleList(
                [LayerNormNCHW(out_chs, eps=LN_EPS, **dd) for _ in ids]
            )
        else:
            self.post_norm_block_ids = []
            self.post_norms = nn.ModuleList()
        self.norm = LayerNormNCHW(out_chs, eps=LN_EPS, **dd) if level_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x)
            else:
                x = block(x)
            # a loop rather than an index: TorchScript indexes a ModuleList by constants only
            for k, norm in enumerate(self.post_norms):
                if self.post_norm_block_ids[k] == i:
                    x = norm(x)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# Model

# The metadata helpers are fx leaves, so that their None tests and shape checks run when an fx
# graph is called (torch.fx.wrap: the autowrap behind timm's register_notrace_function skips
# names starting with '_').
@torch.fx.wrap
def _reject_metadata(temporal: Tensor | None, spatial: Tensor | None) -> None:
    """Metadata given to a model built without ``meta_dim``: ValueError."""
    if temporal is not None:
        raise ValueError(
            "temporal must be None for a model without a metadata head (build it with "
            f"meta_dim, e.g. internimage_h_meta), got a tensor of shape {list(temporal.shape)}"
        )
    if spatial is not None:
        raise ValueError(
            "spatial must be None for a model without a metadata head (build it with "
            f"meta_dim, e.g. internimage_h_meta), got a tensor of shape {list(spatial.shape)}"
        )


@torch.fx.wrap
def _metadata_or_zeros(
    value: Tensor | None, name: str, features: int, batch: Tensor, weight: Tensor
) -> Tensor:
    """``value`` checked to be ``(N, features)`` with ``N = batch.shape[0]`` and cast to
    ``weight``'s dtype, or zeros of that shape (the original's input for missing metadata)."""
    n = batch.shape[0]
    if value is None:
        return torch.zeros((n, features), dtype=weight.dtype, device=weight.device)
    if value.dim() != 2 or value.shape[0] != n or value.shape[1] != features:
        raise ValueError(
            f"{name} must have shape (N, {features}) = ({n}, {features}) for a batch of {n} "
            f"images, got {list(value.shape)}"
        )
    return value.to(weight.dtype)


@torch.fx.wrap
def _add_metadata_logits(logits: Tensor, meta: Tensor) -> Tensor:
    """Image logits ``(N, K)`` or per-pixel ``(N, K, H, W)`` plus metadata logits ``(N, K)``."""
    if logits.dim() == 4:
        return logits + meta[:, :, None, None]
    return logits + meta


def _as_list(name: str, value: Any, length: int | None = None) -> list[int]:
    if isinstance(value, int | bool) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(value).__name__}")
    values = list(value)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
        raise ValueError(f"{name} must contain positive ints, got {values}")
    if length is not None and len(values) != length:
        raise ValueError(f"{name} must have {length} entries (one per level), got {values}")
    return values


def _number(name: str, value: Any, expected: str, ok: Any) -> float:
    """``float(value)`` if it is a real number (not a bool) for which ``ok`` holds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    if not ok(float(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


class InternImageBase(nn.Module):
    """The network and timm API shared by :class:`~internimage.InternImage` and
    :class:`~internimage.FlashInternImage`; build one of those, not this class.

    The two families differ only in their token mixer (``dcn_layer`` built with ``dcn_kwargs``
    in every block, see :class:`InternImageBlock`) and the MLP's ``fc2`` bias; the stem,
    stages, heads, stochastic depth, ``output_stride``, ``frozen_stages`` and the timm methods
    are this class's. The keywords are the families' (see :class:`~internimage.InternImage`);
    invalid values raise ``ValueError`` / ``TypeError`` naming the argument, the expected and
    the given value.
    """

    def __init__(
        self,
        *,
        dcn_layer: type[nn.Module],
        dcn_kwargs: Mapping[str, Any],
        core_op: str,
        channels: int,
        depths: Sequence[int],
        groups: Sequence[int],
        num_classes: int,
        mlp_ratio: float,
        drop_rate: float,
        drop_path_rate: float,
        drop_path_type: str,
        act_layer: str | type[nn.Module],
        norm_layer: str,
        layer_scale: float | None,
        offset_scale: float,
        post_norm: bool,
        cls_scale: float,
        with_cp: bool,
        mlp_fc2_bias: bool,
        dw_kernel_size: int | None,
        use_clip_projector: bool,
        level2_post_norm: bool,
        level2_post_norm_block_ids: Sequence[int] | None,
        res_post_norm: bool,
        center_feature_scale: bool,
        meta_dim: int | None,
        in_chans: int,
        global_pool: str | None,
        output_stride: int,
        frozen_stages: int,
        head_drop_rate: float,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 2:
            raise ValueError(f"channels must be an int >= 2, got {channels!r}")
        depths = _as_list("depths", depths)
        groups = _as_list("groups", groups, len(depths))
        num_levels = len(depths)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if (isinstance(output_stride, bool) or not isinstance(output_stride, int)
                or output_stride not in (8, 16, 32)):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
        if drop_path_type not in ("linear", "uniform"):
            raise ValueError(
                f"drop_path_type must be 'linear' or 'uniform', got {drop_path_type!r}"
            )
        if meta_dim is not None and (
            isinstance(meta_dim, bool) or not isinstance(meta_dim, int) or meta_dim < 1
        ):
            raise ValueError(f"meta_dim must be None or an int >= 1, got {meta_dim!r}")
        mlp_ratio = _number("mlp_ratio", mlp_ratio, "a finite number > 0", _positive)
        offset_scale = _number("offset_scale", offset_scale, "a finite number > 0", _positive)
        cls_scale = _number("cls_scale", cls_scale, "a finite number > 0", _positive)
        drop_rate, drop_path_rate, head_drop_rate = (
            _number(name, value, "in [0, 1)", lambda v: 0 <= v < 1)
            for name, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate),
                                ("head_drop_rate", head_drop_rate)))
        if layer_scale is not None:
            layer_scale = _number("layer_scale", layer_scale, "None or a finite number > 0",
                                  _positive)
        if isinstance(in_chans, bool) or not isinstance(in_chans, numbers.Integral) \
                or in_chans < 1:
            raise ValueError(f"in_chans must be an int >= 1, got {in_chans!r}")
        in_chans = int(in_chans)
        if dw_kernel_size is not None:
            if isinstance(dw_kernel_size, bool) or not isinstance(dw_kernel_size,
                                                                  numbers.Integral) \
                    or dw_kernel_size < 1 or dw_kernel_size % 2 == 0:
                raise ValueError(
                    f"dw_kernel_size must be None or an odd int >= 1, got {dw_kernel_size!r}")
            dw_kernel_size = int(dw_kernel_size)
        check_norm_layer(norm_layer)
        get_act_layer(act_layer)
        if use_clip_projector:
            if num_levels < 2:
                raise ValueError(f"use_clip_projector needs >= 2 levels, got depths={depths}")
            if norm_layer != "LN":
                raise ValueError(
                    f"use_clip_projector needs norm_layer='LN' (the original fails otherwise), "
                    f"got {norm_layer!r}"
                )

        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.core_op = core_op
        self.channels = channels
        self.depths = depths
        self.use_clip_projector = use_clip_projector
        self.meta_dim = meta_dim
        self.output_stride = output_stride
        self.level2_post_norm_block_ids = (
            list(level2_post_norm_block_ids) if level2_post_norm_block_ids is not None else None
        )

        self.stem = InternImageStem(in_chans, channels, act_layer, norm_layer, drop_rate, **dd)

        # Stochastic depth: the original's linspace (float32, computed on the CPU so that
        # construction under ``torch.device('meta')`` works).
        total = sum(depths)
        if drop_path_type == "uniform":
            dpr = [float(drop_path_rate)] * total
        else:
            dpr = torch.linspace(0, drop_path_rate, total, device="cpu").tolist()
        level_norm = not post_norm or center_feature_scale
        dcn_kwargs = dict(dcn_kwargs, offset_scale=offset_scale, dw_kernel_size=dw_kernel_size)
        stages = []
        self.feature_info = []
        in_chs = channels
        reduction, dilation = 4, 1
        for i in range(num_levels):
            out_chs = channels * 2**i
            # Past output_stride a stage keeps its input's resolution and dilates instead:
            # its downsampling conv as much as the stage before, its blocks twice as much.
            downsample_stride, downsample_dilation = 2, 1
            if i > 0 and reduction >= output_stride:
                downsample_stride, downsample_dilation = 1, dilation
                dilation *= 2
            elif i > 0:
                reduction *= 2
            stages.append(InternImageStage(
                in_chs, out_chs, depths[i], groups[i], downsample=i > 0,
                drop_path_rates=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                level_norm=level_norm,
                post_norm_block_ids=(
                    level2_post_norm_block_ids if level2_post_norm and i == 2 else None
                ),
                norm_layer=norm_layer, mlp_ratio=mlp_ratio, drop=drop_rate,
                act_layer=act_layer, post_norm=post_norm, layer_scale=layer_scale,
                res_post_norm=res_post_norm, mlp_fc2_bias=mlp_fc2_bias,
                downsample_stride=downsample_stride, downsample_dilation=downsample_dilation,
                dilation=dilation, dcn_layer=dcn_layer, dcn_kwargs=dcn_kwargs, **dd,
            ))
            self.feature_info.append(
                dict(num_chs=out_chs, reduction=reduction, module=f"stages.{i}")
            )
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        final_chs = in_chs

        if use_clip_projector:
            self.fuse: ClipFusion | None = ClipFusion(final_chs // 2, final_chs, **dd)
            self.num_features = CLIP_EMBED_DIM
            self.head = ClipClassifierHead(
                CLIP_EMBED_DIM, num_classes, pool_type="attn" if global_pool is None
                else global_pool, drop_rate=head_drop_rate, **dd,
            )
        else:
            self.fuse = None
            self.num_features = final_chs
            self.head = ConvClassifierHead(
                final_chs, int(final_chs * cls_scale), num_classes,
                pool_type="avg" if global_pool is None else global_pool,
                drop_rate=head_drop_rate, act_layer=act_layer, **dd,
            )
        self.head_hidden_size = self.head.num_features
        self.meta_head: MetadataHead | None = (
            MetadataHead(num_classes, meta_dim, **dd) if meta_dim is not None else None
        )

        self.apply(self._init_weights)
        for module in self.modules():
            if isinstance(module, dcn_layer):
                module.reset_parameters()
        if with_cp:
            self.set_grad_checkpointing(True)
        self.freeze_stages(frozen_stages)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The original init: trunc-normal(0.02) Linear weights with zero bias, unit LNs."""
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # --- timm API ---------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise LR decay: the stem, then each block in order.

        A stage's downsample joins its first block; the level norm and the level-2 post norm
        after block ``b`` join block ``b``; the fusion/heads, the metadata head included, are
        unmatched (last group).
        """
        if coarse:
            return dict(stem=r"^stem", blocks=r"^stages\.(\d+)")
        blocks: list = [
            (r"^stages\.(\d+)\.downsample", (0,)),
            (r"^stages\.(\d+)\.blocks\.(\d+)", None),
        ]
        for stage_index, stage in enumerate(self.stages):
            for k, block_id in enumerate(stage.post_norm_block_ids):
                blocks.append(
                    (rf"^stages\.{stage_index}\.post_norms\.{k}\.",
                     (stage_index, block_id, 99999))
                )
        blocks.append((r"^stages\.(\d+)\.norm\.", (99999,)))
        return dict(stem=r"^stem", blocks=blocks)

    @torch.jit.ignore
    def freeze_stages(self, num_stages: int) -> None:
        """Freezes the stem and the first ``num_stages`` stages, unfreezes the rest (the det/seg
        backbones' ``frozen_stages``; -1 or 0 freezes nothing).

        Frozen parts get ``requires_grad=False`` and stay in eval mode through later
        ``train()`` calls, as in the original. One deliberate difference: the original never
        freezes the stem (``patch_embed``), so with frozen stages the stem kept training on
        gradients that had to flow back through every frozen stage, which then saved no
        backward compute. Here ``num_stages >= 1`` freezes the stem too, as frozen_stages does
        for mmdet's ResNet (whose stage 0 is its stem). The released det/seg configs freeze
        nothing, so their results are unaffected.
        """
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or not (
                -1 <= num_stages <= len(self.stages)):
            raise ValueError(
                f"num_stages must be an int in [-1, {len(self.stages)}], got {num_stages!r}")
        for index, part in enumerate([self.stem, *self.stages]):
            frozen = num_stages > 0 and index <= num_stages
            part.frozen = frozen
            part.requires_grad_(not frozen)
            part.train(self.training)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block (the original ``with_cp``)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Name patterns without weight decay (all 1-D as well, which timm excludes anyway;
        the metadata head's Linear weights are decayed like every other Linear)."""
        return {"*.gamma1", "*.gamma2", "*center_feature_scale_proj_bias", "*.q_bias",
                "*.k_bias", "*.v_bias"}

    @torch.jit.ignore
    def dcn_offset_param_names(self) -> list[str]:
        """Parameters the original trains with a reduced LR (``DCN_LR_MUL``): see
        :func:`dcn_offset_param_names`."""
        return dcn_offset_param_names(self)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(
        self, num_classes: int, global_pool: str | None = None, reset_other: bool = False
    ) -> None:
        """Replace the classifier; ``global_pool=''`` keeps the 4-D map, ``reset_other``
        removes the conv head (T..XL) or the attention pool and its norm (H/G).

        A metadata head gets a new ``num_classes`` classifier too; with ``num_classes == 0``
        it has none and ``forward`` returns the image features only (metadata is ignored)."""
        self.num_classes = num_classes
        head_had_parameters = next(self.head.parameters(), None) is not None
        self.head.reset(num_classes, global_pool, reset_other=reset_other)
        if not head_had_parameters:  # nothing there to take the dtype / device from
            ref = self.stem.conv1.weight
            self.head.to(device=ref.device, dtype=ref.dtype)
        self.head_hidden_size = self.head.num_features
        if self.meta_head is not None:
            self.meta_head.reset(num_classes)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (post level norm, pre downsample, as the original's det/seg
        backbones expose them), NCHW ``(N, C * 2**i, H / 2**(i+2), W / 2**(i+2))`` or NHWC.

        ``indices``: an int takes the last n stages, a list the given ones, None all.
        Returns ``(final, intermediates)`` where ``final == forward_features(x)``, or only
        the intermediates. ``norm`` is accepted for timm compatibility (the level norms are
        part of the stages; there is no extra final norm).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages if not stop_early else self.stages[:max_index + 1]
        intermediates = []
        x = self.stem(x)
        x3 = x
        for i, stage in enumerate(stages):
            x = stage(x)
            if i == len(self.stages) - 2:
                x3 = x
            if i in take_indices:
                intermediates.append(x if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        if intermediates_only:
            return intermediates
        if self.fuse is not None and len(stages) == len(self.stages):
            x = self.fuse(x3, x)
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last wanted index (and the fusion and head)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.fuse = None
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.head.in_features = self.num_features
        if prune_head or prune_end:
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        """``(N, in_chans, H, W)`` -> NCHW final map (see the class docstring)."""
        x = self.stem(x)
        if self.fuse is None:
            return self.stages(x)
        x3 = x
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == len(self.stages) - 2:
                x3 = x
        return self.fuse(x3, x)

    def forward_head(
        self,
        x: Tensor,
        pre_logits: bool = False,
        temporal: Tensor | None = None,
        spatial: Tensor | None = None,
    ) -> Tensor:
        """``forward_features`` map -> logits ``(N, num_classes)`` (or what the head returns,
        see the class docstring); ``pre_logits``: the pooled vector ``(N, head_hidden_size)``.

        ``temporal`` ``(N, 4)`` / ``spatial`` ``(N, 3)``: metadata for a model with a metadata
        head (zeros when None); its logits are added to the image logits (broadcast over a 4-D
        per-pixel output). Ignored, once shape-checked, with ``pre_logits`` or when the
        model has no classifier (``num_classes == 0``). ValueError for a wrong shape, or for
        metadata given to a model without a metadata head.
        """
        meta_head = self.meta_head
        if meta_head is None:
            # checked first: the head's output stays the last node of fx graphs (timm's fx
            # tests and feature extractors take the last node as the output)
            _reject_metadata(temporal, spatial)
            return self.head(x, pre_logits=pre_logits)
        temporal = _metadata_or_zeros(temporal, "temporal", meta_head.temporal.in_features, x,
                                      meta_head.temporal.proj.weight)
        spatial = _metadata_or_zeros(spatial, "spatial", meta_head.spatial.in_features, x,
                                     meta_head.spatial.proj.weight)
        out = self.head(x, pre_logits=pre_logits)
        if pre_logits or meta_head.num_classes == 0:
            return out
        return _add_metadata_logits(out, meta_head(temporal, spatial))

    def forward(
        self, x: Tensor, temporal: Tensor | None = None, spatial: Tensor | None = None
    ) -> Tensor:
        """``(N, in_chans, H, W)`` images (and optional metadata, see :meth:`forward_head`)
        -> logits."""
        return self.forward_head(self.forward_features(x), temporal=temporal, spatial=spatial)



def dcn_offset_param_names(model: nn.Module) -> list[str]:
    """Names of the parameters the original fine-tuning recipe trains at ``DCN_LR_MUL`` (0.1)
    times the LR: those containing ``offset`` or ``center_feature_scale_proj`` (the original
    also lists ``attention_weights`` and ``alpha_beta``, absent from these models). In
    FlashInternImage that is the packed ``offset_mask`` projection (its mask rows included)
    and ``offset_mask_dw``, as the DCNv4 repository's training code matches them too."""
    keys = ("offset", "center_feature_scale_proj", "attention_weights", "alpha_beta")
    return [name for name, _ in model.named_parameters() if any(k in name for k in keys)]

