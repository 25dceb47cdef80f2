"""FlashInternImage (CVPR 2024) as a timm model family, numerically identical to the original.

Paper: "Efficient Deformable ConvNets: Rethinking Dynamic and Sparse Operator for Vision
Applications", https://arxiv.org/abs/2401.06197. Original code and weights:
https://github.com/OpenGVLab/DCNv4 (MIT).

FlashInternImage is InternImage with the DCNv4 operator, so this file only holds what
differs; the layers, the network and the timm API are :mod:`internimage.network`'s
(:class:`~internimage.network.InternImageBase`):

* every block's token mixer is :class:`~internimage.DCNv4`: values ``value_proj(x)``, one
  packed offset/mask projection of the block input (through a depthwise conv only with
  ``dw_kernel_size``; no norm, no activation), a raw mask (no softmax), and an
  ``output_proj`` bias only with ``dcn_output_bias``;
* the MLP's ``fc2`` has a bias only with ``mlp_fc2_bias``;
* the constructor's ``offset_scale`` default is 0.5 (every released config sets it);
* no clip-projector head (the original's crashes, and no released model has one) and no
  metadata head.

Layout and state-dict keys are InternImage's (``stem``, ``stages.i.{downsample, blocks,
norm}``, ``head``), the DCN modules' keys the original DCNv4 module's;
:func:`internimage.checkpoint_filter_fn` maps the original keys (``patch_embed``,
``levels``, ``conv_head``, ...) for both families.
"""

# No ``from __future__ import annotations``: see network.py (torch.fx and TorchScript).
from collections.abc import Sequence
from typing import Any

from timm.models import generate_default_cfgs, register_model
from torch import Tensor, nn

from internimage.builder import build_model, hub_cfg
from internimage.dcnv4 import DCNV4_CORE_OPS, DCNv4
from internimage.network import InternImageBase

__all__ = ["FlashInternImage"]


# ---------------------------------------------------------------------------------------------
# Model


class FlashInternImage(InternImageBase):
    """FlashInternImage with the original constructor's keywords plus timm's.

    Original keywords (defaults as in the original ``FlashInternImage.__init__``):
    ``core_op`` ('DCNv4' compiled kernels or 'DCNv4_pytorch' reference), ``channels``,
    ``depths``, ``groups``, ``num_classes``, ``mlp_ratio``, ``drop_rate``, ``drop_path_rate``,
    ``drop_path_type``, ``act_layer``, ``norm_layer`` (stem, downsampling layers), ``layer_scale``,
    ``offset_scale``, ``post_norm``, ``cls_scale``, ``with_cp``, ``mlp_fc2_bias``,
    ``dcn_output_bias``, ``dw_kernel_size`` (None: no depthwise conv before the offset/mask
    projection), ``use_clip_projector`` (False only: the original's clip head fails on its
    own maps), ``level2_post_norm``, ``level2_post_norm_block_ids``, ``res_post_norm`` and
    ``center_feature_scale``. As in the original, ``center_feature_scale`` never reaches the
    DCNv4 modules: with ``post_norm`` it only keeps the level norms. The original swallows
    any other keyword (``remove_center`` among them) without effect; here they raise
    ``TypeError``, as timm requires.

    timm keywords: ``in_chans``, ``global_pool``, ``head_drop_rate``, ``output_stride`` (32,
    16 or 8: the later stages keep the resolution with dilated DCNv4 sampling grids and
    depthwise convs), ``frozen_stages``, ``device``, ``dtype`` (see
    :class:`~internimage.InternImage`).

    Input ``(N, in_chans, H, W)``; ``forward_features`` returns the NCHW map
    ``(N, 8C, H/32, W/32)`` (``num_features = 8C``), ``forward_head(pre_logits=True)`` the
    original ``forward_features`` vector ``(N, int(8C * cls_scale))``, ``forward`` the logits.
    """

    def __init__(
        self,
        core_op: str = "DCNv4",
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
        offset_scale: float = 0.5,
        post_norm: bool = False,
        cls_scale: float = 1.5,
        with_cp: bool = False,
        mlp_fc2_bias: bool = False,
        dcn_output_bias: bool = False,
        dw_kernel_size: int | None = None,
        use_clip_projector: bool = False,
        level2_post_norm: bool = False,
        level2_post_norm_block_ids: Sequence[int] | None = None,
        res_post_norm: bool = False,
        center_feature_scale: bool = False,
        in_chans: int = 3,
        global_pool: str | None = None,
        output_stride: int = 32,
        frozen_stages: int = -1,
        head_drop_rate: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        if core_op not in DCNV4_CORE_OPS:
            raise ValueError(f"core_op must be one of {list(DCNV4_CORE_OPS)}, got {core_op!r}")
        for name, flag in (("mlp_fc2_bias", mlp_fc2_bias), ("dcn_output_bias", dcn_output_bias),
                           ("use_clip_projector", use_clip_projector)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        if use_clip_projector:
            raise ValueError(
                "use_clip_projector=True is not supported by FlashInternImage: the original's "
                "clip head permutes its NCHW stage maps a second time and fails, and no "
                "released model uses it; use internimage.InternImage for the H/G clip head"
            )
        super().__init__(
            dcn_layer=DCNv4,
            dcn_kwargs=dict(output_bias=dcn_output_bias, core_op=core_op),
            core_op=core_op, channels=channels, depths=depths, groups=groups,
            num_classes=num_classes, mlp_ratio=mlp_ratio, drop_rate=drop_rate,
            drop_path_rate=drop_path_rate, drop_path_type=drop_path_type, act_layer=act_layer,
            norm_layer=norm_layer, layer_scale=layer_scale, offset_scale=offset_scale,
            post_norm=post_norm, cls_scale=cls_scale, with_cp=with_cp,
            mlp_fc2_bias=mlp_fc2_bias, dw_kernel_size=dw_kernel_size,
            use_clip_projector=False, level2_post_norm=level2_post_norm,
            level2_post_norm_block_ids=level2_post_norm_block_ids, res_post_norm=res_post_norm,
            center_feature_scale=center_feature_scale, meta_dim=None, in_chans=in_chans,
            global_pool=global_pool, output_stride=output_stride, frozen_stages=frozen_stages,
            head_drop_rate=head_drop_rate, device=device, dtype=dtype,
        )

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """``forward_features`` map -> logits ``(N, num_classes)``; ``pre_logits``: the pooled
        vector ``(N, head_hidden_size)`` (4-D maps with ``global_pool=''``)."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_chans, H, W)`` images -> logits."""
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------
# Registration

# The released classification checkpoints (the DCNv4 README's links); L's file name is spelled
# without the underscore its config name has.
_DCNV4_PAPER = dict(
    hf_hub_id="OpenGVLab/DCNv4",
    paper_ids="arXiv:2401.06197",
    paper_name="Efficient Deformable ConvNets: Rethinking Dynamic and Sparse Operator for "
               "Vision Applications",
    origin_url="https://github.com/OpenGVLab/DCNv4",
)

default_cfgs = generate_default_cfgs({
    "flash_internimage_t.in1k": hub_cfg("flash_intern_image_t_1k_224.pth", 224, **_DCNV4_PAPER),
    "flash_internimage_s.in1k": hub_cfg("flash_intern_image_s_1k_224.pth", 224, **_DCNV4_PAPER),
    "flash_internimage_b.in1k": hub_cfg("flash_intern_image_b_1k_224.pth", 224, **_DCNV4_PAPER),
    "flash_internimage_l.in22k_ft_in1k_384": hub_cfg(
        "flash_internimage_l_22kto1k_384.pth", 384, **_DCNV4_PAPER),
})

# Architectures of the released models (classification configs
# flash_intern_image_{t,s,b}_1k_224 and flash_intern_image_l_22kto1k_384). Training-only
# settings (drop_path_rate, with_cp) are left to the caller, as for InternImage.
_VARIANTS: dict[str, dict[str, Any]] = {
    "t": dict(channels=64, depths=[4, 4, 18, 4], groups=[4, 8, 16, 32], offset_scale=1.0),
    "s": dict(channels=80, depths=[4, 4, 21, 4], groups=[5, 10, 20, 40], layer_scale=1e-5,
              offset_scale=1.0, post_norm=True, dw_kernel_size=3),
    "b": dict(channels=112, depths=[4, 4, 21, 4], groups=[7, 14, 28, 56], layer_scale=1e-5,
              offset_scale=0.5, post_norm=True, dw_kernel_size=3),
    "l": dict(channels=160, depths=[5, 5, 22, 5], groups=[10, 20, 40, 80], layer_scale=1e-5,
              offset_scale=2.0, post_norm=True, dw_kernel_size=3, dcn_output_bias=True,
              mlp_fc2_bias=True),
}


def _variant(name: str, pretrained: bool, kwargs: dict[str, Any]) -> FlashInternImage:
    model_args = dict(_VARIANTS[name], drop_path_rate=0.0)
    return build_model(FlashInternImage, f"flash_internimage_{name}", pretrained=pretrained,
                         **dict(model_args, **kwargs))


@register_model
def flash_internimage_t(pretrained: bool = False, **kwargs: Any) -> FlashInternImage:
    """FlashInternImage-T (30M): C 64, depths 4-4-18-4, groups 4-8-16-32."""
    return _variant("t", pretrained, kwargs)


@register_model
def flash_internimage_s(pretrained: bool = False, **kwargs: Any) -> FlashInternImage:
    """FlashInternImage-S (50M): C 80, depths 4-4-21-4, layer scale, post-norm, dw conv 3."""
    return _variant("s", pretrained, kwargs)


@register_model
def flash_internimage_b(pretrained: bool = False, **kwargs: Any) -> FlashInternImage:
    """FlashInternImage-B (97M): C 112, depths 4-4-21-4, layer scale, post-norm, dw conv 3,
    offset_scale 0.5."""
    return _variant("b", pretrained, kwargs)


@register_model
def flash_internimage_l(pretrained: bool = False, **kwargs: Any) -> FlashInternImage:
    """FlashInternImage-L (223M): C 160, depths 5-5-22-5, layer scale, post-norm, dw conv 3,
    offset_scale 2, DCN output and MLP fc2 biases."""
    return _variant("l", pretrained, kwargs)
