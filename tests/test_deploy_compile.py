"""torch.compile of whole InternImage models: one graph (fullgraph), forward and backward equal
to eager, dynamic shapes without recompiling.

Compilation is slow on a small CPU runner, so the whole-model tests use the ``aot_eager``
backend: it runs everything torch.compile does with the DCNv3 op (Dynamo tracing, fake
kernels for shapes, AOTAutograd with the op's registered autograd formula, functionalisation,
partitioning) except Inductor's code generation, where the op is an extern call anyway.
Inductor itself is tested on the DCNv3 module; whole models under Inductor run when
INTERNIMAGE_SLOW_TESTS=1 (a few minutes on 2 cores).
"""

from __future__ import annotations

import os

import pytest
import timm
import torch
from deploy_utils import forward_backward, make_input, make_model, randomize_
from torch._dynamo.testing import CompileCounterWithBackend

from internimage import DCNv3
from internimage.ops import extension_available

pytestmark = pytest.mark.skipif(
    not extension_available(), reason="the compiled DCNv3 op is not built"
)
slow = pytest.mark.skipif(
    os.environ.get("INTERNIMAGE_SLOW_TESTS") != "1",
    reason="whole-model Inductor compiles take minutes on CPU; set INTERNIMAGE_SLOW_TESTS=1",
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _internimage_t() -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_(timm.create_model("internimage_t", num_classes=10)).eval()


MODELS = {
    "internimage_t": (_internimage_t, 1, 64),  # (builder, batch, image size)
    "clip": (lambda: make_model("clip"), 2, 64),
}


def _assert_match(compiled, eager, rtol=1e-5):
    """Output, input gradient and parameter gradients agree to ``rtol``, with an absolute
    tolerance of ``rtol`` times the scale of the output, of the input gradient and of all
    parameter gradients together: reordered float sums leave errors relative to that scale
    (some gradients, e.g. of the attention pool's key bias, are exactly zero in exact
    arithmetic and pure rounding noise in float)."""
    out_c, gx_c, grads_c = compiled
    out_e, gx_e, grads_e = eager
    param_scale = max(g.abs().max().item() for g in grads_e)
    pairs = [(out_c, out_e, out_e.abs().max().item()), (gx_c, gx_e, gx_e.abs().max().item())]
    pairs += [(c, e, param_scale) for c, e in zip(grads_c, grads_e, strict=True)]
    for c, e, scale in pairs:
        torch.testing.assert_close(c, e, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("name", list(MODELS))
def test_explain_no_graph_break(name):
    builder, batch, size = MODELS[name]
    model = builder()
    explanation = torch._dynamo.explain(model)(make_input(batch, size))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    # float32 on the CPU: the core with the mask softmax inside
    op_calls = [
        node for graph in explanation.graphs for node in graph.graph.nodes
        if node.target is torch.ops.internimage._dcnv3_mask_logits.default
    ]
    assert len(op_calls) == sum(isinstance(m, DCNv3) for m in model.modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_fullgraph_forward_backward_matches_eager(name):
    builder, batch, size = MODELS[name]
    model = builder()
    x = make_input(batch, size)
    eager = forward_backward(model, x)
    counter = CompileCounterWithBackend("aot_eager")
    compiled_model = torch.compile(model, fullgraph=True, backend=counter)
    compiled = forward_backward(compiled_model, x)
    assert counter.frame_count >= 1
    _assert_match(compiled, eager)


def test_compile_dynamic_across_input_sizes():
    model = make_model("conv")
    counter = CompileCounterWithBackend("aot_eager")
    compiled_model = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    # Batch and side both change (sizes > 1 so no 0/1 specialisation; square, so the one
    # duck-sized symbol for H and W keeps serving).
    frames = None
    for batch, size in ((2, 64), (3, 96)):
        x = make_input(batch, size, seed=batch)
        compiled = forward_backward(compiled_model, x)
        _assert_match(compiled, forward_backward(model, x))
        if frames is None:
            frames = counter.frame_count
    assert counter.frame_count == frames, "dynamic=True recompiled for a new input size"


def test_compile_inductor_dcnv3_module():
    torch.manual_seed(0)
    module = randomize_(DCNv3(channels=32, group=2, center_feature_scale=True)).eval()
    x = torch.randn(2, 9, 11, 32)
    compiled = forward_backward(torch.compile(module, fullgraph=True, backend="inductor"), x)
    # Inductor fuses the surrounding ops (Linear, LayerNorm, softmax): float rounding.
    _assert_match(compiled, forward_backward(module, x), rtol=1e-4)


@slow
@pytest.mark.parametrize("kind", ["conv", "clip"])
def test_compile_inductor_whole_model(kind):
    model = make_model(kind)
    x = make_input(2, 64)
    eager = forward_backward(model, x)
    compiled = forward_backward(torch.compile(model, fullgraph=True, backend="inductor"), x)
    _assert_match(compiled, eager, rtol=1e-4)


@slow
def test_compile_dynamic_clip_model():
    model = make_model("clip")
    compiled_model = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, size in ((2, 64), (3, 96)):
        x = make_input(batch, size, seed=batch)
        _assert_match(forward_backward(compiled_model, x), forward_backward(model, x))
