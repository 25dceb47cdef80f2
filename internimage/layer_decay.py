"""Layer-wise learning-rate decay for an InternImage backbone inside a larger model.

``param_groups_layer_decay`` follows the original detection/segmentation configs'
``CustomLayerDecayOptimizerConstructor`` (mmcv 1.x), written for any framework: it returns
optimizer parameter groups with an ``lr_scale`` (read by timm's schedulers; multiply the base
LR yourself for a plain ``torch.optim`` optimizer) and a ``weight_decay``.

Layer ids, with ``L = sum(depths) + 2`` (original names in brackets):

* the stem (``patch_embed``): 0;
* block ``j`` of stage ``i``: ``1 + sum(depths[:i]) + j``;
* the downsampling layer between stages ``i`` and ``i + 1`` (the original's
  ``levels.i.downsample``, here ``stages.{i+1}.downsample``) and stage ``i``'s level norm
  (``levels.i.norm``): ``1 + sum(depths[:i+1])``, except the last stage's norm, which shares
  stage 2's id ``1 + sum(depths[:3])`` (a quirk of the original, kept);
* everything else, the neck and heads included (and, as in the original, which has no rule
  for them, the level-2 post norms of H/G): ``L - 1``.

The LR scale is ``rate ** (L - layer_id - 1)``, so the neck and heads train at the base LR.
No weight decay for 1-D parameters (norms, biases, layer scales), biases, and names
containing ``norm``, ``relative_position`` or ``sampling_offsets``, as in the original.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

__all__ = ["param_groups_layer_decay"]

# A stage's parameter, in a model (stages.2.blocks.5.x) or a timm feature extractor
# (stages_2.blocks.5.x): stage index, then the part of the stage and the rest.
_STAGE = re.compile(r"^stages[._](\d+)\.(blocks\.(\d+)|downsample|norm)\.?")
_NO_DECAY_WORDS = ("norm", "relative_position", "sampling_offsets")


def _layer_id(name: str, depths: list[int]) -> int | None:
    """The original rule's layer id of a backbone parameter ``name`` (without the prefix), or
    None for one it has no rule for (which then goes with the neck and heads)."""
    if name.startswith("stem."):
        return 0
    match = _STAGE.match(name)
    if match is None:
        return None
    stage = int(match.group(1))
    if match.group(3) is not None:  # blocks.j
        return 1 + sum(depths[:stage]) + int(match.group(3))
    if match.group(2) == "downsample":  # the original's levels.{stage-1}.downsample
        return 1 + sum(depths[:stage])
    return 1 + sum(depths[:min(stage, 2) + 1])  # the level norm; stage 3's shares stage 2's id


def _depths(names: list[str]) -> list[int]:
    """Blocks per stage, read off the parameter names (``stages.i.blocks.j``)."""
    depths: dict[int, int] = {}
    for name in names:
        match = _STAGE.match(name)
        if match is not None and match.group(3) is not None:
            stage = int(match.group(1))
            depths[stage] = max(depths.get(stage, 0), int(match.group(3)) + 1)
    return [depths.get(i, 0) for i in range(max(depths, default=-1) + 1)]


def param_groups_layer_decay(
    model: nn.Module,
    backbone_prefix: str = "backbone.",
    rate: float = 0.9,
    weight_decay: float = 0.05,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for ``model`` with layer-wise LR decay on its InternImage
    backbone, the parameters whose names start with ``backbone_prefix`` (see the module
    docstring for the rule).

    ``backbone_prefix`` may be ``""`` when ``model`` is the backbone itself (an ``InternImage``
    or a timm ``features_only`` model); the stage depths are read off the parameter names.
    Frozen parameters (``requires_grad=False``) are left out. Returns groups with keys
    ``params``, ``weight_decay``, ``lr_scale``, ``layer_id`` and ``param_names``, ordered by
    layer id. ValueError when no parameter has the prefix or ``rate`` is not in (0, 1].
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(backbone_prefix, str):
        raise TypeError(f"backbone_prefix must be a str, got {type(backbone_prefix).__name__}")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate <= 1:
        raise ValueError(f"rate must be a number in (0, 1], got {rate!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, int | float) or (
            weight_decay < 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    every = list(model.named_parameters())
    # the depths come from every backbone parameter, frozen ones included
    backbone = [n[len(backbone_prefix):] for n, _ in every if n.startswith(backbone_prefix)]
    if not backbone:
        raise ValueError(
            f"no parameter of the model starts with backbone_prefix={backbone_prefix!r}; its "
            f"first parameters are {[n for n, _ in every[:3]]}"
        )
    depths = _depths(backbone)
    named = [(n, p) for n, p in every if p.requires_grad]
    last = sum(depths) + 1  # L - 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in named:
        layer = None
        if name.startswith(backbone_prefix):
            layer = _layer_id(name[len(backbone_prefix):], depths)
        layer = last if layer is None else layer
        no_decay = (param.ndim <= 1 or name.endswith(".bias")
                    or any(word in name for word in _NO_DECAY_WORDS))
        group = groups.setdefault((layer, no_decay), {
            "params": [], "param_names": [], "layer_id": layer,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": rate ** (last - layer),
        })
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]
