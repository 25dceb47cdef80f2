"""InternImage (CVPR 2023) as a timm model family, numerically identical to the original.

Paper: "InternImage: Exploring Large-Scale Vision Foundation Models with Deformable
Convolutions", https://arxiv.org/abs/2211.05778. Original code and weights:
https://github.com/OpenGVLab/InternImage (MIT).

Layout (timm style, see ``checkpoint_filter_fn`` for the mapping from the original keys):

* ``stem``: conv 3x3/2 -> LN -> act -> conv 3x3/2 -> LN (the original ``patch_embed``);
* ``stages.i`` (``nn.Sequential``): for i > 0 the downsample (conv 3x3/2 without bias -> LN)
  that the original runs at the end of ``levels.{i-1}``, then the blocks, the level-2 post
  norms (H/G) and the level norm (when the original has one);
* ``fuse`` (H/G only): the original ``dcnv3_head_x4`` / ``dcnv3_head_x3`` projections fusing
  stages 3 and 4 into a 1024-channel stride-16 map;
* ``head``: conv head (1x1 conv -> BN -> act at ``cls_scale`` width) + pool + fc for T/S/B/L/XL,
  or attention pooling (``clip_projector``) + LN + fc for H/G.
* ``meta_head`` (only with ``meta_dim``, the iNaturalist H): temporal/spatial metadata
  encoders + LN + fc, whose logits are added to the head's (the original ``meta_head_1/2``,
  ``meta_norm``, ``meta_head``).

Memory layout: stage inputs and outputs are NCHW tensors with channels_last memory; inside a
stage activations are contiguous NHWC, so every Linear runs without a permute and each
``permute`` between the two is a free view. ``forward_features`` returns the NCHW final map.

The network and the timm API live in :class:`InternImageBase`, which takes the blocks' token
mixer as an argument: :class:`InternImage` builds it with DCNv3, FlashInternImage
(``flash_internimage.py``) with DCNv4; ``checkpoint_filter_fn`` serves both families.
"""

# No ``from __future__ import annotations`` here: torch.fx copies the root ``forward``'s
# annotations into the code it generates, and TorchScript cannot resolve them as strings
# (timm's scripted FX feature extractor).
import logging
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    SelectAdaptivePool2d,
    trunc_normal_,
)
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint
from torch import Tensor, nn

from internimage.dcnv3 import (
    CORE_OPS,
    DCNv3,
    LayerNormNCHW,
    check_norm_layer,
    get_act_layer,
    norm_nchw,
)

__all__ = [
    "InternImage",
    "InternImageBase",
    "InternImageStem",
    "InternImageDownsample",
    "InternImageMlp",
    "InternImageBlock",
    "InternImageStage",
    "ConvClassifierHead",
    "ClipFusion",
    "AttentionPool",
    "ClipClassifierHead",
    "MetadataResidualBlock",
    "MetadataEncoder",
    "MetadataHead",
    "checkpoint_filter_fn",
    "encode_inat_metadata",
    "dcn_offset_param_names",
    "imagenet22k_to_1k_indices",
]

_logger = logging.getLogger("internimage")

# Constants of the original clip-projector head (hard-coded there as well).
CLIP_EMBED_DIM = 1024
CLIP_NUM_HEADS = 16
CLIP_OUT_DIM = 768
CLIP_UPSAMPLE = 2

LN_EPS = 1e-6
META_LN_EPS = 1e-5  # the metadata encoders' LayerNorms use PyTorch's default eps

IN1K_NUM_CLASSES = 1000
IN22K_NUM_CLASSES = 21841
INAT18_NUM_CLASSES = 8142

# Widths of the iNaturalist metadata vectors (see encode_inat_metadata).
TEMPORAL_FEATURES = 4
SPATIAL_FEATURES = 3


# ---------------------------------------------------------------------------------------------
# Layers


class _StaysEvalWhenFrozen(nn.Module):
    """A part of the model that :meth:`InternImage.freeze_stages` can freeze: once
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


class ConvClassifierHead(nn.Module):
    """Conv head of T/S/B/L/XL: 1x1 conv (no bias) -> BN -> act -> pool -> dropout -> fc.

    Input ``(N, C, H, W)``. Output ``(N, num_classes)``; ``(N, hidden)`` with ``pre_logits``
    (the original ``forward_features`` vector); 4-D ``(N, hidden or num_classes, H, W)`` when
    ``pool_type == ''`` (the fc then acts per pixel).
    """

    def __init__(
        self,
        in_chs: int,
        hidden_size: int,
        num_classes: int,
        pool_type: str = "avg",
        drop_rate: float = 0.0,
        act_layer: str | type[nn.Module] = "GELU",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_features = in_chs
        self.conv = nn.Conv2d(in_chs, hidden_size, 1, bias=False, **dd)
        self.norm = nn.BatchNorm2d(hidden_size, **dd)
        self.act = get_act_layer(act_layer)()
        self.num_features = hidden_size
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        self.drop = nn.Dropout(drop_rate)
        self.fc = self._make_fc(num_classes, **dd)

    def _make_fc(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        in_features = self.num_features * self.global_pool.feat_mult()
        if num_classes > 0:
            return nn.Linear(in_features, num_classes, device=device, dtype=dtype)
        return nn.Identity()

    def reset(
        self, num_classes: int, pool_type: str | None = None, reset_other: bool = False
    ) -> None:
        """New classifier; ``reset_other`` also removes the conv/BN/act pre-logits layers."""
        ref = next(self.parameters(), None)  # read before reset_other removes layers
        dd = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
        if reset_other:
            self.conv, self.norm, self.act = nn.Identity(), nn.Identity(), nn.Identity()
            self.num_features = self.in_features
        if pool_type is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        self.fc = self._make_fc(num_classes, **dd)
        self.train(self.training)  # new modules follow the head's train/eval mode

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.act(self.norm(self.conv(x)))
        x = self.drop(self.global_pool(x))
        if pre_logits:
            return x
        if self.global_pool.is_identity() and not isinstance(self.fc, nn.Identity):
            return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # per-pixel classifier
        return self.fc(x)


@torch.fx.wrap  # a leaf for torch.fx: its shape test cannot run on a Proxy
def _check_fusion_sizes(up: Tensor, x3: Tensor) -> Tensor:
    """``up`` unchanged when its spatial size matches ``x3``'s; ValueError otherwise."""
    if up.shape[-2:] != x3.shape[-2:]:
        raise ValueError(
            "InternImage clip head: the upsampled stage-4 map must match the stage-3 map, "
            f"got ({up.shape[-2]}, {up.shape[-1]}) and ({x3.shape[-2]}, {x3.shape[-1]}); "
            "use input sides divisible by 32"
        )
    return up


class ClipFusion(nn.Module):
    """H/G feature fusion: ``shuffle(proj_x4(stage 4)) + proj_x3(stage 3)``.

    ``proj_x4`` is a 1x1 conv (with bias) to ``embed_dim * upsample**2`` channels followed by
    PixelShuffle(upsample); ``proj_x3`` a 1x1 conv to ``embed_dim``. Inputs NCHW; output
    ``(N, embed_dim, H3, W3)`` at stage-3 resolution, so stage 3 must be exactly twice stage 4
    (input sides divisible by 32).
    """

    def __init__(
        self,
        in_chs_x3: int,
        in_chs_x4: int,
        embed_dim: int = CLIP_EMBED_DIM,
        upsample: int = CLIP_UPSAMPLE,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.proj_x4 = nn.Conv2d(in_chs_x4, embed_dim * upsample**2, 1, **dd)
        self.shuffle = nn.PixelShuffle(upsample)
        self.proj_x3 = nn.Conv2d(in_chs_x3, embed_dim, 1, **dd)

    def forward(self, x3: Tensor, x4: Tensor) -> Tensor:
        up = _check_fusion_sizes(self.shuffle(self.proj_x4(x4)), x3)
        return up + self.proj_x3(x3)


class AttentionPool(nn.Module):
    """Attention pooling of the original ``clip_projector`` (AttentionPoolingBlock).

    Tokens ``(N, L, dim)`` -> ``(N, out_dim)``: the query is the token mean; q, k, v come from
    separate LayerNorms and bias-free Linears plus learnable ``q_bias`` / ``k_bias`` /
    ``v_bias``; multi-head softmax attention; ``proj`` to ``out_dim``. No residual, no MLP.
    """

    def __init__(
        self,
        dim: int = CLIP_EMBED_DIM,
        num_heads: int = CLIP_NUM_HEADS,
        out_dim: int = CLIP_OUT_DIM,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got {dim} and {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.norm_q = nn.LayerNorm(dim, eps=LN_EPS, **dd)
        self.norm_k = nn.LayerNorm(dim, eps=LN_EPS, **dd)
        self.norm_v = nn.LayerNorm(dim, eps=LN_EPS, **dd)
        self.q = nn.Linear(dim, dim, bias=False, **dd)
        self.k = nn.Linear(dim, dim, bias=False, **dd)
        self.v = nn.Linear(dim, dim, bias=False, **dd)
        self.q_bias = nn.Parameter(torch.zeros(dim, **dd))
        self.k_bias = nn.Parameter(torch.zeros(dim, **dd))
        self.v_bias = nn.Parameter(torch.zeros(dim, **dd))
        self.proj = nn.Linear(dim, out_dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        heads = [self.num_heads, self.head_dim]
        q = self.q(self.norm_q(x.mean(1, keepdim=True))) + self.q_bias
        k = self.k(self.norm_k(x)) + self.k_bias
        v = self.v(self.norm_v(x)) + self.v_bias
        q = q.unflatten(-1, heads).transpose(1, 2) * self.scale  # (N, heads, 1, head_dim)
        k = k.unflatten(-1, heads).transpose(1, 2)  # (N, heads, L, head_dim)
        v = v.unflatten(-1, heads).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)  # (N, heads, 1, L)
        out = (attn @ v).flatten(1)  # (N, dim): heads then head_dim, the 1 dimension dropped
        return self.proj(out)


class ClipClassifierHead(nn.Module):
    """H/G head: attention pooling -> LN (the original ``fc_norm``) -> dropout -> fc.

    Input: the fused ``(N, in_chs, H, W)`` map. ``pool_type`` 'attn' (default) pools with
    :class:`AttentionPool` to ``(N, 768)``; '' returns the map unchanged (4-D, no classifier
    when ``num_classes == 0``). After ``reset(..., reset_other=True)`` the attention pool and
    norm are gone and any timm pool type ('avg', ...) pools the ``in_chs``-wide map.
    """

    def __init__(
        self,
        in_chs: int,
        num_classes: int,
        pool_type: str = "attn",
        drop_rate: float = 0.0,
        num_heads: int = CLIP_NUM_HEADS,
        out_dim: int = CLIP_OUT_DIM,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_features = in_chs
        self.attn_pool: AttentionPool | None = AttentionPool(in_chs, num_heads, out_dim, **dd)
        self.norm = nn.LayerNorm(out_dim, eps=LN_EPS, **dd)
        self.num_features = out_dim
        self._set_pool(pool_type)
        self.drop = nn.Dropout(drop_rate)
        self.fc = self._make_fc(num_classes, **dd)

    def _set_pool(self, pool_type: str) -> None:
        if self.attn_pool is not None and pool_type not in ("attn", ""):
            raise ValueError(
                "global_pool of an InternImage clip head must be 'attn' or '' (use "
                f"reset_classifier(..., reset_other=True) for other pools), got {pool_type!r}"
            )
        if self.attn_pool is None and pool_type == "attn":
            pool_type = "avg"
        self.pool_type = pool_type
        self.global_pool = (
            SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
            if pool_type not in ("attn", "") else nn.Identity()
        )

    def _make_fc(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        if num_classes > 0:
            width = self.num_features if self.pool_type != "" else self.in_features
            return nn.Linear(width, num_classes, device=device, dtype=dtype)
        return nn.Identity()

    def reset(
        self, num_classes: int, pool_type: str | None = None, reset_other: bool = False
    ) -> None:
        """New classifier; ``reset_other`` also removes the attention pool and its norm."""
        ref = next(self.parameters(), None)  # read before reset_other removes layers
        dd = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
        if reset_other:
            self.attn_pool = None
            self.norm = nn.Identity()
            self.num_features = self.in_features
        self._set_pool(self.pool_type if pool_type is None else pool_type)
        self.fc = self._make_fc(num_classes, **dd)
        self.train(self.training)  # new modules follow the head's train/eval mode

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        # 'attn' implies an attention pool; testing for it first lets TorchScript skip the
        # branch once reset(reset_other=True) has removed the pool
        if self.attn_pool is not None and self.pool_type == "attn":
            x = self.norm(self.attn_pool(x.flatten(2).transpose(1, 2)))
        elif self.pool_type != "":
            x = self.norm(self.global_pool(x))
        x = self.drop(x)
        if pre_logits:
            return x
        if self.pool_type == "" and not isinstance(self.fc, nn.Identity):
            return self.fc(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # per-pixel classifier
        return self.fc(x)


# ---------------------------------------------------------------------------------------------
# iNaturalist metadata head and encoding


class MetadataResidualBlock(nn.Module):
    """Residual MLP of the metadata encoders (the original ``MetaEncoder``).

    ``(..., dim)`` -> ``(..., dim)``: ``x + norm2(act(fc2(norm1(act(fc1(x))))))`` with ReLU
    and LayerNorms of eps 1e-5 (PyTorch's default, as in the original).
    """

    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(dim, dim, **dd)
        self.norm1 = nn.LayerNorm(dim, eps=META_LN_EPS, **dd)
        self.fc2 = nn.Linear(dim, dim, **dd)
        self.norm2 = nn.LayerNorm(dim, eps=META_LN_EPS, **dd)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(self.act(self.fc1(x)))
        return x + self.norm2(self.act(self.fc2(y)))


class MetadataEncoder(nn.Module):
    """One metadata branch: Linear(in_features, dim) -> ReLU -> LN -> residual MLP.

    ``(N, in_features)`` -> ``(N, dim)`` (the original ``meta_head_1`` / ``meta_head_2``; the
    residual MLP is :class:`MetadataResidualBlock`).
    """

    def __init__(self, in_features: int, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_features = in_features
        self.proj = nn.Linear(in_features, dim, **dd)
        self.act = nn.ReLU()
        self.norm = nn.LayerNorm(dim, eps=META_LN_EPS, **dd)
        self.block = MetadataResidualBlock(dim, **dd)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(self.norm(self.act(self.proj(x))))


class MetadataHead(nn.Module):
    """Metadata classifier of the original iNaturalist model (``intern_image_meta_former``).

    ``temporal`` ``(N, 4)`` and ``spatial`` ``(N, 3)`` (see :func:`encode_inat_metadata`) are
    encoded to ``(N, dim)`` each by :class:`MetadataEncoder`; the concatenation ``(N, 2 dim)``
    goes through LN (eps 1e-6) and ``fc`` to ``(N, num_classes)`` logits, which the model adds
    to the image logits. With ``num_classes == 0`` ``fc`` is an Identity and the model skips
    the metadata (``forward`` then returns the normalised ``(N, 2 dim)`` embedding).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int = 64,
        temporal_features: int = TEMPORAL_FEATURES,
        spatial_features: int = SPATIAL_FEATURES,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.num_classes = num_classes
        self.temporal = MetadataEncoder(temporal_features, dim, **dd)
        self.spatial = MetadataEncoder(spatial_features, dim, **dd)
        self.norm = nn.LayerNorm(2 * dim, eps=LN_EPS, **dd)
        self.fc = self._make_fc(num_classes, **dd)

    def _make_fc(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        if num_classes > 0:
            return nn.Linear(2 * self.dim, num_classes, device=device, dtype=dtype)
        return nn.Identity()

    def reset(self, num_classes: int) -> None:
        """New metadata classifier of ``num_classes`` outputs (Identity for 0), initialised
        like the model's Linears (trunc-normal 0.02 weight, zero bias)."""
        ref = self.norm.weight
        self.num_classes = num_classes
        self.fc = self._make_fc(num_classes, device=ref.device, dtype=ref.dtype)
        if isinstance(self.fc, nn.Linear):
            trunc_normal_(self.fc.weight, std=0.02)
            nn.init.zeros_(self.fc.bias)
        self.train(self.training)

    def forward(self, temporal: Tensor, spatial: Tensor) -> Tensor:
        """``(N, 4)``, ``(N, 3)`` -> ``(N, num_classes)`` (``(N, 2 dim)`` without classifier)."""
        meta = torch.cat([self.temporal(temporal), self.spatial(spatial)], dim=-1)
        return self.fc(self.norm(meta))


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


def _metadata_values(name: str, value: Any, low: float, high: float) -> Tensor | None:
    """``value`` as a float64 tensor of 0 or 1 dims (NaN for missing entries), or None."""
    if value is None:
        return None
    kinds = "a number, a sequence, an array or a tensor"
    if isinstance(value, Tensor):
        values = value.detach().to("cpu", torch.float64)
    elif isinstance(value, bool | str):
        raise TypeError(f"{name} must be {kinds}, got {value!r}")
    elif isinstance(value, numbers.Real):
        values = torch.tensor(float(value), dtype=torch.float64)
    elif isinstance(value, Sequence):
        bad = [v for v in value if v is not None and (
            isinstance(v, bool) or not isinstance(v, numbers.Real))]
        if bad:
            raise TypeError(f"{name} entries must be numbers or None, got {bad[0]!r}")
        values = torch.tensor([float("nan") if v is None else float(v) for v in value],
                              dtype=torch.float64)
    elif hasattr(value, "__array__"):  # numpy arrays and scalars
        try:
            values = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"{name} must be numeric, got an array of {value.dtype}") from error
    else:
        raise TypeError(f"{name} must be {kinds}, got {type(value).__name__}")
    if values.dim() > 1:
        raise ValueError(f"{name} must be a scalar or 1-D, got shape {list(values.shape)}")
    known = values[~values.isnan()]
    if known.numel() and (known.min() < low or known.max() > high):
        raise ValueError(
            f"{name} must lie in [{low:g}, {high:g}] (None/NaN for missing), got values in "
            f"[{known.min().item():g}, {known.max().item():g}]"
        )
    return values


def encode_inat_metadata(
    month: Any = None,
    hour: Any = None,
    latitude: Any = None,
    longitude: Any = None,
    *,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """iNaturalist metadata vectors for :class:`MetadataHead`: ``(temporal, spatial)``.

    * ``temporal`` ``(N, 4)``: ``[sin(2 pi month / 12), cos(2 pi month / 12),
      sin(2 pi hour / 24), cos(2 pi hour / 24)]``, month 1..12, hour of the day 0..24
      (fractions allowed; 24 is 0); a missing month or hour gives zeros in its two columns;
    * ``spatial`` ``(N, 3)``: ``[cos(lat) cos(lon), cos(lat) sin(lon), sin(lat)]``, the unit
      vector of the position on the sphere, from ``latitude`` in [-90, 90] and ``longitude``
      in [-180, 180] **degrees**; zeros when either is missing.

    This is the MetaFormer encoding (``get_temporal_info`` / ``get_spatial_info`` of
    dqshuai/MetaFormer's iNaturalist dataset, which feeds ``[temporal, spatial]`` split 4 + 3
    to the same kind of metadata head), zeros standing for missing metadata. The InternImage
    repository publishes the iNat18 model and config but no iNat data pipeline, so that it
    used exactly this encoding is inferred, not verified. One difference: MetaFormer also
    treats a latitude or longitude of exactly 0 as missing (a truthiness test); here only
    None / NaN are missing.

    Each argument is None (missing for all), a number (the same for every sample), or a
    sequence / 1-D tensor of length N with None or NaN for missing entries. N is the common
    length of the 1-D arguments, else ``batch_size`` (default 1). Returns ``dtype`` tensors
    on ``device``. ValueError for values out of range or lengths that disagree; TypeError
    for non-numeric values.
    """
    values = {
        "month": _metadata_values("month", month, 1, 12),
        "hour": _metadata_values("hour", hour, 0, 24),
        "latitude": _metadata_values("latitude", latitude, -90, 90),
        "longitude": _metadata_values("longitude", longitude, -180, 180),
    }
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be None or an int >= 1, got {batch_size!r}")
    lengths = {k: v.shape[0] for k, v in values.items() if v is not None and v.dim() == 1}
    sizes = set(lengths.values()) | ({batch_size} if batch_size is not None else set())
    if len(sizes) > 1:
        raise ValueError(
            "month, hour, latitude and longitude must have the same length (and match "
            f"batch_size={batch_size}), got lengths {lengths}"
        )
    n = sizes.pop() if sizes else 1
    nan = torch.full((n,), float("nan"), dtype=torch.float64)
    month_v, hour_v, lat_v, lon_v = (
        nan if v is None else v.expand(n) for v in values.values()
    )

    def circle(v: Tensor, period: float) -> Tensor:
        angle = (2 * torch.pi / period) * v
        pair = torch.stack([angle.sin(), angle.cos()], dim=-1)
        return pair.masked_fill(v.isnan()[:, None], 0.0)

    temporal = torch.cat([circle(month_v, 12.0), circle(hour_v, 24.0)], dim=-1)
    lat, lon = torch.deg2rad(lat_v), torch.deg2rad(lon_v)
    spatial = torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=-1)
    spatial = spatial.masked_fill((lat_v.isnan() | lon_v.isnan())[:, None], 0.0)
    return temporal.to(device=device, dtype=dtype), spatial.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Model


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
    """The network and timm API shared by :class:`InternImage` and
    :class:`~internimage.FlashInternImage`; build one of those, not this class.

    The two families differ only in their token mixer (``dcn_layer`` built with ``dcn_kwargs``
    in every block, see :class:`InternImageBlock`) and the MLP's ``fc2`` bias; the stem,
    stages, heads, stochastic depth, ``output_stride``, ``frozen_stages`` and the timm methods
    are this class's. The keywords are the families' (see :class:`InternImage`); invalid
    values raise ``ValueError`` / ``TypeError`` naming the argument, the expected and the
    given value.
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


class InternImage(InternImageBase):
    """InternImage with the original constructor's keywords plus timm's.

    Original keywords (defaults as in the original ``InternImage.__init__``): ``core_op``
    ('DCNv3' compiled kernels or 'DCNv3_pytorch' reference), ``channels``, ``depths``,
    ``groups``, ``num_classes``, ``mlp_ratio``, ``drop_rate`` (dropout after the stem and in
    the MLPs, as in the original), ``drop_path_rate``, ``drop_path_type`` ('linear' or
    'uniform'), ``act_layer``, ``norm_layer``, ``layer_scale``, ``offset_scale``,
    ``post_norm``, ``cls_scale``, ``with_cp`` (gradient checkpointing), ``dw_kernel_size``,
    ``use_clip_projector``, ``level2_post_norm``, ``level2_post_norm_block_ids``,
    ``res_post_norm``, ``center_feature_scale``, ``remove_center``, and ``meta_dim`` of the
    original's iNaturalist model type (``intern_image_meta_former``): None (default) builds no
    metadata head; an int builds :class:`MetadataHead` of that width (64 in the original).

    timm keywords: ``in_chans``, ``global_pool`` (None: 'avg' for the conv head, 'attn' for
    the clip head; '' keeps the 4-D map), ``head_drop_rate`` (dropout before the classifier),
    ``output_stride`` (32, or 16 / 8 for dense prediction: the later stages keep the
    resolution, their downsampling convs stride 1 and their DCNv3 sampling grids and offset
    branches dilated 2x / 4x, as timm's ConvNeXt does; the weights are unchanged, and
    ``feature_info`` reductions become 4, 8, 16, 16 / 4, 8, 8, 8), ``frozen_stages`` (the
    det/seg backbones' option, see :meth:`freeze_stages`), ``device``, ``dtype``. Unknown
    keywords raise ``TypeError``, as timm requires (the original ignores them silently);
    invalid values raise ``ValueError`` / ``TypeError`` naming the argument, the expected and
    the given value.

    Input ``(N, in_chans, H, W)``. ``forward_features`` returns the NCHW final map:
    ``(N, 8C, H/32, W/32)`` (conv head, ``num_features = 8C``) or the fused
    ``(N, 1024, H/16, W/16)`` map (clip head, ``num_features = 1024``).
    ``forward_head(pre_logits=True)`` gives the original ``forward_features`` vector
    (width ``head_hidden_size``: ``int(8C * cls_scale)`` or 768).

    With a metadata head, ``forward(x, temporal, spatial)`` returns image logits plus metadata
    logits; ``temporal`` ``(N, 4)`` and ``spatial`` ``(N, 3)`` are optional (missing ones are
    zeros, the original's encoding of missing metadata; :func:`encode_inat_metadata` builds
    them). A model without one raises ValueError when metadata is given.
    """

    def __init__(
        self,
        core_op: str = "DCNv3",
        channels: int = 64,
        depths: Sequence[int] = (3, 4, 18, 5),
        groups: Sequence[int] = (3, 6, 12, 24),
        num_classes: int = 1000,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.2,
        drop_path_type: str = "linear",
        act_layer: str | type[nn.Module] = "GELU",
        norm_layer: str = "LN",
        layer_scale: float | None = None,
        offset_scale: float = 1.0,
        post_norm: bool = False,
        cls_scale: float = 1.5,
        with_cp: bool = False,
        dw_kernel_size: int | None = None,
        use_clip_projector: bool = False,
        level2_post_norm: bool = False,
        level2_post_norm_block_ids: Sequence[int] | None = None,
        res_post_norm: bool = False,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        meta_dim: int | None = None,
        in_chans: int = 3,
        global_pool: str | None = None,
        output_stride: int = 32,
        frozen_stages: int = -1,
        head_drop_rate: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        if core_op not in CORE_OPS:
            raise ValueError(f"core_op must be one of {list(CORE_OPS)}, got {core_op!r}")
        super().__init__(
            dcn_layer=DCNv3,
            # dw_kernel_size None: DCNv3's own default (its kernel size)
            dcn_kwargs=dict(act_layer=act_layer, norm_layer=norm_layer,
                            center_feature_scale=center_feature_scale,
                            remove_center=remove_center, core_op=core_op),
            core_op=core_op, channels=channels, depths=depths, groups=groups,
            num_classes=num_classes, mlp_ratio=mlp_ratio, drop_rate=drop_rate,
            drop_path_rate=drop_path_rate, drop_path_type=drop_path_type, act_layer=act_layer,
            norm_layer=norm_layer, layer_scale=layer_scale, offset_scale=offset_scale,
            post_norm=post_norm, cls_scale=cls_scale, with_cp=with_cp, mlp_fc2_bias=True,
            dw_kernel_size=dw_kernel_size, use_clip_projector=use_clip_projector,
            level2_post_norm=level2_post_norm,
            level2_post_norm_block_ids=level2_post_norm_block_ids, res_post_norm=res_post_norm,
            center_feature_scale=center_feature_scale, meta_dim=meta_dim, in_chans=in_chans,
            global_pool=global_pool, output_stride=output_stride, frozen_stages=frozen_stages,
            head_drop_rate=head_drop_rate, device=device, dtype=dtype,
        )


def dcn_offset_param_names(model: nn.Module) -> list[str]:
    """Names of the parameters the original fine-tuning recipe trains at ``DCN_LR_MUL`` (0.1)
    times the LR: those containing ``offset`` or ``center_feature_scale_proj`` (the original
    also lists ``attention_weights`` and ``alpha_beta``, absent from these models). In
    FlashInternImage that is the packed ``offset_mask`` projection (its mask rows included)
    and ``offset_mask_dw``, as the DCNv4 repository's training code matches them too."""
    keys = ("offset", "center_feature_scale_proj", "attention_weights", "alpha_beta")
    return [name for name, _ in model.named_parameters() if any(k in name for k in keys)]


# ---------------------------------------------------------------------------------------------
# Checkpoint filter

# Original / transformers-port key -> this layout. Applied in order, first match wins.
_META_BRANCH = {"1": "temporal", "2": "spatial"}
_KEY_RULES: tuple[tuple[re.Pattern, Any], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^patch_embed\.conv([12])\.", r"stem.conv\1."),
    (r"^patch_embed\.norm([12])\.[01]\.", r"stem.norm\1."),
    (r"^levels\.(\d+)\.downsample\.conv\.",
     lambda m: f"stages.{int(m.group(1)) + 1}.downsample.conv."),
    (r"^levels\.(\d+)\.downsample\.norm\.[01]\.",
     lambda m: f"stages.{int(m.group(1)) + 1}.downsample.norm."),
    (r"^levels\.(\d+)\.norm\.0\.", r"stages.\1.norm."),
    (r"^levels\.(\d+)\.post_norms\.(\d+)\.0\.", r"stages.\1.post_norms.\2."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.(norm[12]|res_post_norm[12])\.0\.",
     r"stages.\1.blocks.\2.\3."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.dcn\.dw_conv\.0\.", r"stages.\1.blocks.\2.dcn.dw_conv."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.dcn\.dw_conv\.1\.[01]\.",
     r"stages.\1.blocks.\2.dcn.dw_norm."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.(?:gamma|layer_scale)([12])$",
     r"stages.\1.blocks.\2.gamma\3"),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^conv_head\.0\.", "head.conv."),
    (r"^conv_head\.1\.0\.", "head.norm."),
    (r"^dcnv3_head_x4\.0\.", "fuse.proj_x4."),
    (r"^dcnv3_head_x3\.", "fuse.proj_x3."),
    (r"^clip_projector\.norm1_([qkv])\.0\.", r"head.attn_pool.norm_\1."),
    (r"^clip_projector\.cross_dcn\.", "head.attn_pool."),
    (r"^fc_norm\.0\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
    # iNaturalist meta-former: meta_head_1/2 = Sequential(Linear, ReLU, LN, MetaEncoder)
    (r"^meta_head_([12])\.0\.", lambda m: f"meta_head.{_META_BRANCH[m.group(1)]}.proj."),
    (r"^meta_head_([12])\.2\.", lambda m: f"meta_head.{_META_BRANCH[m.group(1)]}.norm."),
    (r"^meta_head_([12])\.3\.(w|norm_fn)([12])\.",
     lambda m: f"meta_head.{_META_BRANCH[m.group(1)]}.block."
               f"{'fc' if m.group(2) == 'w' else 'norm'}{m.group(3)}."),
    (r"^meta_norm\.", "meta_head.norm."),
    (r"^meta_head\.(weight|bias)$", r"meta_head.fc.\1"),
))
_ORIGINAL_ROOTS = ("patch_embed.", "levels.", "conv_head.", "head.", "dcnv3_head_x4.",
                   "dcnv3_head_x3.", "clip_projector.", "fc_norm.", "meta_head", "meta_norm.")
_WRAPPER_KEYS = ("model", "state_dict", "module")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.", "student.")


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    for _ in range(4):  # nested wrappers such as {'state_dict': {'model': ...}}
        for key in _WRAPPER_KEYS:
            inner = state_dict.get(key)
            if isinstance(inner, Mapping):
                state_dict = inner
                break
        else:
            return state_dict
    return state_dict


def _backbone_only(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``backbone.*`` entries of a detection/segmentation checkpoint (mmdet/mmseg layout:
    ``backbone.``, ``neck.``, ``decode_head.``, ``roi_head.``, ...; possibly under ``module.``);
    the rest is reported in one line (logger ``internimage``) and dropped. Other dicts are
    returned as they are."""
    def top(key: str) -> str:
        key = key[len("module."):] if key.startswith("module.") else key
        return key.split(".", 1)[0]

    if not any(top(k) == "backbone" for k in state_dict):
        return state_dict
    dropped: dict[str, int] = {}
    for key in state_dict:
        if top(key) != "backbone":
            dropped[top(key)] = dropped.get(top(key), 0) + 1
    if dropped:
        _logger.info(
            "internimage: loading the backbone of a detection/segmentation checkpoint; dropped "
            "%d keys of %s", sum(dropped.values()),
            ", ".join(f"{name} ({count})" for name, count in sorted(dropped.items())),
        )
    return {k: v for k, v in state_dict.items() if top(k) == "backbone"}


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
        # transformers port: every key under 'model.'
        if key.startswith("model.") and key[len("model."):].startswith(_ORIGINAL_ROOTS):
            key, changed = key[len("model."):], True
    return key


def _convert_key(key: str) -> str:
    for pattern, replacement in _KEY_RULES:
        new_key, count = pattern.subn(replacement, key, count=1)
        if count:
            return new_key
    return key


def _centre_removed(tensor: Tensor, group: int, points: int, pairs: int) -> Tensor:
    """Drops the centre tap from offset (pairs=2) / mask (pairs=1) rows: the point
    ``taps // 2`` of each group (width-outer / height-inner order, odd square kernel)."""
    taps = points + 1
    rows = tensor.reshape(group, taps, pairs, *tensor.shape[1:])
    keep = [p for p in range(taps) if p != taps // 2]
    return rows[:, keep].reshape(group * points * pairs, *tensor.shape[1:])


@lru_cache(maxsize=1)
def _map22kto1k() -> tuple[int, ...]:
    text = resources.files("internimage").joinpath("map22kto1k.txt").read_text()
    rows = tuple(int(line) for line in text.splitlines() if line.strip() and line[0] != "#")
    if len(rows) != IN1K_NUM_CLASSES or not all(0 <= r < IN22K_NUM_CLASSES for r in rows):
        raise RuntimeError(
            f"internimage/map22kto1k.txt must hold {IN1K_NUM_CLASSES} rows in "
            f"[0, {IN22K_NUM_CLASSES}), got {len(rows)} rows in [{min(rows, default=None)}, "
            f"{max(rows, default=None)}]: the installed package is damaged"
        )
    return rows


def imagenet22k_to_1k_indices() -> Tensor:
    """Rows of a 21841-class ImageNet-22k classifier that give the 1000 ImageNet-1k classes.

    Returns an int64 tensor of shape ``(1000,)``: entry ``k`` is the 22k row for 1k class
    ``k``, so ``logits_22k[:, idx]`` are 1k logits and ``fc.weight[idx]`` / ``fc.bias[idx]``
    a 1k head. This is the original's ``classification/meta_data/map22kto1k.txt`` (class 850,
    teddy bear, has no 22k synset and reuses row 11136, class 849's).
    """
    return torch.tensor(_map22kto1k(), dtype=torch.long)


def _head_22k_to_1k(key: str, value: Tensor, target: Tensor) -> Tensor | None:
    """``head.fc.weight`` ``(21841, D)`` / ``head.fc.bias`` ``(21841,)`` sliced to the 1k rows
    when the model's head has 1000 classes; None for any other key or shape."""
    if key not in ("head.fc.weight", "head.fc.bias"):
        return None
    if value.shape[0] != IN22K_NUM_CLASSES or target.shape[0] != IN1K_NUM_CLASSES:
        return None
    if value.shape[1:] != target.shape[1:]:
        return None
    return value.index_select(0, imagenet22k_to_1k_indices().to(value.device))


# A key of each family's DCN modules: DCNv3's separate offset projection (and input_proj),
# DCNv4's packed offset_mask projection.
_FAMILY_KEYS = (
    (re.compile(r"\.dcn\.(offset|input_proj)\.weight$"), "an InternImage (DCNv3)",
     "internimage_* (internimage.InternImage)"),
    (re.compile(r"\.dcn\.offset_mask\.weight$"), "a FlashInternImage (DCNv4)",
     "flash_internimage_* (internimage.FlashInternImage)"),
)


def _family(keys: Iterable[str]) -> tuple[str, str, str] | None:
    """``(family, builder, a key)`` of the first DCN key among ``keys``, or None."""
    for key in keys:
        for pattern, family, builder in _FAMILY_KEYS:
            if pattern.search(key):
                return family, builder, key
    return None


def _check_family(state_dict: Mapping[str, Any], model: nn.Module) -> None:
    """ValueError when ``state_dict`` holds the DCN modules of the other family than
    ``model``'s."""
    ours, theirs = _family(model.state_dict()), _family(state_dict)
    if ours is not None and theirs is not None and ours[0] != theirs[0]:
        raise ValueError(
            f"this is {theirs[0]} state dict (key '{theirs[2]}'), the model is {ours[0]}: "
            f"build {theirs[1]} for it"
        )


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: nn.Module | None = None
) -> dict[str, Any]:
    """Converts an original InternImage or FlashInternImage state dict into this package's
    layout (the two families' keys differ only inside the DCN modules, whose names are the
    original ones).

    Accepts the raw state dict or one under 'model' / 'state_dict' / 'module', strips
    ``module.``, ``_orig_mod.``, ``backbone.`` and ``student.`` prefixes and the transformers
    port's ``model.`` prefix (and its ``layer_scale1/2`` names for ``gamma1/2``), and renames
    the keys (``patch_embed`` -> ``stem``, ``levels.i.downsample`` -> ``stages.{i+1}``
    .downsample, ``conv_head``/``head`` -> ``head.conv/norm/fc``, clip head -> ``fuse`` and
    ``head.attn_pool/norm/fc``, ...). Keys of a dict already in this layout are kept
    (prefixes stripped).

    With ``model`` given it also adapts to the model (a no-op when nothing needs it): 3x3
    checkpoints are converted for a
    ``remove_center`` model by dropping the centre offset/mask rows, and layer-scale gammas
    the checkpoint lacks (T used with ``layer_scale`` as in the detection configs) are set to
    the model's ``layer_scale`` init value; a 21841-class ImageNet-22k head (``head.fc``) is
    sliced to the 1000 ImageNet-1k rows (:func:`imagenet22k_to_1k_indices`, the original's
    ``map22kto1k.txt``) when the model has 1000 classes. Other head sizes are left as they
    are (timm drops a head whose size differs from the pretrained cfg's). A model without a
    metadata head (no ``meta_dim``) gets the image network of a meta-former checkpoint (the
    iNaturalist H): its ``meta_head.*`` keys are dropped. A state dict of the other family
    (DCNv3 keys for a FlashInternImage model, or DCNv4 keys for an InternImage) is a
    ValueError that names both.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    state_dict = _backbone_only(_unwrap(state_dict))
    out = {_strip_prefixes(k): v for k, v in state_dict.items()}
    if not any(k.startswith(("stem.", "stages.")) for k in out):  # else: already this layout
        out = {_convert_key(k): v for k, v in out.items()}
    if model is None:
        return out

    _check_family(out, model)
    if getattr(model, "meta_head", None) is None:  # e.g. the iNat file into a plain model
        out = {k: v for k, v in out.items() if not k.startswith("meta_head.")}
    model_state = model.state_dict()
    for key, value in list(out.items()):
        target = model_state.get(key)
        if target is None or not isinstance(value, Tensor) or target.shape == value.shape:
            continue
        sliced = _head_22k_to_1k(key, value, target)
        if sliced is not None:
            out[key] = sliced
            continue
        match = re.search(r"\.dcn\.(offset|mask)\.(weight|bias)$", key)
        if match is not None:
            dcn = model.get_submodule(key.rsplit(".", 2)[0])
            pairs = 2 if match.group(1) == "offset" else 1
            if dcn.remove_center and value.shape[0] == dcn.group * (dcn.points + 1) * pairs:
                out[key] = _centre_removed(value, dcn.group, dcn.points, pairs)
    for key, target in model_state.items():
        if re.search(r"\.gamma[12]$", key) and key not in out:
            block = model.get_submodule(key.rsplit(".", 1)[0])
            out[key] = torch.full(target.shape, float(block.layer_scale_init),
                                  dtype=target.dtype, device="cpu")
    return out


# ---------------------------------------------------------------------------------------------
# Registration


def _check_out_indices(out_indices: Any, levels: int) -> None:
    """A features_only ``out_indices`` that indexes the model's ``levels`` stages; ValueError
    otherwise (timm would fail later with a bare IndexError)."""
    if isinstance(out_indices, int) and not isinstance(out_indices, bool):
        if not 0 < out_indices <= levels:
            raise ValueError(
                f"out_indices as an int takes the last n of the model's {levels} stages, "
                f"so 1..{levels}, got {out_indices}")
        return
    indices = list(out_indices)
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int)
           or not -levels <= i < levels]
    if bad or not indices:
        raise ValueError(
            f"out_indices must index the model's {levels} stages (0..{levels - 1}, strides "
            f"4, 8, 16, 32), got {tuple(indices)}; DETR-style configs use (1, 2, 3, 4) for "
            f"ResNet's five levels (stem included): pass out_indices=(1, 2, 3) for the same "
            f"strides 8, 16, 32")


def _create_model(
    model_cls: type[InternImageBase], variant: str, pretrained: bool = False, **kwargs: Any
) -> InternImageBase:
    """timm's ``build_model_with_cfg`` for ``model_cls`` (:class:`InternImage` or
    :class:`~internimage.FlashInternImage`) with this package's checkpoint filter and
    feature config; a 22k tag loaded into a 1000-class model gets the 1k rows of its head."""
    if kwargs.get("features_only") and kwargs.get("out_indices") is not None:
        _check_out_indices(kwargs["out_indices"], len(kwargs.get("depths", (0,) * 4)))
    if pretrained and kwargs.get("num_classes") == IN1K_NUM_CLASSES:
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"),
                                     kwargs.get("pretrained_cfg_overlay"))
        if cfg.num_classes == IN22K_NUM_CLASSES:
            # A 22k tag loaded into a 1k model: the filter slices the head to the 1k rows, so
            # the weights timm loads are 1k weights; with the cfg's 21841 timm would drop them.
            kwargs["pretrained_cfg_overlay"] = dict(
                kwargs.get("pretrained_cfg_overlay") or {}, num_classes=IN1K_NUM_CLASSES)
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 1.0,  # the original evaluates Resize(img_size) + CenterCrop(img_size)
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        "license": "mit",
        "paper_ids": "arXiv:2211.05778",
        "paper_name": "InternImage: Exploring Large-Scale Vision Foundation Models with "
                      "Deformable Convolutions",
        "origin_url": "https://github.com/OpenGVLab/InternImage",
        **kwargs,
    }


_HUB = "OpenGVLab/InternImage"


def _hub(filename: str, size: int, stride: int = 32, hf_hub_id: str = _HUB,
         **kwargs: Any) -> dict[str, Any]:
    """The cfg of a released checkpoint ``filename`` on the hub repo ``hf_hub_id``, evaluated
    at ``size``; ``kwargs`` override :func:`_cfg`'s entries (FlashInternImage's paper)."""
    return _cfg(
        hf_hub_id=hf_hub_id, hf_hub_filename=filename, input_size=(3, size, size),
        pool_size=(size // stride, size // stride), **kwargs,
    )


_IN22K = dict(num_classes=21841)

default_cfgs = generate_default_cfgs({
    "internimage_t.in1k": _hub("internimage_t_1k_224.pth", 224),
    "internimage_s.in1k": _hub("internimage_s_1k_224.pth", 224),
    "internimage_b.in1k": _hub("internimage_b_1k_224.pth", 224),
    "internimage_l.in22k_ft_in1k_384": _hub("internimage_l_22kto1k_384.pth", 384),
    "internimage_l.in22k_384": _hub(
        "internimage_l_22k_192to384.pth", 384, notes=("ImageNet-22k, 192 then 384",), **_IN22K),
    "internimage_xl.in22k_ft_in1k_384": _hub("internimage_xl_22kto1k_384.pth", 384),
    "internimage_xl.in22k_384": _hub(
        "internimage_xl_22k_192to384.pth", 384, notes=("ImageNet-22k, 192 then 384",),
        **_IN22K),
    "internimage_h.in22k_ft_in1k_640": _hub("internimage_h_22kto1k_640.pth", 640, stride=16),
    "internimage_h.in22k_384": _hub(
        "internimage_h_jointto22k_384.pth", 384, stride=16,
        notes=("joint (public + private) pre-training, then ImageNet-22k",), **_IN22K),
    "internimage_h_meta.inat18_384": _hub(
        "internimage_h_22ktoinat18_384.pth", 384, stride=16, num_classes=INAT18_NUM_CLASSES,
        classifier=("head.fc", "meta_head.fc"),
        notes=("iNaturalist 2018 (from ImageNet-22k); takes optional metadata: "
               "model(x, temporal, spatial), see internimage.encode_inat_metadata",)),
    "internimage_g.in22k_ft_in1k_512": _hub("internimage_g_22kto1k_512.pth", 512, stride=16),
    "internimage_g.in22k_384": _hub(
        "internimage_g_pretrainto22k_384.pth", 384, stride=16,
        notes=("large-scale pre-training, then ImageNet-22k",), **_IN22K),
})

# Architectures of the released models (classification configs). Training-only settings
# (drop_path_rate, with_cp) are left to the caller; timm convention is drop_path_rate 0.
_VARIANTS: dict[str, dict[str, Any]] = {
    "t": dict(channels=64, depths=[4, 4, 18, 4], groups=[4, 8, 16, 32]),
    "s": dict(channels=80, depths=[4, 4, 21, 4], groups=[5, 10, 20, 40], layer_scale=1e-5,
              post_norm=True),
    "b": dict(channels=112, depths=[4, 4, 21, 4], groups=[7, 14, 28, 56], layer_scale=1e-5,
              post_norm=True),
    "l": dict(channels=160, depths=[5, 5, 22, 5], groups=[10, 20, 40, 80], layer_scale=1e-5,
              offset_scale=2.0, post_norm=True),
    "xl": dict(channels=192, depths=[5, 5, 24, 5], groups=[12, 24, 48, 96], layer_scale=1e-5,
               offset_scale=2.0, post_norm=True),
    "h": dict(channels=320, depths=[6, 6, 32, 6], groups=[10, 20, 40, 80], res_post_norm=True,
              dw_kernel_size=5, level2_post_norm=True,
              level2_post_norm_block_ids=[5, 11, 17, 23, 29], center_feature_scale=True,
              use_clip_projector=True),
    "g": dict(channels=512, depths=[2, 2, 48, 4], groups=[16, 32, 64, 128], post_norm=True,
              dw_kernel_size=5, level2_post_norm=True,
              level2_post_norm_block_ids=[5, 11, 17, 23, 29, 35, 41, 47],
              center_feature_scale=True, use_clip_projector=True),
}


# H with the iNaturalist metadata head (the original's intern_image_meta_former)
_VARIANTS["h_meta"] = dict(_VARIANTS["h"], meta_dim=64)


def _variant(name: str, pretrained: bool, kwargs: dict[str, Any]) -> InternImage:
    model_args = dict(_VARIANTS[name], drop_path_rate=0.0)
    return _create_model(InternImage, f"internimage_{name}", pretrained=pretrained,
                         **dict(model_args, **kwargs))


@register_model
def internimage_t(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-T (30M): C 64, depths 4-4-18-4, groups 4-8-16-32."""
    return _variant("t", pretrained, kwargs)


@register_model
def internimage_s(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-S (50M): C 80, depths 4-4-21-4, layer scale, post-norm."""
    return _variant("s", pretrained, kwargs)


@register_model
def internimage_b(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-B (97M): C 112, depths 4-4-21-4, layer scale, post-norm."""
    return _variant("b", pretrained, kwargs)


@register_model
def internimage_l(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-L (223M): C 160, depths 5-5-22-5, layer scale, post-norm, offset_scale 2."""
    return _variant("l", pretrained, kwargs)


@register_model
def internimage_xl(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-XL (335M): C 192, depths 5-5-24-5, layer scale, post-norm, offset_scale 2."""
    return _variant("xl", pretrained, kwargs)


@register_model
def internimage_h(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-H (1.08B): C 320, depths 6-6-32-6, gc 32, clip-projector head."""
    return _variant("h", pretrained, kwargs)


@register_model
def internimage_h_meta(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-H with the iNaturalist metadata head (meta_dim 64; the original's
    ``intern_image_meta_former``): ``model(x, temporal, spatial)``, metadata optional."""
    return _variant("h_meta", pretrained, kwargs)


@register_model
def internimage_g(pretrained: bool = False, **kwargs: Any) -> InternImage:
    """InternImage-G (3B): C 512, depths 2-2-48-4, gc 32, post-norm, clip-projector head."""
    return _variant("g", pretrained, kwargs)
