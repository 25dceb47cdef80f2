"""The timm contract of the internimage_* family, on small configurations."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import timm.optim
import torch
from conftest import to_original_layout
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import internimage
from internimage import InternImage

# Small architectures: one block per stage (level 2 has 3 blocks where post norms are tested).
TINY = dict(channels=16, depths=[1, 1, 1, 1], groups=[1, 2, 4, 8], num_classes=10)
TINY_CLIP = dict(TINY, depths=[1, 1, 3, 1], dw_kernel_size=5, level2_post_norm=True,
                 level2_post_norm_block_ids=[0, 2], res_post_norm=True,
                 center_feature_scale=True, use_clip_projector=True)
# FlashInternImage (DCNv4 blocks) with S/B/L's flags; 16 channels per group as released.
TINY_FLASH = dict(channels=32, depths=[1, 1, 1, 1], groups=[2, 4, 8, 16], num_classes=10,
                  layer_scale=1.0, post_norm=True, dw_kernel_size=3)
CONFIGS = {"conv": TINY, "clip": TINY_CLIP, "flash": TINY_FLASH}
KINDS = ["conv", "clip", "flash"]
VARIANTS = ["t", "s", "b", "l", "xl", "h", "g"]
# Architectures beyond the variants: H with the iNaturalist metadata head (tests/test_meta_head.py)
EXTRA_ARCHS = ["h_meta"]
# Every released classification checkpoint (original-internimage.md 5.1).
RELEASED = {
    "internimage_t.in1k": ("internimage_t_1k_224.pth", 1000, 224),
    "internimage_s.in1k": ("internimage_s_1k_224.pth", 1000, 224),
    "internimage_b.in1k": ("internimage_b_1k_224.pth", 1000, 224),
    "internimage_l.in22k_ft_in1k_384": ("internimage_l_22kto1k_384.pth", 1000, 384),
    "internimage_xl.in22k_ft_in1k_384": ("internimage_xl_22kto1k_384.pth", 1000, 384),
    "internimage_h.in22k_ft_in1k_640": ("internimage_h_22kto1k_640.pth", 1000, 640),
    "internimage_g.in22k_ft_in1k_512": ("internimage_g_22kto1k_512.pth", 1000, 512),
    "internimage_l.in22k_384": ("internimage_l_22k_192to384.pth", 21841, 384),
    "internimage_xl.in22k_384": ("internimage_xl_22k_192to384.pth", 21841, 384),
    "internimage_h.in22k_384": ("internimage_h_jointto22k_384.pth", 21841, 384),
    "internimage_g.in22k_384": ("internimage_g_pretrainto22k_384.pth", 21841, 384),
    "internimage_h_meta.inat18_384": ("internimage_h_22ktoinat18_384.pth", 8142, 384),
}


def tiny(kind: str = "conv", **kwargs) -> InternImage:
    torch.manual_seed(0)
    if kind == "flash":
        return live_dcnv4(timm.create_model("flash_internimage_t", **dict(TINY_FLASH, **kwargs)))
    return timm.create_model("internimage_t", **dict(CONFIGS[kind], **kwargs))


def live_dcnv4(model: torch.nn.Module) -> torch.nn.Module:
    """Random offset_mask projections (the init zeroes them, so DCNv4 outputs only its
    bias), the same for every model with its DCNv4 modules in the same order."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, internimage.DCNv4):
                weight = module.offset_mask.weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    return model


# --- registration and pretrained cfgs ---------------------------------------------------------


def test_registered_models() -> None:
    assert timm.list_models("internimage*") == sorted(
        f"internimage_{v}" for v in VARIANTS + EXTRA_ARCHS)
    assert sorted(timm.list_models(module="internimage")) == timm.list_models("internimage*")
    assert sorted(timm.list_models("internimage*", pretrained=True)) == sorted(RELEASED)


@pytest.mark.parametrize("tag", sorted(RELEASED))
def test_pretrained_cfgs(tag: str) -> None:
    filename, num_classes, size = RELEASED[tag]
    cfg = timm.models.get_pretrained_cfg(tag).to_dict()
    stride = 16 if tag.startswith(("internimage_h", "internimage_g")) else 32
    assert cfg["hf_hub_id"] == "OpenGVLab/InternImage"
    assert cfg["hf_hub_filename"] == filename
    assert cfg["num_classes"] == num_classes
    assert cfg["input_size"] == (3, size, size)
    assert cfg["pool_size"] == (size // stride, size // stride)
    assert cfg["crop_pct"] == 1.0  # original eval: Resize(img_size) + CenterCrop(img_size)
    assert cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == IMAGENET_DEFAULT_MEAN and cfg["std"] == IMAGENET_DEFAULT_STD
    assert cfg["license"] == "mit"
    assert cfg["paper_ids"] == "arXiv:2211.05778"
    # the metadata model has two classifiers: timm replaces both for another num_classes
    classifier = ("head.fc", "meta_head.fc") if "_meta." in tag else "head.fc"
    assert cfg["first_conv"] == "stem.conv1" and cfg["classifier"] == classifier


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_tag_and_cfg_names_exist(variant: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(f"internimage_{variant}")
    cfg = model.pretrained_cfg
    assert cfg["tag"] == ("in1k" if variant in "tsb" else
                          {"l": "in22k_ft_in1k_384", "xl": "in22k_ft_in1k_384",
                           "h": "in22k_ft_in1k_640", "g": "in22k_ft_in1k_512"}[variant])
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state
    assert cfg["classifier"] + ".weight" in state


@pytest.mark.parametrize(
    ("tag", "kind", "num_features", "hidden"),
    [("internimage_t.in1k", "conv", 128, 192), ("internimage_h.in22k_384", "clip", 1024, 768)],
)
def test_default_cfg_contract(tag: str, kind: str, num_features: int, hidden: int) -> None:
    """timm's test_model_default_cfgs on a small model with the tag's cfg."""
    cfg = timm.models.get_pretrained_cfg(tag).to_dict()
    model = timm.create_model(tag, **CONFIGS[kind]).eval()
    assert (model.num_features, model.head_hidden_size) == (num_features, hidden)
    x = torch.randn(1, *cfg["input_size"])
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (1, num_features, *cfg["pool_size"])
        assert model.forward_head(features, pre_logits=True).shape == (1, hidden)
        model.reset_classifier(0)
        assert model(x).shape == (1, model.head_hidden_size)
        model.reset_classifier(0, "")
        out = model(x)
        assert out.ndim == 4 and out.shape[-2:] == cfg["pool_size"]
        model = timm.create_model(tag, **dict(CONFIGS[kind], num_classes=0),
                                  global_pool="").eval()
        out = model(x)
        assert out.ndim == 4 and out.shape[-2:] == cfg["pool_size"]


# --- heads ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_classifier_reset(kind: str) -> None:
    model = tiny(kind).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model.get_classifier() is model.head.fc
    assert model.get_classifier().out_features == 10
    model.reset_classifier(7)
    assert model.num_classes == 7 and model(x).shape == (2, 7)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    assert model(x).shape == (2, model.head_hidden_size)
    model.reset_classifier(0, "")
    clip = kind == "clip"  # the clip head's fused map: 1024 channels at stride 16
    assert model(x).shape == (2, 1024 if clip else model.head_hidden_size, 2 * (1 + clip),
                              2 * (1 + clip))
    model.reset_classifier(5, "", reset_other=True)
    out = model(x)  # per-pixel classifier without pooling
    assert out.ndim == 4 and out.shape[:2] == (2, 5)
    model.reset_classifier(3, "avg", reset_other=True)
    assert model.head_hidden_size == model.num_features
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("kind", ["conv", "clip"])
def test_classifier_reset_keeps_the_model_dtype(kind: str) -> None:
    """New classifiers take the model's dtype, also once reset_other and num_classes=0 have
    left the head without a parameter to copy it from."""
    model = tiny(kind).double().eval()
    model.reset_classifier(0, reset_other=True)
    assert next(model.head.parameters(), None) is None
    model.reset_classifier(4)
    assert model.get_classifier().weight.dtype == torch.float64
    model.reset_classifier(0)
    model.reset_classifier(6, reset_other=True)
    assert model.get_classifier().weight.dtype == torch.float64
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64, dtype=torch.float64)).shape == (1, 6)


def test_clip_head_rejects_other_pools_until_reset_other() -> None:
    with pytest.raises(ValueError, match="'attn' or ''"):
        tiny("clip", global_pool="avg")
    model = tiny("clip")
    model.reset_classifier(4, "max", reset_other=True)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)


# --- features ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("feature_cls", [None, "getter"])
def test_features_only(kind: str, feature_cls: str | None) -> None:
    kwargs = dict(CONFIGS[kind], features_only=True)
    if feature_cls:
        kwargs["feature_cls"] = feature_cls
    torch.manual_seed(0)  # same initial weights as tiny(kind)
    arch = "flash_internimage_t" if kind == "flash" else "internimage_t"
    model = timm.create_model(arch, **kwargs).eval()
    if kind == "flash":
        live_dcnv4(model)
    c = CONFIGS[kind]["channels"]
    assert model.feature_info.channels() == [c, 2 * c, 4 * c, 8 * c]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.module_name() == [f"stages.{i}" for i in range(4)]
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model(x)
    assert [tuple(f.shape) for f in feats] == [(2, c, 16, 24), (2, 2 * c, 8, 12),
                                               (2, 4 * c, 4, 6), (2, 8 * c, 2, 3)]
    reference = tiny(kind).eval()
    with torch.no_grad():
        _, expected = reference.forward_intermediates(x)
    for ours, ref in zip(feats, expected, strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)

    model = timm.create_model(arch, **dict(kwargs, out_indices=(1, 3))).eval()
    assert model.feature_info.reduction() == [8, 32]
    with torch.no_grad():
        assert [f.shape[1] for f in model(x)] == [2 * c, 8 * c]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_intermediates(kind: str) -> None:
    model = tiny(kind).eval()
    c = CONFIGS[kind]["channels"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        assert [t.shape[1] for t in inter] == [c, 2 * c, 4 * c, 8 * c]
        assert all(t.is_contiguous(memory_format=torch.channels_last) for t in inter)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape[1] for t in last2] == [4 * c, 8 * c]
        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        torch.testing.assert_close(picked[0], inter[0], rtol=0, atol=0)
        torch.testing.assert_close(picked[1], inter[3], rtol=0, atol=0)
        early, early_inter = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(early_inter[0], inter[1], rtol=0, atol=0)
        nhwc = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(nhwc[2], inter[2].permute(0, 2, 3, 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


@pytest.mark.parametrize("kind", KINDS)
def test_prune_intermediate_layers(kind: str) -> None:
    model = tiny(kind).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        _, expected = model.forward_intermediates(x)
    kept = model.prune_intermediate_layers([0, 1])
    c = CONFIGS[kind]["channels"]
    assert kept == [0, 1] and len(model.stages) == 2
    assert model.num_features == 2 * c
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        out = model(x)
    torch.testing.assert_close(inter[1], expected[1], rtol=0, atol=0)
    torch.testing.assert_close(final, expected[1], rtol=0, atol=0)
    assert out.shape == (1, 2 * c, 8, 8)


# --- optimizer integration --------------------------------------------------------------------


def test_group_matcher_and_layer_decay() -> None:
    model = tiny("clip")
    matcher = model.group_matcher()
    assert matcher["stem"] == r"^stem"
    layer_of = timm.models.group_parameters(model, matcher, reverse=True)
    blocks = [f"stages.{s}.blocks.{b}." for s, d in enumerate([1, 1, 3, 1]) for b in range(d)]
    ids = [layer_of[next(n for n in layer_of if n.startswith(p))] for p in blocks]
    assert layer_of["stem.conv1.weight"] == 0
    assert ids == list(range(1, len(blocks) + 1))  # one group per block, in order
    assert layer_of["stages.1.downsample.conv.weight"] == layer_of["stages.1.blocks.0.norm1.weight"]
    assert layer_of["stages.2.post_norms.1.weight"] == layer_of["stages.2.blocks.2.norm1.weight"]
    assert layer_of["stages.2.post_norms.0.weight"] == layer_of["stages.2.blocks.0.norm1.weight"]
    assert layer_of["stages.0.norm.weight"] == layer_of["stages.0.blocks.0.norm1.weight"]
    head_id = layer_of["head.fc.weight"]
    assert head_id == layer_of["fuse.proj_x4.weight"] == max(layer_of.values())
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    assert coarse["stages.2.blocks.1.mlp.fc1.weight"] == coarse["stages.2.post_norms.0.weight"]

    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05,
                                               layer_decay=0.9)
    scales = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scales[id(p)] = (group["lr_scale"], group["weight_decay"])
    named = dict(model.named_parameters())
    num_layers = max(layer_of.values()) + 1
    for name, p in named.items():
        scale, decay = scales[id(p)]
        assert scale == pytest.approx(0.9 ** (num_layers - 1 - layer_of[name])), name
        assert decay == (0.0 if p.ndim <= 1 else 0.05), name
    assert scales[id(named["stem.conv1.weight"])][0] < scales[id(named["head.fc.weight"])][0]


def test_no_weight_decay_and_offset_param_names() -> None:
    model = tiny("clip")
    names = set(dict(model.named_parameters()))
    patterns = model.no_weight_decay()
    assert isinstance(patterns, set) and patterns
    offset_names = model.dcn_offset_param_names()
    assert offset_names == internimage.dcn_offset_param_names(model)
    expected = {n for n in names if re.search(r"\.dcn\.(offset\.|center_feature_scale_proj)", n)}
    assert set(offset_names) == expected and expected
    assert not any(".mask." in n for n in offset_names)


# --- training behaviour ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_grad_checkpointing_is_identical(kind: str) -> None:
    model = tiny(kind).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.stages)
    out_cp = model(x)
    out_cp.square().mean().backward()
    torch.testing.assert_close(out_cp, out, rtol=0, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-6, atol=1e-9, msg=name)
    arch = "flash_internimage_t" if kind == "flash" else "internimage_t"
    with_cp = timm.create_model(arch, **CONFIGS[kind], with_cp=True)
    assert all(stage.grad_checkpointing for stage in with_cp.stages)


def test_drop_path_rates_follow_original_linspace() -> None:
    model = InternImage(**dict(TINY, depths=[2, 2, 2, 2]), drop_path_rate=0.7)
    rates = [block.drop_path.drop_prob if hasattr(block.drop_path, "drop_prob") else 0.0
             for stage in model.stages for block in stage.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.7, 8).tolist())
    model = InternImage(**TINY, drop_path_rate=0.3, drop_path_type="uniform")
    assert all(block.drop_path.drop_prob == 0.3 for s in model.stages for block in s.blocks)


# --- timm data pipeline, compile, layouts, dtypes ----------------------------------------------


def test_data_config_and_transform() -> None:
    model = tiny()
    config = timm.data.resolve_data_config(model=model)
    assert config["input_size"] == (3, 224, 224)
    assert config["interpolation"] == "bicubic" and config["crop_pct"] == 1.0
    assert config["mean"] == IMAGENET_DEFAULT_MEAN and config["std"] == IMAGENET_DEFAULT_STD
    transform = timm.data.create_transform(**config)
    image = Image.new("RGB", (300, 250), color=(120, 30, 200))
    tensor = transform(image)
    assert tensor.shape == (3, 224, 224)
    with torch.no_grad():
        assert model.eval()(tensor.unsqueeze(0)).shape == (1, 10)


def test_torch_compile_fullgraph_forward_backward_inductor() -> None:
    # One level (stem, one block, conv head) keeps inductor's C++ build to ~20 s on 2 cores.
    # A fresh dynamo: after other tests' compiles PyTorch would make the shapes dynamic, and
    # Inductor's dynamic backward hits pytorch/pytorch#185510 (see docs/deploy.md).
    torch._dynamo.reset()
    model = tiny(depths=[1], groups=[1])
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    expected = model(x)
    expected.square().sum().backward()
    grad_x = x.grad.clone()
    x.grad = None
    import torch._inductor.config as inductor_config

    # one compile worker: on a 2-core CI machine the worker pool costs more than it saves
    with inductor_config.patch(compile_threads=1):
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x)
        out.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, grad_x, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_clip_model_aot_eager() -> None:
    # full-graph capture (fake kernels, autograd registration) of the clip model, 2 levels
    model = tiny("clip", depths=[1, 1], groups=[1, 2], level2_post_norm=False)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    expected = model(x)
    expected.sum().backward()
    grad_x = x.grad.clone()
    x.grad = None
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, grad_x, rtol=1e-5, atol=1e-6)


def test_torch_fx_feature_extractor() -> None:
    from timm.models._features_fx import create_feature_extractor

    model = tiny("clip").eval()
    x = torch.randn(1, 3, 64, 64)
    extractor = create_feature_extractor(model, return_nodes={"stages.2": "c4", "head.fc": "out"})
    # fx's generated code is another code path than eager: float32 tolerances
    with torch.no_grad():
        out = extractor(x)
        _, inter = model.forward_intermediates(x)
        torch.testing.assert_close(out["c4"], inter[2])
        torch.testing.assert_close(out["out"], model(x))


@pytest.mark.parametrize("kind", KINDS)
def test_channels_last_input_and_model(kind: str) -> None:
    model = tiny(kind).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)),
                                   expected, rtol=1e-5, atol=1e-6)
        model = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_dtypes(kind: str, dtype: torch.dtype) -> None:
    model = tiny(kind).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        out = model.to(dtype)(x.to(dtype))
    assert out.dtype == dtype
    atol = 1e-5 if dtype == torch.float64 else 0.1 * expected.abs().max().item() + 0.05
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=atol)


def test_bfloat16_autocast() -> None:
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=0,
                               atol=0.1 * expected.abs().max().item() + 0.05)


# --- pretrained loading from a local original checkpoint ------------------------------------


def test_pretrained_from_local_original_checkpoint(tmp_path: Path) -> None:
    source = tiny(layer_scale=1e-5, post_norm=True).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    original = to_original_layout(source.state_dict())
    assert any(k.startswith("levels.0.downsample") for k in original)
    assert "conv_head.1.0.running_var" in original and "head.weight" in original
    path = tmp_path / "internimage_tiny_1k.pth"
    torch.save({"model": original, "epoch": 299, "max_accuracy": 12.5}, path)

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source(x)
    # the overlay names the file's head size, else timm drops the 10-class head (cfg: 1000)
    overlay = dict(file=str(path), num_classes=10)
    model = timm.create_model(
        "internimage_t", pretrained=True, pretrained_cfg_overlay=overlay,
        **dict(TINY, layer_scale=1e-5, post_norm=True),
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)

    # timm's pretrained adaptations still apply: new head, 1 input channel, features_only
    adapted = timm.create_model(
        "internimage_t", pretrained=True, pretrained_cfg_overlay=overlay,
        **dict(TINY, layer_scale=1e-5, post_norm=True, num_classes=5), in_chans=1,
    ).eval()
    assert adapted.stem.conv1.weight.shape[1] == 1
    assert adapted(torch.randn(1, 1, 64, 64)).shape == (1, 5)
    features = timm.create_model(
        "internimage_t", pretrained=True, pretrained_cfg_overlay=overlay,
        features_only=True, **dict(TINY, layer_scale=1e-5, post_norm=True),
    ).eval()
    with torch.no_grad():
        _, expected_inter = source.forward_intermediates(x)
        for ours, ref in zip(features(x), expected_inter, strict=True):
            torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_pretrained_from_golden_original_file(tmp_path: Path) -> None:
    """The golden file's state dict is in the exact original layout."""
    golden_path = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
    golden_path = golden_path / "model_h_like_clip.pt"
    if not golden_path.is_file():
        pytest.fail(f"golden file {golden_path} is missing (never skipped)")
    golden = torch.load(golden_path, weights_only=True)
    path = tmp_path / "h_like.pth"
    torch.save({"model": golden["state_dict"]}, path)
    config = {k: v for k, v in golden["config"].items() if k != "core_op"}
    model = timm.create_model("internimage_h", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                              **config)
    model = model.double().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(golden["input"]), golden["logits"], rtol=0, atol=1e-9)


# --- constructor ----------------------------------------------------------------------------


def test_constructor_accepts_original_keywords_and_validates() -> None:
    model = InternImage(core_op="DCNv3_pytorch", channels=16, depths=[1, 1, 1, 1],
                        groups=[1, 2, 4, 8], num_classes=10, mlp_ratio=4.0, drop_rate=0.0,
                        drop_path_rate=0.1, drop_path_type="linear", act_layer="GELU",
                        norm_layer="LN", layer_scale=None, offset_scale=1.0, post_norm=False,
                        cls_scale=1.5, with_cp=False, dw_kernel_size=None,
                        use_clip_projector=False, level2_post_norm=False,
                        level2_post_norm_block_ids=None, res_post_norm=False,
                        center_feature_scale=False, remove_center=False, in_chans=3)
    assert model.head_hidden_size == 192
    with pytest.raises(TypeError, match="img_size"):  # timm's contract: unknown kwargs raise
        InternImage(**TINY, img_size=224)
    with pytest.raises(TypeError, match="not_a_model_arg"):
        timm.create_model("internimage_t", pretrained=False, not_a_model_arg=1)
    for kwargs, match in [(dict(core_op="DCNv4"), "core_op"),
                          (dict(groups=[1, 2, 4]), "groups"),
                          (dict(drop_path_type="cosine"), "drop_path_type"),
                          (dict(norm_layer="GN"), "norm_layer"),
                          (dict(use_clip_projector=True, norm_layer="BN"), "norm_layer"),
                          (dict(depths=[1, 1, 2, 1], level2_post_norm=True,
                                level2_post_norm_block_ids=[5]), "level2_post_norm_block_ids")]:
        with pytest.raises(ValueError, match=match):
            InternImage(**dict(TINY, **kwargs))


@pytest.mark.parametrize("name, value, expected", [
    ("drop_path_rate", 1.5, "in [0, 1)"),
    ("drop_path_rate", -0.1, "in [0, 1)"),
    ("drop_path_rate", float("nan"), "in [0, 1)"),
    ("drop_rate", 1.0, "in [0, 1)"),
    ("head_drop_rate", 2, "in [0, 1)"),
    ("offset_scale", float("nan"), "a finite number > 0"),
    ("offset_scale", float("inf"), "a finite number > 0"),
    ("offset_scale", 0.0, "a finite number > 0"),
    ("offset_scale", True, "a finite number > 0"),
    ("mlp_ratio", 0, "a finite number > 0"),
    ("mlp_ratio", -4.0, "a finite number > 0"),
    ("mlp_ratio", "4", "a finite number > 0"),
    ("cls_scale", 0.0, "a finite number > 0"),
    ("layer_scale", float("inf"), "None or a finite number > 0"),
    ("layer_scale", 0.0, "None or a finite number > 0"),
    ("in_chans", 0, "an int >= 1"),
    ("in_chans", 1.5, "an int >= 1"),
    ("dw_kernel_size", 4, "None or an odd int >= 1"),
    ("dw_kernel_size", 0, "None or an odd int >= 1"),
])
def test_constructor_rejects_invalid_values(name: str, value: object, expected: str) -> None:
    """Each error names the argument, what was expected and what was given."""
    with pytest.raises((ValueError, TypeError)) as info:
        InternImage(**dict(TINY, **{name: value}))
    message = str(info.value)
    assert message.startswith(f"{name} must be {expected}, got "), message
    assert repr(value) in message, message


def test_constructor_accepts_numpy_scalars_and_boundaries() -> None:
    import numpy as np

    model = InternImage(**dict(TINY, drop_path_rate=np.float32(0.0), mlp_ratio=np.float64(2.0),
                               offset_scale=np.float64(2.0), in_chans=np.int64(1),
                               layer_scale=1e-5, dw_kernel_size=5))
    assert model.stem.conv1.in_channels == 1


def test_clip_model_needs_matching_stage_sizes() -> None:
    model = tiny("clip").eval()
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.randn(1, 3, 48, 48))


def test_remove_center_and_batchnorm_variants_run() -> None:
    model = tiny(remove_center=True, norm_layer="BN", act_layer="SiLU").eval()
    assert model.stages[0].blocks[0].dcn.offset.weight.shape[0] == 1 * 8 * 2
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
