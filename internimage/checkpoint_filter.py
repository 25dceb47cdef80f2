"""The original checkpoints' state-dict keys -> this package's layout, for both families:
:func:`checkpoint_filter_fn` (timm's ``pretrained_filter_fn``, also used by
:mod:`internimage.checkpoint`), the wrapper keys it looks under, and the ImageNet-22k -> 1k
head rows (:func:`imagenet22k_to_1k_indices`)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib import resources
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "WRAPPER_KEYS",
    "checkpoint_filter_fn",
    "imagenet22k_to_1k_indices",
    "unwrap_state_dict",
]

_logger = logging.getLogger("internimage")

IN1K_NUM_CLASSES = 1000
IN22K_NUM_CLASSES = 21841


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
WRAPPER_KEYS = ("model", "state_dict", "module")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.", "student.")


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    for _ in range(4):  # nested wrappers such as {'state_dict': {'model': ...}}
        for key in WRAPPER_KEYS:
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
    state_dict = _backbone_only(unwrap_state_dict(state_dict))
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
