"""InternImage as a dense-prediction backbone: output_stride 8/16 (dilated later stages),
plain torch.fx feature extraction on every variant."""

from __future__ import annotations

import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import internimage  # noqa: F401  (registers the models)
from internimage import InternImage
from internimage.dcnv3 import DCNv3


def tiny(**kwargs) -> InternImage:
    torch.manual_seed(0)
    return InternImage(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), num_classes=10,
                       drop_path_rate=0.0, **kwargs).eval()


@pytest.mark.parametrize("output_stride, reductions, dilations", [
    (32, [4, 8, 16, 32], [1, 1, 1, 1]),
    (16, [4, 8, 16, 16], [1, 1, 1, 2]),
    (8, [4, 8, 8, 8], [1, 1, 2, 4]),
])
def test_output_stride_shapes_reductions_and_dilations(output_stride, reductions,
                                                       dilations) -> None:
    model = timm.create_model("internimage_t", features_only=True, output_stride=output_stride)
    assert model.feature_info.reduction() == reductions
    with torch.no_grad():
        maps = model.eval()(torch.randn(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [64 // r for r in reductions]
    full = timm.create_model("internimage_t", output_stride=output_stride)
    for stage, dilation in zip(full.stages, dilations, strict=True):
        dcn = next(m for m in stage.modules() if isinstance(m, DCNv3))
        assert dcn.dilation == dcn.pad == dilation
        assert dcn.dw_conv.dilation == (dilation, dilation)


def test_output_stride_loads_the_same_weights_and_keeps_early_stages() -> None:
    reference = tiny()
    dilated = tiny(output_stride=8)
    assert dilated.state_dict().keys() == reference.state_dict().keys()
    dilated.load_state_dict(reference.state_dict())  # same shapes everywhere
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = dilated.forward_intermediates(x, intermediates_only=True)
        ref = reference.forward_intermediates(x, intermediates_only=True)
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=0)  # stages 0-1 untouched
    assert ours[3].shape[-2:] == (8, 8) and ref[3].shape[-2:] == (2, 2)
    # a dilated stage equals the undilated one when nothing moves: zero offsets sample the
    # regular grid, here 2x wider, so the outputs differ; check it is finite and trains
    out = dilated.train()(x)
    out.sum().backward()
    assert torch.isfinite(out).all()


def test_output_stride_32_is_todays_model() -> None:
    default, explicit = tiny(), tiny(output_stride=32)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(explicit(x), default(x), rtol=0, atol=0)


@pytest.mark.parametrize("value", [4, 64, 16.0, True, "16"])
def test_output_stride_rejects_other_values(value) -> None:
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        tiny(output_stride=value)


VARIANTS = ["internimage_t", "internimage_s", "internimage_b", "internimage_l",
            "internimage_xl", "internimage_h", "internimage_g", "internimage_h_meta"]


@pytest.mark.parametrize("name", VARIANTS)
def test_torchvision_fx_feature_extraction_every_variant(name: str) -> None:
    """torchvision's create_feature_extractor and get_graph_node_names trace each variant with
    no extra arguments (scaled down: same structure, fewer channels and blocks)."""
    kwargs = dict(channels=32, depths=[1, 1, 3, 1], groups=[2, 4, 8, 16])
    if name.startswith(("internimage_h", "internimage_g")):
        kwargs.update(level2_post_norm_block_ids=[0, 2])
    model = timm.create_model(name, **kwargs).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert any(n.startswith("stages.3.blocks.") for n in eval_nodes) and train_nodes
    extractor = create_feature_extractor(model, return_nodes={"stages.1": "c3",
                                                              eval_nodes[-1]: "out"})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out["out"], model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out["c3"], model.forward_intermediates(x)[1][1], rtol=1e-5,
                                   atol=1e-5)
