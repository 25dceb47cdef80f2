"""The DCNv4 module: golden parity with the original, state-dict layout, one forward that
calls its submodules, TorchScript / fx / torch.compile, any group width, bad arguments."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import GOLDEN_FLASH_DIR, golden_files
from torch import nn

from internimage import DCNv4
from internimage.dcnv4 import check_nhwc_input
from internimage.ops import dcnv4_core

GOLDEN_MODULES = golden_files("module_*.pt", GOLDEN_FLASH_DIR)
CORE_OPS = ("DCNv4", "DCNv4_pytorch")


def golden_module(d: dict, core_op: str, dtype=torch.float64) -> DCNv4:
    module = DCNv4(**d["config"], core_op=core_op)
    module.load_state_dict(d["state_dict"])  # fp16 values, exact in float32/64
    return module.to(dtype)


class Recorder:
    """Forward hooks on every submodule of a DCNv4: the input and output of each call."""

    def __init__(self, module: nn.Module):
        self.calls: dict[str, tuple] = {}
        self.handles = [
            child.register_forward_hook(self._hook(name))
            for name, child in module.named_children()
        ]

    def _hook(self, name):
        def hook(module, args, output):
            self.calls[name] = (args[0].detach(), output.detach())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("core_op", CORE_OPS)
@pytest.mark.parametrize("path", GOLDEN_MODULES, ids=lambda p: p.stem)
def test_golden_float64(path, core_op):
    d = torch.load(path, weights_only=True)
    module = golden_module(d, core_op)
    assert list(module.state_dict()) == list(d["state_dict"])  # the original's keys, in order
    recorder = Recorder(module)
    x = d["input"].clone().requires_grad_()
    out = module(x)
    out.backward(d["grad_output"])
    torch.testing.assert_close(out.detach(), d["output"], rtol=0, atol=1e-10)
    torch.testing.assert_close(x.grad, d["grad_input"], rtol=0, atol=1e-10)

    inter = d["intermediates"]
    calls = recorder.calls
    torch.testing.assert_close(calls["value_proj"][1], inter["x_proj"], rtol=0, atol=1e-10)
    torch.testing.assert_close(calls["offset_mask"][1], inter["offset_mask"], rtol=0, atol=1e-10)
    torch.testing.assert_close(calls["output_proj"][0], inter["pre_output_proj"], rtol=0,
                               atol=1e-10)
    if "offset_mask_input" in inter:
        dw_out = calls["offset_mask_dw"][1].permute(0, 2, 3, 1)  # NCHW view -> NHWC
        torch.testing.assert_close(dw_out, inter["offset_mask_input"], rtol=0, atol=1e-10)
    else:
        assert isinstance(module.offset_mask_dw, nn.Identity)


@pytest.mark.parametrize("path", GOLDEN_MODULES, ids=lambda p: p.stem)
def test_golden_core_and_gate(path):
    """The core's output and the centre-feature gate, recomputed from the recorded offsets."""
    d = torch.load(path, weights_only=True)
    module = golden_module(d, "DCNv4")
    inter = d["intermediates"]
    core = dcnv4_core(inter["x_proj"], inter["offset_mask"], module.kernel_size, module.stride,
                      module.pad, module.dilation, module.group, module.group_channels,
                      module.offset_scale, module.remove_center)
    torch.testing.assert_close(core, inter["core_out"], rtol=0, atol=1e-10)
    if "center_feature_scale" in inter:
        gate = torch.sigmoid(torch.nn.functional.linear(
            core, module.center_feature_scale_proj_weight, module.center_feature_scale_proj_bias))
        torch.testing.assert_close(gate, inter["center_feature_scale"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("path", GOLDEN_MODULES, ids=lambda p: p.stem)
def test_golden_float32(path):
    d = torch.load(path, weights_only=True)
    module = golden_module(d, "DCNv4", torch.float32)
    x = d["input"].float().requires_grad_()
    out = module(x)
    out.backward(d["grad_output"].float())
    # The golden README's float32 tolerances.
    torch.testing.assert_close(out.detach().double(), d["output"], rtol=0, atol=2e-5)
    torch.testing.assert_close(x.grad.double(), d["grad_input"], rtol=0, atol=5e-5)


def test_parameters_and_init_follow_the_original():
    module = DCNv4(channels=48, group=3, dw_kernel_size=5, center_feature_scale=True,
                   output_bias=False)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {
        "center_feature_scale_proj_weight": (3, 48),
        "center_feature_scale_proj_bias": (3,),
        "offset_mask_dw.weight": (48, 1, 5, 5),
        "offset_mask_dw.bias": (48,),
        "offset_mask.weight": (88, 48),  # ceil(3 * 3 * 9 / 8) * 8
        "offset_mask.bias": (88,),
        "value_proj.weight": (48, 48),
        "value_proj.bias": (48,),
        "output_proj.weight": (48, 48),
    }
    # Zero offset/mask projection: the core's output is exactly zero at init.
    x = torch.randn(2, 5, 6, 48)
    # (and the zero gate passes half of the projected input: sigmoid(0) = 0.5)
    torch.testing.assert_close(module(x), module.output_proj(0.5 * module.value_proj(x)))
    plain = DCNv4(channels=64, group=4)
    assert torch.equal(plain(x.new_ones(1, 3, 3, 64)),
                       plain.output_proj.bias.expand(1, 3, 3, 64))
    dilated = DCNv4(channels=48, group=3, dw_kernel_size=5, dw_dilation=2)
    assert (dilated.offset_mask_dw.dilation, dilated.offset_mask_dw.padding) == ((2, 2), (4, 4))
    assert dilated.state_dict().keys() == DCNv4(channels=48, group=3,
                                                dw_kernel_size=5).state_dict().keys()
    bare = DCNv4(channels=16, group=2, without_pointwise=True, remove_center=True)
    assert set(bare.state_dict()) == {"offset_mask.weight", "offset_mask.bias"}
    assert bare.offset_mask.out_features == math.ceil(3 * 2 * 8 / 8) * 8


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(channels=32, group=4),  # group_channels 8
        dict(channels=72, group=3),  # 24
        dict(channels=9, group=3),  # 3
        dict(channels=64, group=1),  # 64
        dict(channels=48, group=3, kernel_size=5, pad=2, remove_center=True, dw_kernel_size=3),
        dict(channels=32, group=2, dilation=2, pad=2, center_feature_scale=True,
             offset_scale=2.0),
        dict(channels=32, group=2, without_pointwise=True, center_feature_scale=True),
        # FlashInternImage's dilated stages (output_stride 8/16): dilated core and dw conv
        dict(channels=32, group=2, dilation=2, pad=2, dw_kernel_size=3, dw_dilation=2),
    ],
)
@pytest.mark.parametrize("n", [1, 3])
def test_compiled_core_matches_reference_module(kwargs, n):
    torch.manual_seed(0)
    module = DCNv4(**kwargs).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    reference = DCNv4(**kwargs, core_op="DCNv4_pytorch").double()
    reference.load_state_dict(module.state_dict())
    x = torch.randn(n, 6, 5, kwargs["channels"], dtype=torch.float64)
    outs = []
    for m in (module, reference):
        xi = x.clone().requires_grad_()
        out = m(xi)
        out.backward(torch.ones_like(out))
        outs.append((out.detach(), xi.grad, [p.grad for p in m.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=1e-10)
    for a, b in zip(outs[0][2], outs[1][2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def trained_module(**kwargs) -> DCNv4:
    torch.manual_seed(1)
    module = DCNv4(**kwargs)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_hooks_fire_and_swapped_submodules_are_used_in_every_mode(grad, training):
    module = trained_module(channels=32, group=2, dw_kernel_size=3, center_feature_scale=True)
    module.train(training)
    recorder = Recorder(module)
    x = torch.randn(1, 4, 5, 32)
    with torch.set_grad_enabled(grad):
        before = module(x)
    assert set(recorder.calls) == {"offset_mask_dw", "offset_mask", "value_proj", "output_proj"}
    recorder.remove()
    module.value_proj = nn.Identity()
    with torch.set_grad_enabled(grad):
        after = module(x)
    assert not torch.allclose(before, after)
    reference = trained_module(channels=32, group=2, dw_kernel_size=3,
                               center_feature_scale=True)
    reference.value_proj.weight.data.copy_(torch.eye(32))
    reference.value_proj.bias.data.zero_()
    torch.testing.assert_close(after, reference(x).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("core_op", CORE_OPS)
def test_torchscript_matches_eager(core_op):
    module = trained_module(channels=32, group=2, dw_kernel_size=3, center_feature_scale=True,
                            core_op=core_op).eval()
    x = torch.randn(2, 5, 4, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation note
        scripted = torch.jit.script(module)
    torch.testing.assert_close(scripted(x), module(x), rtol=1e-6, atol=1e-6)
    graph = str(scripted.inlined_graph)
    if core_op == "DCNv4":
        assert "internimage::dcnv4" in graph
    else:
        assert "grid_sampler" in graph and "internimage::dcnv4" not in graph


def test_fx_symbolic_trace_keeps_the_core_as_a_leaf():
    module = trained_module(channels=32, group=2, dw_kernel_size=3, center_feature_scale=True)
    traced = torch.fx.symbolic_trace(module)
    targets = [n.target for n in traced.graph.nodes if n.op in ("call_function", "call_module")]
    assert sum(t is dcnv4_core for t in targets) == 1
    assert sum(t is check_nhwc_input for t in targets) == 1
    assert {"offset_mask_dw", "offset_mask", "value_proj", "output_proj"} <= set(targets)
    x = torch.randn(2, 5, 4, 32)
    torch.testing.assert_close(traced(x), module(x))  # float32 tolerance: another code path


def test_compile_fullgraph_matches_eager():
    module = trained_module(channels=32, group=2, dw_kernel_size=3, center_feature_scale=True)
    x = torch.randn(2, 5, 4, 32)
    explanation = torch._dynamo.explain(module)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(xc)
    out.sum().backward()
    expected = module(xe)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(xc.grad, xe.grad)


BAD_KWARGS = {
    "channels not divisible": (dict(channels=30, group=4), ValueError,
                               r"channels must be divisible by group, got channels=30, group=4"),
    "stride": (dict(stride=2), ValueError, r"stride == 1 and 2 \* pad == .* got stride=2"),
    "pad": (dict(pad=2), ValueError, r"got stride=1, pad=2"),
    "even dw kernel": (dict(dw_kernel_size=4), ValueError, r"dw_kernel_size must be odd, got 4"),
    "float group": (dict(group=4.0), TypeError, r"group must be an int, got float 4.0"),
    "zero channels": (dict(channels=0), ValueError, r"channels must be >= 1, got 0"),
    "zero dw_dilation": (dict(dw_dilation=0), ValueError, r"dw_dilation must be >= 1, got 0"),
    "core_op": (dict(core_op="DCNv3"), ValueError, r"core_op must be one of"),
    "flag": (dict(output_bias=1), TypeError, r"output_bias must be a bool, got int"),
    "even kernel remove_center": (dict(kernel_size=2, pad=0, dilation=0), ValueError,
                                  r"dilation must be >= 1, got 0"),
}


def test_nchw_input_is_refused_with_a_hint():
    module = DCNv4(channels=16, group=2)
    with pytest.raises(ValueError, match=r"channels-last .* C = 16, got shape \[1, 16, 5, 6\] "
                       r"\(an NCHW tensor\?"):
        module(torch.randn(1, 16, 5, 6))
    with pytest.raises(ValueError, match=r"got shape \[5, 6, 16\]"):
        module(torch.randn(5, 6, 16))


@pytest.mark.parametrize("case", BAD_KWARGS.values(), ids=BAD_KWARGS.keys())
def test_bad_arguments_raise_named_errors(case):
    kwargs, error, pattern = case
    with pytest.raises(error, match=pattern):
        DCNv4(**kwargs)
