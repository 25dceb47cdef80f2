"""InternImage and FlashInternImage as dense-prediction backbones: output_stride 8/16
(dilated later stages), plain torch.fx feature extraction on every variant, freezing,
layer-wise LR decay and det/seg checkpoints."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import to_original_layout
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import internimage  # noqa: F401  (registers the models)
from internimage import FlashInternImage, InternImage
from internimage.dcnv3 import DCNv3
from internimage.dcnv4 import DCNv4


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
            "internimage_xl", "internimage_h", "internimage_g", "internimage_h_meta",
            "flash_internimage_t", "flash_internimage_s", "flash_internimage_b",
            "flash_internimage_l"]


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


# --- freeze_stages -----------------------------------------------------------------------


def test_freeze_stages_freezes_stem_and_first_stages_and_keeps_them_in_eval() -> None:
    model = tiny(drop_rate=0.1)
    model.freeze_stages(2)
    model.train()
    frozen = [model.stem, model.stages[0], model.stages[1]]
    for part in frozen:
        assert not part.training and not any(m.training for m in part.modules())
        assert not any(p.requires_grad for p in part.parameters())
    for part in (model.stages[2], model.stages[3], model.head):
        assert part.training and all(p.requires_grad for p in part.parameters())
    # frozen stages get no gradient; the rest do
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for part in frozen for p in part.parameters())
    assert all(p.grad is not None for p in model.stages[3].parameters())
    model.freeze_stages(0)  # unfreezes everything
    model.train()
    assert all(p.requires_grad for p in model.parameters()) and model.stem.training


def test_frozen_stages_keyword_survives_the_feature_extractor_train_call() -> None:
    features = timm.create_model("internimage_t", features_only=True, frozen_stages=1)
    features.train()
    assert not features.stem.training and not features.stages_0.training
    assert features.stages_1.training
    assert not any(p.requires_grad for p in features.stages_0.parameters())


@pytest.mark.parametrize("value", [-2, 5, 1.0, True])
def test_freeze_stages_rejects_bad_values(value) -> None:
    with pytest.raises(ValueError, match="num_stages must be an int in"):
        tiny().freeze_stages(value)


# --- layer-wise LR decay (the original det/seg rule) ------------------------------------


class Detector(torch.nn.Module):
    """A backbone with a stand-in neck and head, as det/seg frameworks nest it."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = torch.nn.Conv2d(128, 16, 1)
        self.head = torch.nn.Linear(16, 3)


def _ids_and_scales(groups: list[dict]) -> dict[str, tuple[int, float, float]]:
    return {name: (g["layer_id"], g["lr_scale"], g["weight_decay"])
            for g in groups for name in g["param_names"]}


def test_layer_decay_follows_the_original_layer_ids() -> None:
    from internimage import param_groups_layer_decay

    model = Detector(tiny(layer_scale=1.0))  # depths 1-1-2-1: L = 7, neck/head id 6
    groups = param_groups_layer_decay(model, "backbone.", rate=0.5, weight_decay=0.05)
    table = _ids_and_scales(groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    expected_ids = {
        "backbone.stem.conv1.weight": 0,
        "backbone.stages.0.blocks.0.dcn.offset.weight": 1,
        "backbone.stages.0.norm.weight": 2,  # levels.0.norm: 1 + depths[0]
        "backbone.stages.1.downsample.conv.weight": 2,  # levels.0.downsample
        "backbone.stages.1.blocks.0.mlp.fc1.weight": 2,
        "backbone.stages.2.blocks.1.gamma1": 4,
        "backbone.stages.3.downsample.conv.weight": 5,  # levels.2.downsample
        "backbone.stages.2.norm.bias": 5,
        "backbone.stages.3.blocks.0.dcn.input_proj.weight": 5,
        "backbone.stages.3.norm.weight": 5,  # the original's quirk: stage 2's id
        "backbone.head.fc.weight": 6,  # a head inside the backbone counts as "everything else"
        "neck.weight": 6,
        "head.bias": 6,
    }
    for name, layer in expected_ids.items():
        assert table[name][0] == layer, name
        assert table[name][1] == pytest.approx(0.5 ** (6 - layer)), name
    # no weight decay: 1-D parameters, biases, norms; decay for matrices and conv kernels
    assert table["backbone.stages.2.blocks.1.gamma1"][2] == 0.0
    assert table["neck.bias"][2] == 0.0 and table["head.bias"][2] == 0.0
    assert table["backbone.stages.0.blocks.0.dcn.dw_norm.weight"][2] == 0.0
    assert table["backbone.stages.0.blocks.0.dcn.offset.weight"][2] == 0.05
    assert table["neck.weight"][2] == 0.05
    assert [g["layer_id"] for g in groups] == sorted(g["layer_id"] for g in groups)


def test_layer_decay_on_a_timm_feature_extractor_and_frozen_parameters() -> None:
    from internimage import param_groups_layer_decay

    features = timm.create_model("internimage_t", features_only=True, frozen_stages=1)
    groups = param_groups_layer_decay(Detector(features), rate=0.9)
    table = _ids_and_scales(groups)
    assert not any(name.startswith(("backbone.stem.", "backbone.stages_0."))
                   for name in table)  # frozen: left out
    assert table["backbone.stages_1.blocks.0.norm1.weight"][0] == 1 + 4
    assert table["backbone.stages_3.norm.weight"][0] == 1 + 4 + 4 + 18
    assert table["neck.weight"][:2] == (31, 1.0)  # T: L = 30 + 2
    direct = _ids_and_scales(param_groups_layer_decay(features, backbone_prefix=""))
    assert direct["stages_2.blocks.17.mlp.fc2.weight"][0] == 1 + 4 + 4 + 17


def test_layer_decay_checks_its_arguments() -> None:
    from internimage import param_groups_layer_decay

    with pytest.raises(ValueError, match="backbone_prefix='encoder.'"):
        param_groups_layer_decay(Detector(tiny()), backbone_prefix="encoder.")
    with pytest.raises(ValueError, match="rate must be"):
        param_groups_layer_decay(Detector(tiny()), rate=1.5)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        param_groups_layer_decay({}, rate=0.9)


# --- original det/seg checkpoints into a features_only model ------------------------------


@pytest.mark.parametrize("wrap", ["state_dict", "model", "raw", "module_prefix"])
def test_det_seg_checkpoint_loads_into_features_only(tmp_path, caplog, wrap: str) -> None:
    """An mmdet/mmseg-layout file (backbone with the original's key names, layer scale 1.0 as
    in the det configs, plus neck and heads) through timm's pretrained-file path: the
    backbone loads, the rest is reported in one line and dropped, no unexpected-key warning."""
    import logging

    source = timm.create_model("internimage_t", num_classes=0, layer_scale=1.0)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.1)
    backbone = {f"backbone.{k}": v for k, v in to_original_layout(source.state_dict()).items()}
    extra = {"neck.lateral_convs.0.conv.weight": torch.zeros(4, 64, 1, 1),
             "decode_head.conv_seg.weight": torch.zeros(3, 4, 1, 1),
             "decode_head.conv_seg.bias": torch.zeros(3),
             "auxiliary_head.conv_seg.weight": torch.zeros(3, 4, 1, 1)}
    state = {**backbone, **extra}
    if wrap == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    payload = state if wrap in ("raw", "module_prefix") else {wrap: state, "meta": {"epoch": 3}}
    path = tmp_path / "upernet_internimage_t.pth"
    torch.save(payload, path)
    with caplog.at_level(logging.INFO):
        features = timm.create_model("internimage_t", features_only=True, pretrained=True,
                                     layer_scale=1.0,
                                     pretrained_cfg_overlay=dict(file=str(path)))
    reports = [r.getMessage() for r in caplog.records if "dropped 4 keys" in r.getMessage()]
    assert reports == ["internimage: loading the backbone of a detection/segmentation "
                       "checkpoint; dropped 4 keys of auxiliary_head (1), decode_head (2), "
                       "neck (1)"]
    assert not [r for r in caplog.records if "Unexpected keys" in r.getMessage()]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ours, ref in zip(features.eval()(x), source.eval().forward_intermediates(
                x, intermediates_only=True), strict=True):
            torch.testing.assert_close(ours, ref, rtol=0, atol=0)


# --- FlashInternImage: the same backbone contract on DCNv4 --------------------------------

FLASH_SMALL = dict(channels=32, depths=[1, 1, 2, 1], groups=[2, 4, 8, 16])


@pytest.mark.parametrize("output_stride, reductions, dilations", [
    (16, [4, 8, 16, 16], [1, 1, 1, 2]),
    (8, [4, 8, 8, 8], [1, 1, 2, 4]),
])
def test_flash_output_stride_dilates_dcnv4_and_its_dw_conv(output_stride, reductions,
                                                           dilations) -> None:
    features = timm.create_model("flash_internimage_s", features_only=True,
                                 output_stride=output_stride, **FLASH_SMALL)
    assert features.feature_info.reduction() == reductions
    with torch.no_grad():
        maps = features.eval()(torch.randn(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [64 // r for r in reductions]
    full = timm.create_model("flash_internimage_s", output_stride=output_stride, **FLASH_SMALL)
    reference = timm.create_model("flash_internimage_s", **FLASH_SMALL)
    assert full.state_dict().keys() == reference.state_dict().keys()
    full.load_state_dict(reference.state_dict())  # the same weights at any output_stride
    for stage, dilation in zip(full.stages, dilations, strict=True):
        dcn = next(m for m in stage.modules() if isinstance(m, DCNv4))
        assert dcn.dilation == dcn.pad == dilation
        assert dcn.offset_mask_dw.dilation == (dilation, dilation)


def test_flash_det_seg_checkpoint_into_frozen_features_only_with_layer_scale(tmp_path) -> None:
    """A FlashInternImage-T det/seg file (no gammas; the det configs build the backbone with
    layer_scale=1.0, so the gammas stay 1) loads into a features_only model whose first
    stage is frozen, and gives the source's stage maps."""
    source = timm.create_model("flash_internimage_t", num_classes=0, **FLASH_SMALL)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.1)
    backbone = {f"backbone.{k}": v for k, v in to_original_layout(source.state_dict()).items()}
    path = tmp_path / "mask_rcnn_flash_internimage_t.pth"
    torch.save({"state_dict": {**backbone, "neck.fpn_convs.0.conv.weight": torch.zeros(4)}},
               path)
    features = timm.create_model("flash_internimage_t", features_only=True, pretrained=True,
                                 layer_scale=1.0, frozen_stages=1, **FLASH_SMALL,
                                 pretrained_cfg_overlay=dict(file=str(path)))
    features.train()
    assert not features.stem.training and not features.stages_0.training
    assert features.stages_1.training
    assert not any(p.requires_grad for p in features.stages_0.parameters())
    assert all(torch.equal(features.get_submodule(f"stages_{i}").blocks[0].gamma1,
                           torch.ones(32 * 2**i)) for i in range(4))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for ours, ref in zip(features.eval()(x), source.eval().forward_intermediates(
                x, intermediates_only=True), strict=True):
            torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_flash_layer_decay_follows_the_original_layer_ids() -> None:
    from internimage import param_groups_layer_decay

    model = Detector(FlashInternImage(**FLASH_SMALL, dw_kernel_size=3, layer_scale=1.0,
                                      post_norm=True))
    groups = param_groups_layer_decay(model, "backbone.", rate=0.5, weight_decay=0.05)
    table = _ids_and_scales(groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    expected_ids = {
        "backbone.stem.conv1.weight": 0,
        "backbone.stages.0.blocks.0.dcn.offset_mask.weight": 1,
        "backbone.stages.0.blocks.0.dcn.offset_mask_dw.weight": 1,
        "backbone.stages.1.downsample.conv.weight": 2,
        "backbone.stages.2.blocks.1.dcn.value_proj.weight": 4,
        "backbone.stages.3.blocks.0.mlp.fc2.weight": 5,
        "backbone.head.fc.weight": 6,
        "neck.weight": 6,
    }
    for name, layer in expected_ids.items():
        assert table[name][:2] == (layer, pytest.approx(0.5 ** (6 - layer))), name
    assert table["backbone.stages.0.blocks.0.dcn.offset_mask.weight"][2] == 0.05
    assert table["backbone.stages.0.blocks.0.dcn.offset_mask.bias"][2] == 0.0
    assert table["backbone.stages.0.blocks.0.gamma1"][2] == 0.0
