"""internimage.optimize_for_inference: the explicit transform to fused float32 CPU kernels
(same outputs as the plain model, idempotent, every variant, features_only, what it refuses),
and the two fused ops it uses: the offset branch (dwconv + LayerNorm + GELU) and the DCNv3
core taking mask logits (softmax inside)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from internimage import DCNv3, DCNv4, InternImage, optimize_for_inference
from internimage.inference import InferenceDCNv3

OP = torch.ops.internimage._dwconv_layernorm_gelu
MASK_LOGITS_OP = torch.ops.internimage._dcnv3_mask_logits


def reference_branch(x, conv, norm):
    y = F.conv2d(x.permute(0, 3, 1, 2), conv.weight, conv.bias, padding=conv.padding,
                 groups=conv.groups).permute(0, 2, 3, 1)
    return F.gelu(F.layer_norm(y, norm.normalized_shape, norm.weight, norm.bias, norm.eps))


@pytest.mark.parametrize("channels, kernel, bias", [(64, 3, True), (40, 3, True),
                                                    (200, 5, False), (7, 1, True)])
@pytest.mark.parametrize("size", [(1, 5), (6, 7)])
def test_fused_branch_matches_float64(channels, kernel, bias, size) -> None:
    torch.manual_seed(channels + kernel)
    conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels, bias=bias)
    norm = nn.LayerNorm(channels, eps=1e-6)
    nn.init.normal_(norm.weight, 1.0, 2.0)  # wide LN outputs exercise GELU's tails
    nn.init.normal_(norm.bias, 0.0, 2.0)
    x = torch.randn(2, *size, channels)
    with torch.no_grad():
        fused = OP(x, conv.weight, conv.bias, norm.weight, norm.bias, norm.eps)
        unfused = reference_branch(x, conv, norm)
        expected = reference_branch(x.double(), copy.deepcopy(conv).double(),
                                    copy.deepcopy(norm).double())
    assert fused.shape == x.shape and fused.dtype == torch.float32
    fused_error = (fused.double() - expected).abs().max().item()
    unfused_error = (unfused.double() - expected).abs().max().item()
    # as close to the float64 result as PyTorch's own float32 modules are (within 2x + 1e-6)
    assert fused_error <= 2 * unfused_error + 1e-6, (fused_error, unfused_error)


def test_fused_branch_gelu_tails() -> None:
    """With gamma = 0 every channel is GELU(beta): the op's GELU over [-30, 30]."""
    beta = torch.linspace(-30, 30, 6001)
    channels = beta.numel()
    x = torch.randn(1, 2, 3, channels)
    out = OP(x, torch.randn(channels, 1, 3, 3), None, torch.zeros(channels), beta, 1e-6)
    expected = F.gelu(beta.double()).expand(1, 2, 3, channels)
    error = (out.double() - expected).abs() / (1 + beta.double().abs())
    assert error.max().item() < 2e-7


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x, w: (x[0], w), "must be 4-D"),
        (lambda x, w: (x.double(), w), "input must be float32"),
        (lambda x, w: (x, w[:, :, :2, :2]), "conv_weight must have shape"),
        (lambda x, w: (x, w[:3]), "conv_weight must have shape"),
    ],
)
def test_fused_branch_errors(make, message) -> None:
    x, weight = torch.randn(1, 4, 4, 8), torch.randn(8, 1, 3, 3)
    x, weight = make(x, weight)
    with pytest.raises(RuntimeError, match=message):
        OP(x, weight, None, torch.ones(8), torch.zeros(8), 1e-6)
    with pytest.raises(RuntimeError, match="norm_weight must have shape"):
        OP(torch.randn(1, 4, 4, 8), torch.randn(8, 1, 3, 3), None, torch.ones(4),
           torch.zeros(8), 1e-6)


def test_fused_branch_opcheck() -> None:
    args = (torch.randn(2, 5, 6, 16), torch.randn(16, 1, 3, 3), torch.randn(16),
            torch.rand(16) + 0.5, torch.randn(16), 1e-6)
    torch.library.opcheck(OP, args, test_utils=("test_schema", "test_faketensor"))


def group_softmax(logits: torch.Tensor, group: int) -> torch.Tensor:
    """The DCNv3 module's mask: softmax over each group's points, ``(N, H, W, G * P)``."""
    return logits.unflatten(-1, (group, -1)).softmax(-1).flatten(-2)


# (group, group_channels, kernel, stride, pad, offset_scale, remove_center): the fixed-length
# channel paths (16, 32), other widths, 9 / 8 / 25 points, strides and offset scales
MASK_LOGITS_CASES = [
    (4, 16, 3, 1, 1, 1.0, False),
    (2, 32, 3, 1, 1, 2.0, True),
    (3, 8, 3, 2, 1, 1.0, False),
    (2, 48, 5, 1, 2, 0.5, False),
    (1, 5, 3, 1, 0, 1.0, True),
]


@pytest.mark.parametrize("group, gc, kernel, stride, pad, scale, remove_center",
                         MASK_LOGITS_CASES)
def test_mask_logits_op_matches_dcnv3_of_softmax(group, gc, kernel, stride, pad, scale,
                                                  remove_center) -> None:
    torch.manual_seed(group * 100 + gc)
    points = kernel * kernel - remove_center
    value = torch.randn(2, 9, 11, group * gc)
    h_out = (9 + 2 * pad - kernel) // stride + 1
    w_out = (11 + 2 * pad - kernel) // stride + 1
    # offsets large enough to leave the image, so border corners are exercised
    offset = 2.0 * torch.randn(2, h_out, w_out, group * points * 2)
    logits = 3.0 * torch.randn(2, h_out, w_out, group * points)
    geometry = ([kernel, kernel], [stride, stride], [pad, pad], [1, 1], group, gc, scale,
                remove_center)
    fused = MASK_LOGITS_OP(value, offset, logits, *geometry)
    unfused = torch.ops.internimage.dcnv3(value, offset, group_softmax(logits, group), *geometry)
    expected = torch.ops.internimage.dcnv3(value.double(), offset.double(),
                                           group_softmax(logits.double(), group), *geometry)
    fused_error = (fused.double() - expected).abs().max().item()
    unfused_error = (unfused.double() - expected).abs().max().item()
    assert fused.shape == unfused.shape
    # as close to float64 as the unfused float32 path (within 2x + 1e-6)
    assert fused_error <= 2 * unfused_error + 1e-6, (fused_error, unfused_error)


@pytest.mark.parametrize("group, gc, kernel, stride, pad, scale, remove_center",
                         MASK_LOGITS_CASES)
def test_mask_logits_op_gradients_match_dcnv3_of_softmax(group, gc, kernel, stride, pad, scale,
                                                          remove_center) -> None:
    """The op's autograd formula (dcnv3's backward through the recomputed softmax) against
    autograd through dcnv3 of torch.softmax, both compared with float64."""
    torch.manual_seed(group * 10 + gc)
    points = kernel * kernel - remove_center
    h_out = (6 + 2 * pad - kernel) // stride + 1
    w_out = (7 + 2 * pad - kernel) // stride + 1
    inputs = (torch.randn(2, 6, 7, group * gc), 2.0 * torch.randn(2, h_out, w_out,
              group * points * 2), 3.0 * torch.randn(2, h_out, w_out, group * points))
    grad_output = torch.randn(2, h_out, w_out, group * gc)
    geometry = ([kernel, kernel], [stride, stride], [pad, pad], [1, 1], group, gc, scale,
                remove_center)

    def grads(fused: bool, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        value, offset, logits = (t.to(dtype).requires_grad_() for t in inputs)
        if fused:
            out = MASK_LOGITS_OP(value, offset, logits, *geometry)
        else:
            out = torch.ops.internimage.dcnv3(value, offset, group_softmax(logits, group),
                                              *geometry)
        return torch.autograd.grad(out, (value, offset, logits), grad_output.to(dtype))

    expected = grads(False, torch.float64)
    for name, fused, unfused, exact in zip(("input", "offset", "logits"), grads(True,
                                           torch.float32), grads(False, torch.float32),
                                           expected):
        fused_error = (fused.double() - exact).abs().max().item()
        unfused_error = (unfused.double() - exact).abs().max().item()
        assert fused_error <= 2 * unfused_error + 1e-5, (name, fused_error, unfused_error)


def test_mask_logits_op_extreme_logits() -> None:
    """Large logits do not overflow (the max is subtracted); a NaN logit makes its own group's
    output NaN and leaves the other group alone, as with torch.softmax."""
    group, gc = 2, 16
    value = torch.randn(1, 4, 4, group * gc)
    offset = torch.zeros(1, 4, 4, group * 18)
    logits = torch.randn(1, 4, 4, group * 9) * 500.0
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1], group, gc, 1.0, False)
    fused = MASK_LOGITS_OP(value, offset, logits, *geometry)
    expected = torch.ops.internimage.dcnv3(value, offset, group_softmax(logits, group),
                                           *geometry)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    logits[0, 1, 2, 3] = float("nan")  # group 0 of pixel (1, 2)
    fused = MASK_LOGITS_OP(value, offset, logits, *geometry)
    assert fused[0, 1, 2, :gc].isnan().all()
    assert not fused[0, 1, 2, gc:].isnan().any()
    fused[0, 1, 2] = 0.0
    assert not fused.isnan().any()


def test_mask_logits_op_errors_and_opcheck() -> None:
    value, offset, logits = torch.randn(1, 4, 4, 32), torch.randn(1, 4, 4, 36), torch.randn(
        1, 4, 4, 18)
    geometry = ([3, 3], [1, 1], [1, 1], [1, 1], 2, 16, 1.0, False)
    with pytest.raises(RuntimeError, match="input must be float32"):
        MASK_LOGITS_OP(value.double(), offset.double(), logits.double(), *geometry)
    with pytest.raises(RuntimeError, match="mask_logits must have shape"):
        MASK_LOGITS_OP(value, offset, logits[..., :9], *geometry)
    torch.library.opcheck(MASK_LOGITS_OP, (value, offset, logits, *geometry))
    torch.library.opcheck(MASK_LOGITS_OP, (value.requires_grad_(), offset.requires_grad_(),
                                           logits.requires_grad_(), *geometry))




def small_model(**kwargs) -> InternImage:
    torch.manual_seed(0)
    model = InternImage(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8),
                        num_classes=10, **kwargs).eval()
    for module in model.modules():  # non-trivial offsets, masks, gates and layer scales
        if isinstance(module, DCNv3):
            nn.init.normal_(module.offset.weight, std=0.5)
            nn.init.normal_(module.mask.weight, std=0.5)
            if module.center_feature_scale_proj_weight is not None:
                nn.init.normal_(module.center_feature_scale_proj_weight, std=0.5)
    for name, param in model.named_parameters():
        if name.endswith(("gamma1", "gamma2")):
            nn.init.normal_(param, 1.0, 0.3)
    return model


VARIANTS = {
    "pre_norm": dict(),  # T
    "post_norm": dict(post_norm=True),
    "ls_post_norm": dict(layer_scale=0.5, post_norm=True),  # S/B/L/XL
    "ls_pre_norm": dict(layer_scale=0.5),
    "h_like": dict(res_post_norm=True, center_feature_scale=True, dw_kernel_size=5,
                   use_clip_projector=True, level2_post_norm=True,
                   level2_post_norm_block_ids=[1]),
    "remove_center_offset_scale": dict(remove_center=True, offset_scale=2.0),
    "bn_relu": dict(norm_layer="BN", act_layer="ReLU"),  # nothing fusable in the blocks
}


@pytest.mark.parametrize("options", list(VARIANTS.values()), ids=list(VARIANTS))
def test_matches_plain_model_and_keeps_it(options: dict) -> None:
    model = small_model(**options)
    x = torch.randn(2, 3, 64, 64)
    optimized = optimize_for_inference(model)
    with torch.no_grad():
        expected = model(x)
        out = optimized(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert list(optimized.state_dict()) == list(model.state_dict())
    # the argument is untouched: plain modules, trainable
    assert not any(isinstance(m, InferenceDCNv3) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in optimized.parameters())
    assert not optimized.training


def replaced(model: nn.Module) -> int:
    return sum(type(m) is InferenceDCNv3 for m in model.modules())


def test_replaces_what_it_has_kernels_for() -> None:
    assert replaced(optimize_for_inference(small_model())) == 5
    # a BatchNorm/ReLU offset branch and the reference core have no fused kernel
    assert replaced(optimize_for_inference(small_model(**VARIANTS["bn_relu"]))) == 0
    assert replaced(optimize_for_inference(small_model(core_op="DCNv3_pytorch"))) == 0


def test_idempotent_and_inplace() -> None:
    model = small_model(**VARIANTS["h_like"])
    once = optimize_for_inference(model)
    twice = optimize_for_inference(once)
    assert replaced(twice) == replaced(once)
    assert [type(m) for m in twice.modules()] == [type(m) for m in once.modules()]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(twice(x), once(x), rtol=0, atol=0)  # the same kernels
    same = optimize_for_inference(model, inplace=True)
    assert same is model and replaced(model) == replaced(once)


def test_features_only_model() -> None:
    torch.manual_seed(0)
    model = timm.create_model("internimage_t", features_only=True, out_indices=(1, 2)).eval()
    optimized = optimize_for_inference(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ours, ref in zip(optimized(x), model(x), strict=True):
            torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    assert replaced(optimized) == 4 + 4 + 18  # stages 0..2 of T


def test_loaded_weights_are_used() -> None:
    """The optimized model shares its parameters' storage: load_state_dict takes effect."""
    source, target = small_model(), small_model()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    optimized = optimize_for_inference(target)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        optimized.load_state_dict(source.state_dict())
        torch.testing.assert_close(optimized(x), source(x), rtol=1e-4, atol=1e-5)


def test_refuses_other_dtypes_and_gradients() -> None:
    optimized = optimize_for_inference(small_model())
    with pytest.raises(ValueError, match="float32 CPU tensors, got torch.float64"):
        copy.deepcopy(optimized).double()(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="inference-only"):
        optimized(torch.randn(1, 3, 32, 32, requires_grad=True))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        optimize_for_inference("internimage_t")


def test_hooks_on_replaced_modules_fire() -> None:
    """The transform documents that hooks inside replaced modules are lost, but hooks on the
    replaced modules themselves (and on everything else) still fire."""
    optimized = optimize_for_inference(small_model())
    seen = []
    for name, module in optimized.named_modules():
        if isinstance(module, InferenceDCNv3):
            module.register_forward_hook(lambda m, a, o, name=name: seen.append(name))
    with torch.no_grad():
        optimized(torch.randn(1, 3, 32, 32))
    assert len(seen) == 5


def test_compiles_fullgraph() -> None:
    model = small_model()
    optimized = optimize_for_inference(model)
    compiled = torch.compile(optimized, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_flash_internimage_is_left_as_built_idempotently() -> None:
    """FlashInternImage's DCNv4 modules have nothing the fused kernels cover (no LayerNorm /
    GELU offset branch, no softmax): the transform returns an eval-mode, frozen copy running
    the same modules, so its outputs are bit-identical to the model's."""
    torch.manual_seed(0)
    model = timm.create_model("flash_internimage_t").eval()
    with torch.no_grad():  # live offsets and masks (the init zeroes the offset_mask layers)
        for module in model.modules():
            if isinstance(module, DCNv4):
                nn.init.normal_(module.offset_mask.weight, std=0.05)
    x = torch.randn(1, 3, 64, 64)
    once = optimize_for_inference(model)
    twice = optimize_for_inference(once)
    types = [type(m) for m in model.modules()]
    assert [type(m) for m in once.modules()] == [type(m) for m in twice.modules()] == types
    assert not once.training and not any(p.requires_grad for p in once.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the argument is untouched
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(once(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(twice(x), expected, rtol=0, atol=0)
    assert optimize_for_inference(model, inplace=True) is model
