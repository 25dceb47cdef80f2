"""Deployment paths other than torch.compile and ONNX (see test_deploy_compile.py and
test_deploy_onnx.py): autocast, TorchScript (trace and script) and deterministic backward on
CPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from deploy_utils import forward_backward, make_input, make_model
from torch.utils._python_dispatch import TorchDispatchMode

from internimage.export import export_torchscript
from internimage.ops import dcnv3, extension_available

needs_op = pytest.mark.skipif(not extension_available(), reason="compiled DCNv3 op not built")

# Ops that do the network's heavy lifting: under autocast they must run in the low dtype.
_MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::convolution",
               "aten::mkldnn_convolution", "aten::_convolution"}


class _DtypeRecorder(TorchDispatchMode):
    """Records the tensor-argument dtypes of the DCNv3 ops and of the matmul/conv ops, as
    they reach the kernels (below the autocast dispatch key)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("internimage::") or name in _MATMUL_OPS:
            dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
            self.calls.append((name, dtypes))
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------
# Autocast


@pytest.mark.parametrize("core_op", [
    pytest.param("DCNv3", marks=needs_op),
    "DCNv3_pytorch",
])
@pytest.mark.parametrize("kind", ["conv", "clip"])
def test_cpu_autocast_bfloat16(kind, core_op):
    model = make_model(kind, core_op=core_op)
    x = make_input(2, 64)
    with torch.no_grad():
        expected = model(x)
    recorder = _DtypeRecorder()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), recorder:
        out = model(x)
    assert out.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits: about 1 % of the logits' range through the network.
    error = ((out.float() - expected).abs().max() / expected.abs().max()).item()
    assert error < 5e-2, f"bf16 autocast deviates by {error:.3g} of the logits' range"

    op_calls = [dtypes for name, dtypes in recorder.calls if name == "internimage::dcnv3"]
    if core_op == "DCNv3":
        assert len(op_calls) == (4 if kind == "conv" else 6)
        assert all(d == (torch.bfloat16,) * 3 for d in op_calls), op_calls
    else:
        assert op_calls == []
    heavy = [dtypes for name, dtypes in recorder.calls if name in _MATMUL_OPS]
    assert heavy, "no matmul/conv op recorded"
    assert all(d[0] == torch.bfloat16 for d in heavy), "a matmul/conv ran in float32"


@needs_op
def test_cpu_autocast_bfloat16_backward():
    model = make_model("clip")
    recorder = _DtypeRecorder()
    with torch.autocast("cpu", dtype=torch.bfloat16), recorder:
        out = model(make_input(2, 64))
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
    backward_calls = [d for name, d in recorder.calls if name == "internimage::_dcnv3_backward"]
    assert len(backward_calls) == 6
    assert all(d == (torch.bfloat16,) * 4 for d in backward_calls)
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.dtype == torch.float32, name
        assert torch.isfinite(param.grad).all(), name


@needs_op
def test_op_autocast_policy():
    """The op's documented policy: float32 -> autocast dtype, float64 untouched."""
    x = torch.randn(1, 5, 5, 16)
    offset = torch.randn(1, 5, 5, 18)
    mask = torch.softmax(torch.randn(1, 5, 5, 9), -1)
    args = (3, 1, 1, 1, 1, 16, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert dcnv3(x, offset, mask, *args).dtype == torch.bfloat16
        assert torch.ops.internimage.dcnv3.default(
            x, offset, mask, [3, 3], [1, 1], [1, 1], [1, 1], 1, 16, 1.0, False
        ).dtype == torch.bfloat16
        assert dcnv3(x.double(), offset.double(), mask.double(), *args).dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# TorchScript


def _trace(model, x):
    # Traced for inference (as export_torchscript does): no_grad, so any grad-mode dependent
    # fast path of the model is the one recorded and replayed.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        return torch.jit.trace(model, (x,), check_trace=False)


@needs_op
@pytest.mark.parametrize("kind", ["conv", "clip"])
def test_torchscript_trace_matches_eager(tmp_path, kind):
    model = make_model(kind)
    traced = _trace(model, make_input(2, 64))
    kinds = [node.kind() for node in traced.inlined_graph.nodes()]
    assert kinds.count("internimage::dcnv3") == (4 if kind == "conv" else 6)

    path = tmp_path / "model.pt"
    traced.save(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path))
    # Other batch sizes and image sizes than the traced one: shapes are read at run time.
    for batch, size in ((2, 64), (3, 64), (1, 96)):
        x = make_input(batch, size, seed=batch + size)
        with torch.no_grad():
            expected = model(x)
            # another executor: equal within float32 rounding (default dtype tolerances)
            torch.testing.assert_close(traced(x), expected)
            torch.testing.assert_close(loaded(x), expected)


def test_export_torchscript_reference_path(tmp_path):
    model = make_model("conv", core_op="DCNv3_pytorch")
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_torchscript(model, tmp_path / "ref.pt", img_size=64, batch_size=2)
        loaded = torch.jit.load(str(path))
    assert model.training  # restored
    kinds = {node.kind() for node in loaded.inlined_graph.nodes()}
    assert "aten::grid_sampler" in kinds and "internimage::dcnv3" not in kinds
    model.eval()
    x = make_input(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-6, atol=1e-6)


def _script(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.14
        return torch.jit.script(model)


def _node_kinds(graph) -> list[str]:
    """Kinds of all nodes of a TorchScript graph, those inside if/loop blocks included."""
    kinds = []
    for node in graph.nodes():
        kinds.append(node.kind())
        for block in node.blocks():
            kinds.extend(_node_kinds(block))
    return kinds


@pytest.mark.parametrize("core_op", [pytest.param("DCNv3", marks=needs_op), "DCNv3_pytorch"])
@pytest.mark.parametrize("kind", ["conv", "clip"])
def test_torchscript_script_matches_eager(tmp_path, kind, core_op):
    model = make_model(kind, core_op=core_op)
    scripted = _script(model)
    # only the module's own core is compiled in: the compiled op, or standard ops only
    kinds = _node_kinds(scripted.inlined_graph)
    dcn_modules = 4 if kind == "conv" else 6
    if core_op == "DCNv3":
        assert kinds.count("internimage::dcnv3") == dcn_modules
        assert "aten::grid_sampler" not in kinds
    else:
        assert kinds.count("aten::grid_sampler") == dcn_modules
        assert "internimage::dcnv3" not in kinds

    path = tmp_path / "scripted.pt"
    scripted.save(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(str(path))
    for batch, size in ((2, 64), (1, 96)):
        x = make_input(batch, size, seed=batch + size)
        with torch.no_grad():
            expected = model(x)
            features = model.forward_features(x)
            pooled = model.forward_head(features, pre_logits=True)
            for compiled in (scripted, loaded):  # float32 tolerances: another executor
                torch.testing.assert_close(compiled(x), expected)
                torch.testing.assert_close(compiled.forward_features(x), features)
                torch.testing.assert_close(compiled.forward_head(features, pre_logits=True),
                                           pooled)


@pytest.mark.parametrize("core_op", [pytest.param("DCNv3", marks=needs_op), "DCNv3_pytorch"])
def test_torchscript_script_backward_matches_eager(core_op):
    model = make_model("clip", core_op=core_op)
    scripted = _script(model)
    x = make_input(2, 64)
    _assert_close(forward_backward(model, x), forward_backward(scripted, x))


@needs_op
def test_torchscript_script_batchnorm_and_variants():
    """BatchNorm (scripted through its own batch-norm code: TorchScript has no super()),
    layer scale with post-norm, remove_center and gradient checkpointing (ignored by the
    scripted model) script and match eager, in training mode as well (running statistics)."""
    kwargs = dict(norm_layer="BN", layer_scale=0.1, post_norm=True, remove_center=True)
    eager = make_model("conv", **kwargs).train()
    twin = make_model("conv", **kwargs).train()
    twin.set_grad_checkpointing(True)
    scripted = _script(twin)
    x = make_input(2, 64)
    for _ in range(2):
        torch.testing.assert_close(scripted(x), eager(x))
    for (name, a), b in zip(eager.state_dict().items(), scripted.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)  # BatchNorm running statistics
    eager.eval()
    scripted.eval()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x))


@needs_op
@pytest.mark.parametrize("kind", ["conv", "clip"])
def test_torchscript_script_after_reset_classifier(kind):
    x = make_input(1, 64)
    for args in ((0, ""), (5, "avg", True), (0, "", True)):
        model = make_model(kind)
        model.reset_classifier(*args)
        scripted = _script(model)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), model(x), msg=str(args))


def test_torchscript_script_without_extension():
    """Without the compiled extension both core ops script to the reference, as the eager
    'DCNv3' module falls back to it (with the fallback warning)."""
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["internimage._C"] = None  # makes `from internimage import _C` fail
        sys.path.insert(0, "tests")
        import torch
        from deploy_utils import make_input, make_model
        from internimage.ops import extension_available
        assert not extension_available()
        x = make_input(1, 64)
        for core_op in ("DCNv3", "DCNv3_pytorch"):
            model = make_model("conv", core_op=core_op)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                scripted = torch.jit.script(model)
            fallback = [w for w in caught if "falls back" in str(w.message)]
            assert len(fallback) == (core_op == "DCNv3"), [str(w.message) for w in caught]
            graph = str(scripted.inlined_graph)
            assert "internimage::dcnv3" not in graph and "grid_sampler" in graph
            with torch.no_grad():
                torch.testing.assert_close(scripted(x), model(x), msg=core_op)
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------------------------
# Determinism


@pytest.fixture
def deterministic():
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    torch.set_num_threads(threads)


def _assert_close(a, b):
    """Outputs, input and parameter gradients within the dtype's tolerance (two executors),
    the absolute one scaled by each tensor's largest value: a parameter gradient is a sum
    over every pixel, and the executors may order the sum (and the mask softmax) differently."""
    for u, v in zip(a[:2] + tuple(a[2]), b[:2] + tuple(b[2]), strict=True):
        torch.testing.assert_close(u, v, rtol=1.3e-6, atol=1e-5 * max(1.0, v.abs().max().item()))


def _assert_identical(a, b):
    out_a, gx_a, grads_a = a
    out_b, gx_b, grads_b = b
    assert torch.equal(out_a, out_b)
    assert torch.equal(gx_a, gx_b)
    assert all(torch.equal(u, v) for u, v in zip(grads_a, grads_b, strict=True))


@pytest.mark.parametrize("core_op", [pytest.param("DCNv3", marks=needs_op), "DCNv3_pytorch"])
@pytest.mark.parametrize("kind", ["conv", "clip"])
def test_backward_bit_reproducible(deterministic, kind, core_op):
    model = make_model(kind, core_op=core_op)
    x = make_input(2, 64)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        _assert_identical(forward_backward(model, x), forward_backward(model, x))


@needs_op
def test_op_bit_identical_across_thread_counts(deterministic):
    """The CPU kernels give every thread whole (batch, group) slices in the backward (and
    whole output pixels in the forward): the same bits for any thread count."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 13, 64, generator=g)
    offset = torch.randn(2, 12, 13, 4 * 9 * 2, generator=g) * 2
    mask = torch.softmax(torch.randn(2, 12, 13, 4, 9, generator=g), -1).flatten(-2)
    grad_out = torch.randn(2, 12, 13, 64, generator=g)

    def run():
        leaves = [t.clone().requires_grad_(True) for t in (x, offset, mask)]
        out = dcnv3(*leaves, 3, 1, 1, 1, 4, 16, 1.0)
        out.backward(grad_out)
        return [out.detach()] + [t.grad for t in leaves]

    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(run())
    for result in results[1:]:
        assert all(torch.equal(u, v) for u, v in zip(results[0], result, strict=True))


@needs_op
def test_model_across_thread_counts_agrees_to_rounding(deterministic):
    """Across thread counts PyTorch's own GEMM/conv kernels block differently (the first
    difference is the conv head's 1x1 conv), so the model agrees only to float rounding."""
    model = make_model("conv")
    x = make_input(2, 64)
    torch.set_num_threads(1)
    one = forward_backward(model, x)
    torch.set_num_threads(2)
    two = forward_backward(model, x)
    for a, b in zip([one[0], one[1], *one[2]], [two[0], two[1], *two[2]], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
