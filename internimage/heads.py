"""Classifier heads of InternImage and FlashInternImage: the conv head of T/S/B/L/XL and the
clip-projector head of H/G (stage fusion, attention pooling, norm, fc)."""

from __future__ import annotations

import torch
from timm.layers import SelectAdaptivePool2d
from torch import Tensor, nn

from internimage.dcnv3 import LN_EPS, get_act_layer

__all__ = ["ConvClassifierHead", "ClipFusion", "AttentionPool", "ClipClassifierHead"]

# Constants of the original clip-projector head (hard-coded there as well).
CLIP_EMBED_DIM = 1024
CLIP_NUM_HEADS = 16
CLIP_OUT_DIM = 768
CLIP_UPSAMPLE = 2


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
