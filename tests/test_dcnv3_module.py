"""internimage.DCNv3 (the nn.Module) against the original module's golden vectors and behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import load_golden

from internimage import DCNv3
from internimage.dcnv3 import convert_dcnv3_state_dict
from internimage.ops import softmax_over_points

CORE_OPS = ("DCNv3", "DCNv3_pytorch")



@pytest.fixture(scope="module")
def golden() -> dict:
    return load_golden("module_dcnv3_basic.pt")


def build_from_golden(golden: dict, core_op: str, dtype: torch.dtype) -> DCNv3:
    module = DCNv3(**golden["config"], core_op=core_op).to(dtype)
    module.load_state_dict(convert_dcnv3_state_dict(golden["state_dict"]))
    return module


@pytest.mark.parametrize("core_op", CORE_OPS)
def test_golden_float64_output_and_grad(golden: dict, core_op: str) -> None:
    module = build_from_golden(golden, core_op, torch.float64)
    x = golden["input"].clone().requires_grad_()
    out = module(x)
    (out * golden["grad_output"]).sum().backward()
    torch.testing.assert_close(out, golden["output"], rtol=0, atol=1e-10)
    torch.testing.assert_close(x.grad, golden["grad_input"], rtol=0, atol=1e-10)


def run_and_capture(module: DCNv3, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``module(x)`` and its intermediates, read by forward hooks on its submodules:
    value (input_proj), x1 (dw_act, NHWC), offset, mask logits, and the input of output_proj
    (the core output, blended by the centre-feature gate when the module has one)."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, nchw: bool = False):
        def hook(mod, args, out):
            seen[name] = out.permute(0, 2, 3, 1) if nchw else out
        return hook

    handles = [
        module.input_proj.register_forward_hook(keep("x_proj")),
        module.dw_act.register_forward_hook(keep("x1", nchw=True)),
        module.offset.register_forward_hook(keep("offset")),
        module.mask.register_forward_hook(keep("mask_logits")),
        module.output_proj.register_forward_pre_hook(
            lambda mod, args: seen.__setitem__("core_out", args[0])),
    ]
    try:
        out = module(x)
    finally:
        for handle in handles:
            handle.remove()
    seen["mask"] = softmax_over_points(seen["mask_logits"], module.group, module.points)
    return out, seen


@pytest.mark.parametrize("core_op", CORE_OPS)
def test_golden_float64_intermediates(golden: dict, core_op: str) -> None:
    module = build_from_golden(golden, core_op, torch.float64)
    inter = golden["intermediates"]
    for grad in (False, True):  # the same computation with and without autograd
        with torch.set_grad_enabled(grad):
            _, seen = run_and_capture(module, golden["input"])
        for name in ("x_proj", "x1", "offset", "mask_logits", "mask", "core_out"):
            torch.testing.assert_close(seen[name], inter[name], rtol=0, atol=1e-10, msg=name)


def test_golden_float32(golden: dict) -> None:
    module = build_from_golden(golden, "DCNv3", torch.float32)
    x = golden["input"].float().requires_grad_()
    out = module(x)
    (out * golden["grad_output"].float()).sum().backward()
    torch.testing.assert_close(out.double(), golden["output"], rtol=0, atol=2e-5)
    torch.testing.assert_close(x.grad.double(), golden["grad_input"], rtol=0, atol=5e-5)


def test_state_dict_keys_follow_original_except_dw_branch(golden: dict) -> None:
    module = DCNv3(**golden["config"])
    original = set(golden["state_dict"])
    ours = set(module.state_dict())
    assert original - ours == {"dw_conv.0.weight", "dw_conv.0.bias", "dw_conv.1.1.weight",
                               "dw_conv.1.1.bias"}
    assert ours - original == {"dw_conv.weight", "dw_conv.bias", "dw_norm.weight",
                               "dw_norm.bias"}
    # already-converted dicts pass through unchanged
    converted = convert_dcnv3_state_dict(golden["state_dict"])
    assert convert_dcnv3_state_dict(converted).keys() == converted.keys()


@pytest.mark.parametrize("core_op", CORE_OPS)
def test_initial_module_is_a_fixed_neighbourhood_average(core_op: str) -> None:
    """Original init: zero offsets and a uniform mask, so the core averages the 3x3
    neighbourhood of the projected values (zero padded)."""
    torch.manual_seed(0)
    module = DCNv3(channels=32, group=2, core_op=core_op).double()
    assert torch.count_nonzero(module.offset.weight) == 0
    assert torch.count_nonzero(module.mask.weight) == 0
    x = torch.randn(2, 6, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        _, seen = run_and_capture(module, x)
    torch.testing.assert_close(seen["mask"], torch.full_like(seen["mask"], 1 / 9))
    avg = F.avg_pool2d(seen["x_proj"].permute(0, 3, 1, 2), 3, stride=1, padding=1,
                       count_include_pad=True).permute(0, 2, 3, 1)
    torch.testing.assert_close(seen["core_out"], avg, rtol=0, atol=1e-12)


def test_center_feature_scale_blend_and_params() -> None:
    torch.manual_seed(0)
    module = DCNv3(channels=32, group=4, center_feature_scale=True, dw_kernel_size=5).double()
    assert module.center_feature_scale_proj_weight.shape == (4, 32)
    assert module.center_feature_scale_proj_bias.shape == (4,)
    assert module.dw_conv.weight.shape == (32, 1, 5, 5)
    with torch.no_grad():
        module.center_feature_scale_proj_weight.normal_()
        module.center_feature_scale_proj_bias.normal_()
        module.offset.weight.normal_(std=0.3)
    x = torch.randn(1, 5, 6, 32, dtype=torch.float64)
    with torch.no_grad():
        out, seen = run_and_capture(module, x)
        value, x1 = seen["x_proj"], seen["x1"]
        core = torch.ops.internimage.dcnv3(
            value, seen["offset"], seen["mask"], [3, 3], [1, 1], [1, 1], [1, 1], 4, 8, 1.0,
            False)
        gate = torch.sigmoid(x1 @ module.center_feature_scale_proj_weight.T
                             + module.center_feature_scale_proj_bias)
        gate = gate.repeat_interleave(8, dim=-1)  # one gate per group of 8 channels
        expected = module.output_proj(core * (1 - gate) + value * gate)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_remove_center_shapes_and_output() -> None:
    torch.manual_seed(0)
    module = DCNv3(channels=32, group=4, remove_center=True).double()
    assert module.offset.weight.shape == (4 * 8 * 2, 32)
    assert module.mask.weight.shape == (4 * 8, 32)
    x = torch.randn(1, 5, 6, 32, dtype=torch.float64)
    reference = DCNv3(channels=32, group=4, remove_center=True, core_op="DCNv3_pytorch").double()
    reference.load_state_dict(module.state_dict())
    with torch.no_grad():
        module.offset.weight.normal_(std=0.3)
        reference.offset.weight.copy_(module.offset.weight)
        torch.testing.assert_close(module(x), reference(x), rtol=0, atol=1e-12)


def test_mask_softmax_matches_f_softmax_and_runs_in_float32() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 36) * 3
    expected = F.softmax(logits.unflatten(-1, (4, 9)), dim=-1).flatten(-2)
    torch.testing.assert_close(softmax_over_points(logits, 4, 9), expected, rtol=1e-6,
                               atol=1e-7)
    double = softmax_over_points(logits.double(), 4, 9)
    assert double.dtype == torch.float64
    torch.testing.assert_close(double, F.softmax(logits.double().unflatten(-1, (4, 9)), -1)
                               .flatten(-2), rtol=0, atol=1e-15)
    # bfloat16 logits: softmax computed and returned in float32
    mask = softmax_over_points(logits.bfloat16(), 4, 9)
    assert mask.dtype == torch.float32
    expected = F.softmax(logits.bfloat16().float().unflatten(-1, (4, 9)), dim=-1).flatten(-2)
    torch.testing.assert_close(mask, expected, rtol=1e-6, atol=1e-7)


def test_large_logits_do_not_overflow() -> None:
    module = DCNv3(channels=16, group=1)
    with torch.no_grad():
        module.mask.bias.copy_(torch.linspace(0, 500, 9))
        _, seen = run_and_capture(module, torch.zeros(1, 2, 2, 16))
    mask = seen["mask"]
    assert torch.isfinite(mask).all()
    torch.testing.assert_close(mask.sum(-1), torch.ones(1, 2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes_and_autocast(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    module = DCNv3(channels=32, group=2)
    x = torch.randn(2, 5, 5, 32)
    with torch.no_grad():
        reference = module(x)
        out = module.to(dtype)(x.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), reference, rtol=0, atol=0.05)
        module.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference, rtol=0, atol=0.05)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(channels=30, group=4), ValueError, "divisible by group"),
        (dict(stride=2), ValueError, "stride == 1"),
        (dict(pad=0), ValueError, "2 \\* pad"),
        (dict(kernel_size=4, dilation=2, pad=3, dw_kernel_size=3, remove_center=True),
         ValueError, "odd kernel_size"),
        (dict(core_op="cuda"), ValueError, "core_op"),
        (dict(act_layer="Tanh"), ValueError, "act_layer"),
        (dict(norm_layer="GN"), ValueError, "norm_layer"),
        (dict(group=2.0), TypeError, "group"),
        (dict(dw_kernel_size=4), ValueError, "dw_kernel_size"),
    ],
)
def test_invalid_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        DCNv3(**kwargs)


def test_non_power_of_two_group_channels_warns() -> None:
    with pytest.warns(UserWarning, match="power of two"):
        DCNv3(channels=24, group=2)


def test_batchnorm_variant_runs() -> None:
    module = DCNv3(channels=16, group=1, norm_layer="BN", act_layer="ReLU").eval()
    assert isinstance(module.dw_norm, torch.nn.BatchNorm2d)
    out = module(torch.randn(2, 4, 5, 16))
    assert out.shape == (2, 4, 5, 16)
