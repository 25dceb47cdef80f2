"""ONNX export (internimage.export_onnx): files that onnxruntime runs with a dynamic batch, the
custom-op variant, and that the exported model is left untouched."""

from __future__ import annotations

import importlib

import pytest
import torch
from deploy_utils import assert_same_state, dcn_modules, make_input, make_model, model_state

import internimage
from internimage import export as export_module
from internimage.export import ONNX_DOMAIN, ONNX_OP_TYPE, export_onnx, verify_onnx
from internimage.ops import extension_available

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

needs_op = pytest.mark.skipif(not extension_available(), reason="compiled DCNv3 op not built")
IMG = 64


def _batch_dim(model_proto) -> object:
    dim = model_proto.graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_param or dim.dim_value


def test_export_onnx_is_exported_from_the_package():
    assert internimage.export_onnx is export_onnx


@pytest.mark.parametrize("kind", ["conv", "clip"])
def test_onnx_decomposition_runs_in_onnxruntime(tmp_path, kind):
    model = make_model(kind)
    before = model_state(model)
    path = export_onnx(model, tmp_path / f"{kind}.onnx", img_size=IMG)
    assert_same_state(before, model_state(model))

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    op_types = {node.op_type for node in proto.graph.node}
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)
    assert "GridSample" in op_types
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["output"]
    # the documented name of the symbolic batch dimension, on the input and the output
    assert _batch_dim(proto) == "batch"
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    # Batch 1 and 3: neither is the traced example batch (2), so this proves the dynamic dim.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = make_input(batch, IMG, seed=batch)
        with torch.no_grad():
            expected = model(x)
        (actual,) = session.run(None, {"input": x.numpy()})
        actual = torch.from_numpy(actual)
        assert actual.shape == expected.shape == (batch, 10)
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale)
    assert verify_onnx(model, path, IMG, batch_sizes=(1, 3)) < 1e-4


def test_onnx_static_batch_and_reference_core_op(tmp_path):
    model = make_model("conv", core_op="DCNv3_pytorch")
    path = export_onnx(model, tmp_path / "static.onnx", img_size=(64, 96),
                       dynamic_batch=False, batch_size=2)
    proto = onnx.load(str(path))
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 64, 96]
    assert verify_onnx(model, path, (64, 96), batch_sizes=(2,)) < 1e-4


@needs_op
def test_onnx_custom_op_nodes(tmp_path):
    # Reference core op, remove_center and offset_scale: the export switches the modules to
    # the compiled op for the duration, and the attributes carry every geometry setting.
    model = make_model("conv", core_op="DCNv3_pytorch", remove_center=True, offset_scale=2.0)
    before = model_state(model)
    path = export_onnx(model, tmp_path / "custom.onnx", img_size=IMG, custom_op=True)
    assert_same_state(before, model_state(model))

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {(o.domain, o.version) for o in proto.opset_import} >= {(ONNX_DOMAIN, 1)}
    nodes = [n for n in proto.graph.node if n.domain == ONNX_DOMAIN]
    modules = dcn_modules(model)
    assert [n.op_type for n in nodes] == [ONNX_OP_TYPE] * len(modules)
    assert "GridSample" not in {n.op_type for n in proto.graph.node}
    for node, module in zip(nodes, modules, strict=True):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {
            "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
            "group": module.group, "group_channels": module.group_channels,
            "offset_scale": pytest.approx(2.0), "remove_center": 1,
        }
        assert len(node.input) == 3 and len(node.output) == 1
    assert isinstance(_batch_dim(proto), str)
    # Without a DCNv3 plugin onnxruntime cannot load the file: expected.
    with pytest.raises(Exception, match="DCNv3|internimage"):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@needs_op
def test_onnx_custom_op_clip_model(tmp_path):
    model = make_model("clip")
    path = export_onnx(model, tmp_path / "clip_custom.onnx", img_size=IMG, custom_op=True)
    proto = onnx.load(str(path))
    nodes = [n for n in proto.graph.node if n.domain == ONNX_DOMAIN]
    assert len(nodes) == len(dcn_modules(model)) == 6


@needs_op
def test_onnx_custom_op_refuses_a_reference_fallback(tmp_path, monkeypatch):
    # As if the op had no kernel for the model's device: the modules fall back to the
    # reference, and custom_op=True must not silently export standard operators.
    ops_module = importlib.import_module("internimage.ops")

    monkeypatch.setattr(ops_module, "_KERNEL_DEVICE_TYPES", frozenset())
    monkeypatch.setattr(ops_module, "_warned_fallback", True)
    model = make_model("conv")
    with pytest.raises(RuntimeError, match="expected 4 internimage::dcnv3 calls .* found 0"):
        export_onnx(model, tmp_path / "x.onnx", img_size=IMG, custom_op=True)


def test_export_restores_the_model_on_error(tmp_path, monkeypatch):
    model = make_model("conv", core_op="DCNv3_pytorch")
    model.train()
    model.head.eval()  # mixed flags must come back exactly
    before = model_state(model)

    def failing_export(*args, **kwargs):
        assert not model.training
        if extension_available():
            assert all(m.core_op == "DCNv3" for m in dcn_modules(model))
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(export_module.torch.onnx, "export", failing_export)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(model, tmp_path / "x.onnx", img_size=IMG,
                    custom_op=extension_available())
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(model="not a model"), TypeError, "model must be a torch.nn.Module, got str"),
        (dict(path=3), TypeError, "path must be a str or os.PathLike, got int"),
        (dict(img_size=0), ValueError, "img_size must be a positive int .* got 0"),
        (dict(img_size=(64, 64, 3)), ValueError, r"img_size .* got \(64, 64, 3\)"),
        (dict(img_size="64"), TypeError, "img_size must be an int or an .* got str"),
        (dict(dynamic_batch=1), TypeError, "dynamic_batch must be a bool, got int 1"),
        (dict(custom_op="yes"), TypeError, "custom_op must be a bool, got str 'yes'"),
        (dict(batch_size=0), ValueError, "batch_size must be an int >= 1, got 0"),
        (dict(opset_version=17), ValueError, "opset_version must be None or an int >= 18"),
    ],
)
def test_export_onnx_argument_errors(tmp_path, kwargs, error, match):
    args = dict(model=torch.nn.Linear(2, 2), path=tmp_path / "x.onnx", img_size=IMG)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        export_onnx(**args)


class _TinyFlash(torch.nn.Module):
    """A stem and one residual DCNv4 mixer: enough to export the DCNv4 op on its own."""

    def __init__(self, core_op: str = "DCNv4"):
        super().__init__()
        self.in_chans = 3
        self.stem = torch.nn.Conv2d(3, 32, 4, stride=4)
        self.dcn = internimage.DCNv4(32, group=2, dw_kernel_size=3, center_feature_scale=True,
                                     core_op=core_op)
        self.head = torch.nn.Linear(32, 10)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():  # offsets of about a pixel, so sampling matters
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)
        x = x + self.dcn(x)
        return self.head(x.mean((1, 2)))


@pytest.mark.parametrize("core_op", ["DCNv4", "DCNv4_pytorch"])
def test_dcnv4_decomposition_runs_in_onnxruntime(tmp_path, core_op):
    model = _TinyFlash(core_op).eval()
    path = export_onnx(model, tmp_path / "flash.onnx", img_size=IMG)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)
    assert "GridSample" in {node.op_type for node in proto.graph.node}
    assert model.dcn.core_op == core_op
    assert verify_onnx(model, path, img_size=IMG, batch_sizes=(1, 3)) < 1e-4


@needs_op
def test_dcnv4_custom_op_node(tmp_path):
    model = _TinyFlash("DCNv4_pytorch")
    path = export_onnx(model, tmp_path / "flash_custom.onnx", img_size=IMG, custom_op=True)
    assert model.dcn.core_op == "DCNv4_pytorch"  # switched for the export only
    proto = onnx.load(str(path))
    nodes = [n for n in proto.graph.node if n.domain == ONNX_DOMAIN]
    assert [n.op_type for n in nodes] == [export_module.ONNX_OP_TYPE_DCNV4]
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attributes["kernel_size"] == [3, 3] and attributes["group_channels"] == 16
    assert attributes["remove_center"] == 0 and len(nodes[0].input) == 2
