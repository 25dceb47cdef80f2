"""timm model building shared by InternImage and FlashInternImage: :func:`build_model` (timm's
``build_model_with_cfg`` with this package's checkpoint filter and feature config) and the
pretrained cfgs of released checkpoints (:func:`hub_cfg`)."""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from torch import nn

from internimage.checkpoint_filter import (
    IN1K_NUM_CLASSES,
    IN22K_NUM_CLASSES,
    checkpoint_filter_fn,
)

__all__ = ["base_cfg", "build_model", "check_out_indices", "hub_cfg"]


def check_out_indices(out_indices: Any, levels: int) -> None:
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


def build_model(
    model_cls: type[nn.Module], variant: str, pretrained: bool = False, **kwargs: Any
) -> nn.Module:
    """timm's ``build_model_with_cfg`` for ``model_cls`` (:class:`InternImage` or
    :class:`~internimage.FlashInternImage`) with this package's checkpoint filter and
    feature config; a 22k tag loaded into a 1000-class model gets the 1k rows of its head."""
    if kwargs.get("features_only") and kwargs.get("out_indices") is not None:
        check_out_indices(kwargs["out_indices"], len(kwargs.get("depths", (0,) * 4)))
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


def base_cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    """timm's pretrained cfg of an InternImage model at 224 (InternImage's paper; ``kwargs``
    override any entry)."""
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


def hub_cfg(filename: str, size: int, stride: int = 32, hf_hub_id: str = _HUB,
            **kwargs: Any) -> dict[str, Any]:
    """The cfg of a released checkpoint ``filename`` on the hub repo ``hf_hub_id``, evaluated
    at ``size``; ``kwargs`` override :func:`base_cfg`'s entries (FlashInternImage's paper)."""
    return base_cfg(
        hf_hub_id=hf_hub_id, hf_hub_filename=filename, input_size=(3, size, size),
        pool_size=(size // stride, size // stride), **kwargs,
    )
