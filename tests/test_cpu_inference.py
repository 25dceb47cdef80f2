"""The fused float32 CPU inference kernels (internimage.cpu_inference): same results as the
unfused modules, taken only where they cannot change behaviour, the fused offset-branch op
(checks, opcheck, accuracy of its GELU) and the DCNv3 op taking mask logits (softmax inside)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from internimage import DCNv3, InternImage, cpu_inference

OP = torch.ops.internimage._dwconv_layernorm_gelu
MASK_LOGITS_OP = torch.ops.internimage._dcnv3_mask_logits


@pytest.fixture
def calls(monkeypatch) -> dict[str, int]:
    """Counts the fused kernels' calls from Python (the block op makes its own inside)."""
    counts = {"linear": 0, "branch": 0, "core": 0, "block": 0}

    def counting(key: str, op):
        def call(*args):
            counts[key] += 1
            return op(*args)
        return call

    ops = {"linear": "_ONEDNN_LINEAR", "branch": "_FUSED_BRANCH", "core": "_MASK_LOGITS_CORE",
           "block": "_BLOCK"}
    for key, name in ops.items():
        monkeypatch.setattr(cpu_inference, name, counting(key, getattr(cpu_inference, name)))
    return counts


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


def test_linear_matches_f_linear(calls) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(48, 80)
    x = torch.randn(2, 5, 7, 48)
    with torch.no_grad():
        fused = cpu_inference.linear(x, layer)
        fused_gelu = cpu_inference.linear(x, layer, gelu=True)
        torch.testing.assert_close(fused, F.linear(x, layer.weight, layer.bias))
        torch.testing.assert_close(fused_gelu, F.gelu(F.linear(x, layer.weight, layer.bias)))
    assert calls["linear"] == 2


def small_model() -> InternImage:
    torch.manual_seed(0)
    model = InternImage(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8),
                        num_classes=10).eval()
    for module in model.modules():  # non-trivial offsets and masks
        if isinstance(module, DCNv3):
            nn.init.normal_(module.offset.weight, std=0.5)
            nn.init.normal_(module.mask.weight, std=0.5)
    return model


def test_model_fused_matches_unfused(calls) -> None:
    model = small_model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = model(x)
        assert calls["block"] == 5  # one per block
        with cpu_inference.unfused():
            unfused = model(x)
        assert calls["block"] == 5
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "context",
    [
        pytest.param(lambda: torch.enable_grad(), id="grad-enabled"),
        pytest.param(lambda: torch.autocast("cpu", dtype=torch.bfloat16), id="autocast"),
    ],
)
def test_fused_kernels_not_taken(calls, context) -> None:
    model = small_model()
    with context():
        model(torch.randn(1, 3, 64, 64))
    assert calls == {"linear": 0, "branch": 0, "core": 0, "block": 0}


def test_fused_kernels_not_taken_for_float64_or_compile(calls) -> None:
    model = small_model()
    with torch.no_grad():
        model.double()(torch.randn(1, 3, 64, 64, dtype=torch.float64))
        assert calls == {"linear": 0, "branch": 0, "core": 0, "block": 0}
        model.float()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        compiled(torch.randn(1, 3, 64, 64))
    assert calls == {"linear": 0, "branch": 0, "core": 0, "block": 0}


def test_set_fused_cpu_inference_checks_type() -> None:
    with pytest.raises(TypeError, match="enabled must be a bool"):
        cpu_inference.set_fused_cpu_inference(1)


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
    torch.library.opcheck(MASK_LOGITS_OP, (value, offset, logits, *geometry),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    "options",
    [
        dict(),  # pre-norm (T)
        dict(post_norm=True),
        dict(layer_scale=0.5, post_norm=True),  # S/B/L/XL
        dict(layer_scale=0.5),
        dict(res_post_norm=True, center_feature_scale=True, dw_kernel_size=5),  # H-like
    ],
    ids=["pre_norm", "post_norm", "ls_post_norm", "ls_pre_norm", "res_post_norm"],
)
def test_block_inference_path_matches_unfused(calls, monkeypatch, options) -> None:
    """Eval-mode blocks run as one op (InternImageBlock._forward_cpu_inference ->
    internimage::_block_cpu_inference) in every residual mode, with the plain modules'
    results; training mode does not."""
    from internimage.internimage import InternImageBlock

    taken = []
    direct = InternImageBlock._forward_cpu_inference
    monkeypatch.setattr(InternImageBlock, "_forward_cpu_inference",
                        lambda self, x: taken.append(self.mode) or direct(self, x))
    torch.manual_seed(0)
    model = InternImage(channels=16, depths=(1, 2), groups=(2, 4), num_classes=10,
                        **options).eval()
    for module in model.modules():
        if isinstance(module, DCNv3):
            nn.init.normal_(module.offset.weight, std=0.5)
            nn.init.normal_(module.mask.weight, std=0.5)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        fused = model(x)
        assert len(taken) == 3 and calls["block"] == 3
        with cpu_inference.unfused():
            unfused = model(x)
        assert len(taken) == 3
        model.train()
        model(x)
        assert len(taken) == 3  # training mode (dropout, drop path) keeps the modules
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_block_op_falls_back_for_other_blocks(calls) -> None:
    """Blocks the op does not cover run the modules (per-layer fused kernels), same results:
    a ReLU MLP, and a LayerNorm without affine parameters swapped in."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    relu = InternImage(channels=16, depths=(1, 1), groups=(1, 2), act_layer="ReLU").eval()
    swapped = InternImage(channels=16, depths=(1, 1), groups=(1, 2)).eval()
    swapped.stages[0].blocks[0].norm2 = nn.LayerNorm(16, eps=1e-6, elementwise_affine=False)
    for model in (relu, swapped):
        with torch.no_grad():
            fused = model(x)
            with cpu_inference.unfused():
                unfused = model(x)
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    assert calls["block"] == 1  # only swapped's second block
    assert calls["core"] == 3  # every other block ran its DCNv3 module's fused path


def block_op_args(channels: int = 32, group: int = 2) -> tuple:
    """Arguments of internimage::_block_cpu_inference for a pre-norm block with a layer scale
    on the MLP branch (exercising present and absent slots)."""
    torch.manual_seed(channels)
    c, points = channels, 9

    def linear(out_features: int, in_features: int) -> list[torch.Tensor]:
        return [0.2 * torch.randn(out_features, in_features), 0.1 * torch.randn(out_features)]

    norm = [torch.rand(c) + 0.5, 0.1 * torch.randn(c)]
    dcn = (linear(c, c) + [0.3 * torch.randn(c, 1, 3, 3), torch.zeros(c)] + norm
           + linear(group * points * 2, c) + linear(group * points, c) + linear(c, c)
           + [None, None])
    mlp = linear(4 * c, c) + linear(c, 4 * c)
    return (torch.randn(1, 5, 6, c), norm + [None, None] + norm + [None, None],
            [1e-6, 0.0, 1e-6, 0.0], None, torch.rand(c), dcn, 1e-6,
            [3, 1, 1, 1, group, c // group, 0], 1.0, mlp)


def test_block_op_errors_and_opcheck() -> None:
    op = torch.ops.internimage._block_cpu_inference
    args = block_op_args()
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="x must be a 4-D"):
        op(args[0].double(), *args[1:])
    with pytest.raises(RuntimeError, match="norms must have 8 entries"):
        op(args[0], args[1][:6], *args[2:])
    with pytest.raises(RuntimeError, match=r"gamma2 must be a contiguous float32 tensor of "
                                           r"shape \(32\)"):
        op(*args[:4], torch.rand(16), *args[5:])
    with pytest.raises(RuntimeError, match=r"dcn\[0\] must be a tensor, got None"):
        op(*args[:5], [None] + args[5][1:], *args[6:])


def test_packed_weight_conv_matches_conv2d_and_follows_weight_changes() -> None:
    """PackedWeightConv2d gives nn.Conv2d's output, at input shapes other than the one it
    packed for, and repacks after load_state_dict (in place) or a replaced weight."""
    from internimage.cpu_inference import PackedWeightConv2d, _packed_conv_weights

    torch.manual_seed(0)
    conv = PackedWeightConv2d(16, 32, 3, stride=2, padding=1).eval()
    plain = nn.Conv2d(16, 32, 3, stride=2, padding=1).eval()
    assert conv.state_dict().keys() == plain.state_dict().keys()

    def check(x: torch.Tensor) -> None:
        x = x.contiguous(memory_format=torch.channels_last)
        plain.load_state_dict(conv.state_dict())
        with torch.no_grad():
            # bit-identical on the development machine; other CPUs may pick other kernels
            torch.testing.assert_close(conv(x), plain(x), rtol=1e-6, atol=1e-6)

    check(torch.randn(1, 16, 14, 14))
    packed = _packed_conv_weights[conv][2]
    check(torch.randn(3, 16, 9, 20))  # another shape: the packed weight still serves
    assert _packed_conv_weights[conv][2] is packed
    conv.load_state_dict({"weight": torch.randn(32, 16, 3, 3), "bias": torch.randn(32)})
    check(torch.randn(1, 16, 14, 14))
    assert _packed_conv_weights[conv][2] is not packed  # the in-place copy was noticed
    conv.weight = nn.Parameter(torch.randn(32, 16, 3, 3))
    check(torch.randn(1, 16, 14, 14))
    copy.deepcopy(conv)  # the cache is not part of the module


def test_packed_weight_conv_not_taken_outside_float32_channels_last_inference() -> None:
    from internimage.cpu_inference import PackedWeightConv2d, _packed_conv_weights

    conv = PackedWeightConv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        conv(x)  # NCHW-contiguous input
    conv(x.contiguous(memory_format=torch.channels_last))  # autograd on
    conv.double()
    with torch.no_grad():
        conv(x.double().contiguous(memory_format=torch.channels_last))
    assert conv not in _packed_conv_weights


def test_fast_getattr_matches_getattr_and_sees_parametrizations() -> None:
    """The block op's argument lookup reads nn.Module's registries directly; a parametrized
    weight (not in ``_parameters``) still comes from getattr, so the block uses its value."""
    from internimage.internimage import InternImageBlock

    torch.manual_seed(0)
    block = InternImageBlock(16, 1).eval()
    for name in ("norm1", "dcn", "gamma1", "mode"):
        assert cpu_inference.fast_getattr(block, name) is getattr(block, name)
    assert cpu_inference.fast_getattr(block.mlp.fc1, "weight") is block.mlp.fc1.weight

    class Doubled(nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return 2 * weight

    torch.nn.utils.parametrize.register_parametrization(block.mlp.fc2, "weight", Doubled())
    x = torch.randn(1, 5, 6, 16)
    with torch.no_grad():
        fused = block(x)
        with cpu_inference.unfused():
            unfused = block(x)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
