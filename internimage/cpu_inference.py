"""Fused CPU kernels for float32 inference: oneDNN linear(+GELU), the fused offset branch.

In eager float32 inference on CPU, ``F.linear`` (MKL ``addmm``) first copies the bias into the
output and GELU then makes another pass over it; oneDNN's linear primitive adds the bias and
applies GELU while the output tile is still in cache, and it is markedly faster for the
few-row matrices of the last stage at batch 1. :func:`linear` takes that path only when it
cannot change anything observable except float rounding (same math; outputs match ``F.linear``
to float32 rounding, ~1e-6 relative):

* the input is a float32 CPU tensor, autograd is off (``torch.no_grad`` / ``inference_mode``)
  and CPU autocast is off, and
* the code is running eagerly: not under ``torch.compile`` / ``torch.export`` (Inductor fuses
  on its own, and exported graphs must hold standard ops), ``torch.jit`` tracing or scripting,
  or ``torch.fx`` symbolic tracing.

Convolutions (stem, downsampling, conv head) are :class:`PackedWeightConv2d`: on channels_last
input they run oneDNN's convolution with the weight reordered once into oneDNN's blocked
layout and cached (about 8 MB for InternImage-T), instead of reordering it on every call,
which for the last downsampling (7x7 output) cost more than the convolution itself.

The DCNv3 offset branch ``GELU(LayerNorm(depthwise_conv(x)))`` likewise runs as one pass,
``torch.ops.internimage._dwconv_layernorm_gelu`` (:func:`dwconv_layernorm_gelu`), instead of
three passes and oneDNN's per-call depthwise-convolution setup, and the mask softmax runs
inside the DCNv3 kernel, ``torch.ops.internimage._dcnv3_mask_logits``
(:func:`dcnv3_mask_logits`), instead of a softmax pass and a transposing copy. An eval-mode
``InternImageBlock`` runs all of it, with its LayerNorms and residuals, as one call,
``torch.ops.internimage._block_cpu_inference`` (:func:`block_cpu_inference`).

Everything else (training, float64, bfloat16, autocast, CUDA) runs ``F.linear`` + activation.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from internimage import ops as _ops

__all__ = [
    "linear",
    "dwconv_layernorm_gelu",
    "dcnv3_mask_logits",
    "offset_branch_fusable",
    "offset_branch_core",
    "mask_logits_core",
    "onednn_linear",
    "block_cpu_inference",
    "fast_getattr",
    "fused_cpu_inference",
    "PackedWeightConv2d",
    "set_fused_cpu_inference",
    "unfused",
]

_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if (
    torch.backends.mkldnn.is_available()
) else None
_ONEDNN_CONV = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if (
    torch.backends.mkldnn.is_available()
) else None
_enabled = True


def set_fused_cpu_inference(enabled: bool) -> None:
    """Turns the fused CPU inference kernels on (default) or off, e.g. to compare timings."""
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _enabled = enabled


@contextlib.contextmanager
def unfused() -> Iterator[None]:
    """Runs the plain modules inside the block (e.g. to compare with a traced graph, which
    always holds them); restores the previous setting on exit."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


@torch.jit.unused
def fused_cpu_inference(x: Tensor) -> bool:
    """Whether the fused float32 CPU inference kernels apply to activations ``x``."""
    return (
        _enabled
        and _ONEDNN_LINEAR is not None
        and type(x) is Tensor  # not an fx Proxy or a tensor subclass
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


@torch.jit.unused
def _onednn_linear(x: Tensor, layer: nn.Linear, act: str) -> Tensor:
    return _ONEDNN_LINEAR(x, layer.weight, layer.bias, act, [], "none" if act == "gelu" else "")


def linear(x: Tensor, layer: nn.Linear, gelu: bool = False) -> Tensor:
    """``layer(x)``, followed by exact (erf) GELU when ``gelu``; ``x`` ``(..., in_features)``.

    Runs oneDNN's fused linear(+GELU) when :func:`fused_cpu_inference` allows it."""
    if not torch.jit.is_scripting() and fused_cpu_inference(x):
        return _onednn_linear(x, layer, "gelu" if gelu else "none")
    x = layer(x)
    return F.gelu(x) if gelu else x


# Without the compiled extension the unfused modules run instead.
_FUSED_BRANCH = (
    torch.ops.internimage._dwconv_layernorm_gelu.default if _ops.extension_available() else None
)
_MASK_LOGITS_CORE = (
    torch.ops.internimage._dcnv3_mask_logits.default if _ops.extension_available() else None
)
_BLOCK = (
    torch.ops.internimage._block_cpu_inference.default if _ops.extension_available() else None
)


def offset_branch_fusable(conv: nn.Conv2d, norm: nn.Module) -> bool:
    """Whether ``GELU(norm(conv(x)))`` fits the fused kernel: ``conv`` a depthwise, stride-1,
    'same'-padded odd square kernel and ``norm`` a LayerNorm over C with weight and bias."""
    k = conv.kernel_size[0]
    return (
        _FUSED_BRANCH is not None
        and conv.groups == conv.in_channels == conv.out_channels
        and conv.kernel_size == (k, k) and k % 2 == 1
        and conv.stride == (1, 1) and conv.dilation == (1, 1)
        and conv.padding == (k // 2, k // 2) and conv.padding_mode == "zeros"
        and getattr(norm, "weight", None) is not None and getattr(norm, "bias", None) is not None
    )


def dwconv_layernorm_gelu(
    x: Tensor, conv: nn.Conv2d, norm: nn.LayerNorm
) -> Tensor | None:
    """``GELU(norm(conv(x)))`` for an NHWC ``x`` ``(N, H, W, C)`` in one fused pass, or None
    when the fused kernel does not apply (see the module docstring and
    :func:`offset_branch_fusable`)."""
    if torch.jit.is_scripting() or not fused_cpu_inference(x):
        return None
    if not offset_branch_fusable(conv, norm) or conv.in_channels != x.shape[-1]:
        return None
    return offset_branch_core(x, conv, norm)


@torch.jit.unused
def offset_branch_core(x: Tensor, conv: nn.Conv2d, norm: nn.LayerNorm) -> Tensor:
    """:func:`dwconv_layernorm_gelu` without the eligibility checks (the caller has made
    them with :func:`fused_cpu_inference` and :func:`offset_branch_fusable`)."""
    return _FUSED_BRANCH(x, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps)


def dcnv3_mask_logits(value: Tensor, x1: Tensor, dcn: nn.Module) -> Tensor | None:
    """The core of DCNv3 module ``dcn`` with its offset and mask projections: the offsets
    ``dcn.offset(x1)`` and the mask logits ``dcn.mask(x1)`` ``(N, H, W, G*P)`` go straight into
    ``torch.ops.internimage._dcnv3_mask_logits``, which applies the softmax over each group's P
    points itself. ``value`` and ``x1`` are NHWC ``(N, H, W, C)``. None when the fused kernel
    does not apply (see the module docstring)."""
    if torch.jit.is_scripting() or _MASK_LOGITS_CORE is None or not fused_cpu_inference(value):
        return None
    return mask_logits_core(value, x1, dcn)


@torch.jit.unused
def mask_logits_core(value: Tensor, x1: Tensor, dcn: nn.Module) -> Tensor:
    """:func:`dcnv3_mask_logits` without the eligibility check (the caller has made it)."""
    k, s, p, d = dcn.kernel_size, dcn.stride, dcn.pad, dcn.dilation
    return _MASK_LOGITS_CORE(
        value, _onednn_linear(x1, dcn.offset, "none"), _onednn_linear(x1, dcn.mask, "none"),
        [k, k], [s, s], [p, p], [d, d], dcn.group, dcn.group_channels, dcn.offset_scale,
        dcn.remove_center,
    )


@torch.jit.unused
def fast_getattr(module: nn.Module, name: str) -> Any:
    """``getattr(module, name)``, reading a parameter or submodule straight from nn.Module's
    registries: ``Module.__getattr__`` costs about a microsecond a call, and a block's
    arguments take some thirty lookups per forward (anything else, e.g. a parametrized
    weight, goes through ``getattr``)."""
    parameters, modules = module._parameters, module._modules
    if name in parameters:
        return parameters[name]
    if name in modules:
        return modules[name]
    return getattr(module, name)


@torch.jit.unused
def block_cpu_inference(
    x: Tensor, norms: list[Tensor | None], norm_eps: list[float], gamma1: Tensor | None,
    gamma2: Tensor | None, dcn: nn.Module, mlp: nn.Module,
) -> Tensor | None:
    """One InternImage block on NHWC ``x`` ``(N, H, W, C)`` in a single call,
    ``torch.ops.internimage._block_cpu_inference``, or None without the compiled extension.

    The caller (``InternImageBlock``) has checked :func:`fused_cpu_inference`, that ``dcn``
    (a ``DCNv3``) passes ``fused_kernels_apply()`` and that ``mlp``'s activation is exact
    GELU. ``norms`` holds the weight/bias pairs of the LayerNorms before and after the mixer,
    then before and after the MLP (None, None where there is none), ``norm_eps`` their eps."""
    if _BLOCK is None:
        return None
    dcn_params = []
    for name in ("input_proj", "dw_conv", "dw_norm", "offset", "mask", "output_proj"):
        layer = fast_getattr(dcn, name)
        dcn_params += (fast_getattr(layer, "weight"), fast_getattr(layer, "bias"))
    dcn_params += (fast_getattr(dcn, "center_feature_scale_proj_weight"),
                   fast_getattr(dcn, "center_feature_scale_proj_bias"))
    geometry = [dcn.kernel_size, dcn.stride, dcn.pad, dcn.dilation, dcn.group,
                dcn.group_channels, int(dcn.remove_center)]
    mlp_params = []
    for name in ("fc1", "fc2"):
        layer = fast_getattr(mlp, name)
        mlp_params += (fast_getattr(layer, "weight"), fast_getattr(layer, "bias"))
    branch_eps = fast_getattr(dcn, "dw_norm").eps
    return _BLOCK(x, norms, norm_eps, gamma1, gamma2, dcn_params, branch_eps, geometry,
                  dcn.offset_scale, mlp_params)


@torch.jit.unused
def onednn_linear(x: Tensor, layer: nn.Linear, gelu: bool = False) -> Tensor:
    """:func:`linear` on the oneDNN path without the eligibility check (the caller has made
    it with :func:`fused_cpu_inference`)."""
    return _onednn_linear(x, layer, "gelu" if gelu else "none")


# conv -> (weak reference to the weight it was packed from, (data_ptr, version), packed weight)
_packed_conv_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.jit.unused
def _packed_weight(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv.weight`` in oneDNN's blocked layout, reordered on first use and again whenever
    the weight is replaced or changed in place (its version counter moves)."""
    weight = conv.weight
    key = (weight.data_ptr(), weight._version)
    cached = _packed_conv_weights.get(conv)
    if cached is None or cached[0]() is not weight or cached[1] != key:
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.detach().to_mkldnn(), list(conv.padding), list(conv.stride),
            list(conv.dilation), conv.groups, list(x.shape),
        )
        cached = (weakref.ref(weight), key, packed)
        _packed_conv_weights[conv] = cached
    return cached[2]


class PackedWeightConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state dict) whose float32 CPU inference on
    channels_last ``(N, C, H, W)`` input runs oneDNN with a cached, prepacked weight (see the
    module docstring); the same result as ``nn.Conv2d`` (bit-identical on the development
    machine). Everything else runs ``nn.Conv2d``."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # TorchScript skips this block
            if self._packed_path_applies(x):
                return self._forward_packed(x)
        return self._conv_forward(x, self.weight, self.bias)

    @torch.jit.unused
    def _packed_path_applies(self, x: Tensor) -> bool:
        weight = self.weight
        return (
            _ONEDNN_CONV is not None and fused_cpu_inference(x) and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last)
            and self.padding_mode == "zeros" and not isinstance(self.padding, str)
            and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and not weight.is_inference()
        )

    @torch.jit.unused
    def _forward_packed(self, x: Tensor) -> Tensor:
        return _ONEDNN_CONV(
            x, _packed_weight(self, x), self.bias, list(self.padding), list(self.stride),
            list(self.dilation), self.groups, "none", [], "",
        )
