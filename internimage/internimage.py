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

The network and the timm API live in :class:`~internimage.network.InternImageBase`
(``network.py``), which takes the blocks' token mixer as an argument: :class:`InternImage`
builds it with DCNv3, FlashInternImage (``flash_internimage.py``) with DCNv4. The heads are in
``heads.py``, the iNaturalist metadata head in ``metadata.py``, the original checkpoints' key
mapping (``checkpoint_filter_fn``, serving both families) in ``checkpoint_filter.py``.
"""

# No ``from __future__ import annotations``: see network.py (torch.fx and TorchScript).
from collections.abc import Sequence
from typing import Any

from timm.models import generate_default_cfgs, register_model
from torch import nn

from internimage.builder import build_model, hub_cfg
from internimage.checkpoint_filter import IN22K_NUM_CLASSES
from internimage.dcnv3 import CORE_OPS, DCNv3
from internimage.network import InternImageBase

__all__ = ["InternImage"]

INAT18_NUM_CLASSES = 8142


# ---------------------------------------------------------------------------------------------
# Model


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


# ---------------------------------------------------------------------------------------------
# Registration

_IN22K = dict(num_classes=IN22K_NUM_CLASSES)

default_cfgs = generate_default_cfgs({
    "internimage_t.in1k": hub_cfg("internimage_t_1k_224.pth", 224),
    "internimage_s.in1k": hub_cfg("internimage_s_1k_224.pth", 224),
    "internimage_b.in1k": hub_cfg("internimage_b_1k_224.pth", 224),
    "internimage_l.in22k_ft_in1k_384": hub_cfg("internimage_l_22kto1k_384.pth", 384),
    "internimage_l.in22k_384": hub_cfg(
        "internimage_l_22k_192to384.pth", 384, notes=("ImageNet-22k, 192 then 384",), **_IN22K),
    "internimage_xl.in22k_ft_in1k_384": hub_cfg("internimage_xl_22kto1k_384.pth", 384),
    "internimage_xl.in22k_384": hub_cfg(
        "internimage_xl_22k_192to384.pth", 384, notes=("ImageNet-22k, 192 then 384",),
        **_IN22K),
    "internimage_h.in22k_ft_in1k_640": hub_cfg("internimage_h_22kto1k_640.pth", 640, stride=16),
    "internimage_h.in22k_384": hub_cfg(
        "internimage_h_jointto22k_384.pth", 384, stride=16,
        notes=("joint (public + private) pre-training, then ImageNet-22k",), **_IN22K),
    "internimage_h_meta.inat18_384": hub_cfg(
        "internimage_h_22ktoinat18_384.pth", 384, stride=16, num_classes=INAT18_NUM_CLASSES,
        classifier=("head.fc", "meta_head.fc"),
        notes=("iNaturalist 2018 (from ImageNet-22k); takes optional metadata: "
               "model(x, temporal, spatial), see internimage.encode_inat_metadata",)),
    "internimage_g.in22k_ft_in1k_512": hub_cfg("internimage_g_22kto1k_512.pth", 512, stride=16),
    "internimage_g.in22k_384": hub_cfg(
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
    return build_model(InternImage, f"internimage_{name}", pretrained=pretrained,
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
