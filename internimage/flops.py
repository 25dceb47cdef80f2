"""FLOP and parameter counts, on the meta device (no memory, no compute: InternImage-G is
counted in seconds).

Counting uses :class:`torch.utils.flop_counter.FlopCounterMode`, which knows matmuls and
convolutions. Importing this module registers formulas for the DCNv3 and DCNv4 ops
(``torch.ops.internimage.dcnv3`` / ``dcnv4`` and their backwards), so the deformable sampling
is counted too (the two ops sample alike; DCNv4 reads its offsets and mask from one tensor):

* forward: per output element (``N * H_out * W_out * C``) and per sampling point ``P``, a
  bilinear interpolation (4 multiply-adds) and the mask weighting (1 multiply-add), i.e.
  ``5 * N * H_out * W_out * C * P`` MACs, ``10 * ...`` FLOPs (the original InternImage
  ``get_flops.py`` counts the same 5 MACs per point and channel);
* backward: twice the forward (gradients for the input, the offsets and the mask).

Like torch's counter (and fvcore), element-wise work (norms, activations, softmax) is not
counted. One multiply-add is 2 FLOPs; papers' "FLOPs" for InternImage (5G for T) are MACs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula

import internimage.ops  # noqa: F401  (loads the extension: registers torch.ops.internimage.*)

__all__ = ["dcnv3_flops", "count_flops", "count_params", "model_complexity"]

_MACS_PER_POINT_AND_CHANNEL = 5


def dcnv3_flops(out_shape: tuple[int, ...], kernel_size: tuple[int, int],
                remove_center: bool) -> int:
    """Forward FLOPs of one DCNv3 call producing ``out_shape`` ``(N, H_out, W_out, C)``."""
    n, height, width, channels = out_shape
    points = int(kernel_size[0]) * int(kernel_size[1]) - int(bool(remove_center))
    return 2 * _MACS_PER_POINT_AND_CHANNEL * n * height * width * channels * points


def _register() -> None:
    if not hasattr(torch.ops, "internimage") or not hasattr(torch.ops.internimage, "dcnv3"):
        return  # extension not built: the reference path's grid_sample is not counted

    forward_op = torch.ops.internimage.dcnv3
    backward_op = torch.ops.internimage._dcnv3_backward
    if forward_op not in flop_registry:

        @register_flop_formula(forward_op)
        def _dcnv3_forward(input_shape, offset_shape, mask_shape, kernel_size, stride, padding,
                           dilation, group, group_channels, offset_scale, remove_center, *,
                           out_shape=None, **kwargs) -> int:
            return dcnv3_flops(out_shape, kernel_size, remove_center)

    if backward_op not in flop_registry:

        @register_flop_formula(backward_op)
        def _dcnv3_backward(grad_shape, input_shape, offset_shape, mask_shape, kernel_size,
                            stride, padding, dilation, group, group_channels, offset_scale,
                            remove_center, *, out_shape=None, **kwargs) -> int:
            return 2 * dcnv3_flops(grad_shape, kernel_size, remove_center)

    if not hasattr(torch.ops.internimage, "dcnv4"):
        return
    dcnv4_op = torch.ops.internimage.dcnv4
    dcnv4_backward_op = torch.ops.internimage._dcnv4_backward
    if dcnv4_op not in flop_registry:

        @register_flop_formula(dcnv4_op)
        def _dcnv4_forward(input_shape, offset_mask_shape, kernel_size, stride, padding,
                           dilation, group, group_channels, offset_scale, remove_center=False,
                           *, out_shape=None, **kwargs) -> int:
            return dcnv3_flops(out_shape, kernel_size, remove_center)

    if dcnv4_backward_op not in flop_registry:

        @register_flop_formula(dcnv4_backward_op)
        def _dcnv4_backward(grad_shape, input_shape, offset_mask_shape, kernel_size, stride,
                            padding, dilation, group, group_channels, offset_scale,
                            remove_center, *, out_shape=None, **kwargs) -> int:
            return 2 * dcnv3_flops(grad_shape, kernel_size, remove_center)


_register()


def count_params(model: nn.Module) -> int:
    """Number of parameters (works for meta-device models)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: tuple[int, int, int], batch_size: int = 1,
                device: torch.device | str = "meta") -> dict[str, Any]:
    """Forward FLOPs of ``model`` (eval mode) for a ``(C, H, W)`` input.

    Returns ``{'flops': total, 'by_op': {op name: flops}}``. Run on a meta-device model for
    instant counts; the model's mode is restored. The forward runs with autograd enabled:
    inference-only fast paths (in-place ``addmm_`` fusions, which torch's counter does not
    count) are then skipped, so every matmul is counted; on the meta device this costs
    nothing.
    """
    was_training = model.training
    model.eval()
    try:
        x = torch.empty(batch_size, *input_size, device=device)
        with FlopCounterMode(display=False) as counter, torch.enable_grad():
            model(x)
    finally:
        model.train(was_training)
    by_op = {str(op): int(v) for op, v in counter.get_flop_counts().get("Global", {}).items()}
    return {"flops": int(counter.get_total_flops()), "by_op": by_op}


def model_complexity(name: str, input_size: tuple[int, int, int] | None = None,
                     **kwargs: Any) -> dict[str, Any]:
    """Parameters, FLOPs and MACs of a registered model built on the meta device.

    ``input_size`` defaults to the model's ``pretrained_cfg['input_size']``; ``kwargs`` go to
    ``timm.create_model`` (e.g. ``num_classes`` or ``pretrained_cfg`` for a tag).
    """
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, **kwargs)
    size = tuple(input_size or model.pretrained_cfg["input_size"])
    counted = count_flops(model, size)
    channels = [info["num_chs"] for info in getattr(model, "feature_info", [])]
    return {
        "model": name,
        "params": count_params(model),
        "flops": counted["flops"],
        "macs": counted["flops"] // 2,
        "flops_by_op": counted["by_op"],
        "input_size": list(size),
        "stage_channels": channels,
        "num_classes": getattr(model, "num_classes", None),
    }
