"""``optimize_for_inference``: the explicit, opt-in transform to fused float32 CPU kernels.

A model built by this package runs one program: every module calls its submodules, in every
mode, so hooks, swapped submodules, autograd, TorchScript, torch.fx and torch.compile all see
the same computation. Faster CPU inference is a separate, explicit step, in the spirit of
timm's ``reparameterize_model`` and torchvision's ``fuse_model``::

    model = internimage.optimize_for_inference(model)   # a new model; the argument is kept
    model = torch.compile(model)                        # optional, and fastest (freezing on)

It returns an eval-mode copy whose DCNv3 modules are :class:`InferenceDCNv3`: the offset
branch ``GELU(LayerNorm(depthwise_conv(x)))`` runs as one pass and the mask softmax runs
inside the DCNv3 kernel, two fused CPU ops that torch.compile keeps (they have fake kernels).
State-dict keys and parameters are unchanged, and outputs match the plain model to float32
rounding. What it gives up:

* training: parameters are frozen (``requires_grad=False``) and the fused ops have no
  backward, so an input that requires grad raises;
* hooks inside the fused offset branch: ``dcn.dw_conv``, ``dcn.dw_norm`` and ``dcn.dw_act``
  are no longer called as modules (the projections ``input_proj``, ``offset``, ``mask``,
  ``output_proj``, and every other module, still are);
* other dtypes and devices: :class:`InferenceDCNv3` takes float32 CPU tensors and raises
  ValueError for anything else (use the model before the transform).

Which fused kernels it uses was measured (docs/benchmarks.md): only those that make the
fastest path faster by 3 % or more. The transform is idempotent, and applies to every variant,
``features_only`` models and the clip head; DCNv3 modules it has no kernel for (a BatchNorm or
non-GELU offset branch, ``core_op='DCNv3_pytorch'``) are left as they are.

FlashInternImage's :class:`~internimage.DCNv4` modules are left as they are too: their offset
branch has no norm or activation and their mask no softmax, so there is nothing for these
kernels to fuse. For a FlashInternImage model the transform only returns the eval-mode,
frozen copy (outputs bit-identical to the model's); ``torch.compile`` is its faster path.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from internimage import ops as _ops
from internimage.dcnv3 import DCNv3, LayerNormNCHW

__all__ = ["optimize_for_inference", "InferenceDCNv3"]


def _check_input(x: Tensor, module: nn.Module) -> None:
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(
            f"{type(module).__name__} (from internimage.optimize_for_inference) runs float32 "
            f"CPU tensors, got {x.dtype} on {x.device}: use the model before the transform "
            "for other dtypes and devices"
        )
    if x.requires_grad:
        raise ValueError(
            f"{type(module).__name__} (from internimage.optimize_for_inference) is "
            "inference-only and has no backward, got an input that requires grad: use the "
            "model before the transform to train or take gradients"
        )


class InferenceDCNv3(nn.Module):
    """:class:`~internimage.DCNv3` for float32 CPU inference, NHWC ``(N, H, W, C)`` in and out.

    The same parameters (shared with the module it was made from) and state-dict keys. The
    offset branch ``dw_act(dw_norm(dw_conv(x)))`` runs as one pass
    (``torch.ops.internimage._dwconv_layernorm_gelu``) and the softmax of the mask logits
    ``mask(x1)`` runs inside the core (``torch.ops.internimage._dcnv3_mask_logits``); the
    projections are called as modules. Made by :func:`optimize_for_inference` for modules
    with a LayerNorm + exact-GELU offset branch and the compiled core.
    """

    def __init__(self, dcn: DCNv3) -> None:
        super().__init__()
        for name in ("dw_conv", "dw_norm", "dw_act", "offset", "mask", "input_proj",
                     "output_proj"):
            setattr(self, name, getattr(dcn, name))
        self.center_feature_scale_proj_weight = dcn.center_feature_scale_proj_weight
        self.center_feature_scale_proj_bias = dcn.center_feature_scale_proj_bias
        for name in ("channels", "kernel_size", "pad", "dilation", "group", "group_channels",
                     "offset_scale", "remove_center", "points", "core_op"):
            setattr(self, name, getattr(dcn, name))

    @staticmethod
    def applies_to(dcn: nn.Module) -> bool:
        """Whether ``dcn`` is a DCNv3 the fused kernels reproduce."""
        conv = getattr(dcn, "dw_conv", None)
        return (
            type(dcn) is DCNv3 and dcn.core_op == "DCNv3"
            and type(dcn.dw_norm) is LayerNormNCHW and dcn.dw_norm.weight is not None
            and dcn.dw_norm.bias is not None
            and type(dcn.dw_act) is nn.GELU and dcn.dw_act.approximate == "none"
            and type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
            and conv.stride == (1, 1) and conv.dilation == (1, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self)
        value = self.input_proj(x)
        conv, norm = self.dw_conv, self.dw_norm
        x1 = torch.ops.internimage._dwconv_layernorm_gelu(
            x, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps
        )
        k, p, d = self.kernel_size, self.pad, self.dilation
        y = torch.ops.internimage._dcnv3_mask_logits(
            value, self.offset(x1), self.mask(x1), [k, k], [1, 1], [p, p], [d, d], self.group,
            self.group_channels, self.offset_scale, self.remove_center,
        )
        if self.center_feature_scale_proj_weight is not None:
            scale = torch.sigmoid(F.linear(
                x1, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias
            )).unsqueeze(-1)
            groups = (self.group, self.group_channels)
            y = (y.unflatten(-1, groups) * (1 - scale)
                 + value.unflatten(-1, groups) * scale).flatten(-2)
        return self.output_proj(y)


def _replace_modules(
    module: nn.Module, convert: Callable[[nn.Module], nn.Module | None]
) -> None:
    """Replaces every submodule ``m`` of ``module`` for which ``convert(m)`` is not None; the
    submodules of fused modules are left alone (their kernels do not call them)."""
    for name, child in list(module.named_children()):
        new = convert(child)
        if new is not None:
            setattr(module, name, new)
        elif not isinstance(child, InferenceDCNv3):
            _replace_modules(child, convert)


def optimize_for_inference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An eval-mode model whose modules run fused float32 CPU inference kernels.

    See the module docstring for what the transform does and gives up. ``model`` is deep-copied
    first unless ``inplace``. Without the compiled extension (``internimage.ops
    .extension_available()`` is False) there are no kernels: the copy is returned in eval
    mode, with a warning.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    model.eval().requires_grad_(False)
    if not _ops.extension_available():
        warnings.warn(
            "internimage.optimize_for_inference: no fused kernels without the compiled "
            f"extension ({_ops.extension_error()}); the model is returned unchanged (in eval "
            "mode)",
            RuntimeWarning,
            stacklevel=2,
        )
        return model
    _replace_modules(model, lambda m: InferenceDCNv3(m) if InferenceDCNv3.applies_to(m)
                     else None)
    return model
