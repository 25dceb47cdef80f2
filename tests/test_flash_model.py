"""FlashInternImage against the original model's golden vectors, the variants' exact sizes,
checkpoint loading through the shared filter, and the constructor's keywords.

Every ``../shared/golden-flash/model_*.pt`` file is rebuilt from its ``config`` (the original
constructor's keywords), loaded through ``checkpoint_filter_fn`` from the original key layout
and compared stage by stage. Golden stage maps are NHWC; ours are NCHW.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import (
    GOLDEN_FLASH_DIR,
    build_golden_model,
    golden_files,
    load_golden,
    nhwc,
    run_golden_model,
    to_original_layout,
)

from internimage import (
    DCNv4,
    FlashInternImage,
    InternImage,
    checkpoint_filter_fn,
    optimize_for_inference,
)

MODEL_FILES = golden_files("model_*.pt", GOLDEN_FLASH_DIR)
# golden-flash README, section 5: float64 vs primary 1e-9 (models); float32 per target.
F64_ATOL = 1e-9
F32_ATOL = dict(stem=5e-6, stages=3e-4, pre_logits=1e-4, logits=2e-5)


@pytest.fixture(scope="module", params=MODEL_FILES, ids=lambda p: p.stem)
def golden(request: pytest.FixtureRequest) -> dict:
    return torch.load(request.param, weights_only=True)


def build(golden: dict, core_op: str = "DCNv4", dtype: torch.dtype = torch.float64,
          ) -> FlashInternImage:
    return build_golden_model(FlashInternImage, golden, core_op, dtype)


def assert_matches(out: dict, golden: dict, suffix: str, atol: dict) -> None:
    """``out`` against the golden ``stem``/``stages``/``pre_logits``/``logits`` + ``suffix``
    (the ``_fp32`` tensors are float32: compared in float64)."""
    def check(ours: torch.Tensor, ref: torch.Tensor, what: str, tol: float) -> None:
        diff = (ours.double() - ref.double()).abs().max().item()
        assert ours.shape == ref.shape and diff <= tol, \
            f"{what}{suffix}: max abs diff {diff:.3g} > {tol:g} (shapes {ours.shape}, {ref.shape})"

    check(nhwc(out["stem"]), golden["stem" + suffix], "stem", atol["stem"])
    assert len(out["stages"]) == len(golden["stages" + suffix]) == 4
    for i, (ours, ref) in enumerate(zip(out["stages"], golden["stages" + suffix],
                                        strict=True)):
        check(nhwc(ours), ref, f"stage {i}", atol["stages"])
    for key in ("pre_logits", "logits"):
        check(out[key], golden[key + suffix], key, atol[key])


@pytest.mark.parametrize("core_op", ["DCNv4", "DCNv4_pytorch"])
def test_golden_float64(golden: dict, core_op: str) -> None:
    model = build(golden, core_op)
    assert sum(p.numel() for p in model.parameters()) == golden["meta"]["param_count"]
    out = run_golden_model(model, golden["input"])
    assert_matches(out, golden, "", dict.fromkeys(F32_ATOL, F64_ATOL))


@pytest.mark.parametrize("optimized", [False, True], ids=["plain", "optimize_for_inference"])
def test_golden_float32(golden: dict, optimized: bool) -> None:
    model = build(golden, dtype=torch.float32)
    if optimized:
        model = optimize_for_inference(model)
    out = run_golden_model(model, golden["input"].float())
    assert_matches(out, golden, "", F32_ATOL)
    # and against the original model run entirely in float32
    assert_matches(out, golden, "_fp32", F32_ATOL)


def test_golden_channels_last_input(golden: dict) -> None:
    model = build(golden)
    x = golden["input"].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits, golden["logits"], rtol=0, atol=F64_ATOL)


def test_golden_padding_rows_of_offset_mask_are_never_read(golden: dict) -> None:
    """The offset_mask projections' rows past 3GK (nonzero garbage in the golden state dict)
    do not change anything: replacing them gives bit-identical logits."""
    model = build(golden)
    x = golden["input"]
    with torch.no_grad():
        expected = model(x)
        changed = 0
        for module in model.modules():
            if isinstance(module, DCNv4):
                used = 3 * module.group * module.points
                module.offset_mask.weight[used:] = 1e3
                module.offset_mask.bias[used:] = -1e3
                changed += module.offset_mask.out_features > used
        assert changed >= 2  # groups 2 and 4 pad (54 -> 56, 108 -> 112); 8 and 16 do not
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        # while a used row (the last group's last mask value) matters
        first = model.stages[0].blocks[0].dcn
        first.offset_mask.bias[3 * first.group * first.points - 1] += 1.0
        assert not torch.equal(model(x), expected)


def test_golden_state_dict_layout_round_trip(golden: dict) -> None:
    """Every original key maps to exactly one of ours, back again, and a converted dict
    passes through the filter unchanged."""
    model = FlashInternImage(**golden["config"])
    converted = checkpoint_filter_fn(golden["state_dict"], model)
    assert len(converted) == len(golden["state_dict"]) == len(model.state_dict())
    assert set(converted) == set(model.state_dict())
    assert set(to_original_layout(converted)) == set(golden["state_dict"])
    assert checkpoint_filter_fn(converted, model).keys() == converted.keys()


def test_pretrained_from_golden_original_file(tmp_path: Path) -> None:
    """timm's pretrained loading of an original-layout file, through the filter."""
    golden = load_golden_flash("model_flash_l_like.pt")
    path = tmp_path / "flash_l_like.pth"
    torch.save({"model": golden["state_dict"], "epoch": 19}, path)
    config = {k: v for k, v in golden["config"].items() if k != "core_op"}
    model = timm.create_model("flash_internimage_l", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                              **config)
    model = model.double().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(golden["input"]), golden["logits"], rtol=0,
                                   atol=F64_ATOL)


def load_golden_flash(name: str) -> dict:
    path = GOLDEN_FLASH_DIR / name
    if not path.is_file():
        pytest.fail(f"golden file {path} is missing (never skipped)")
    return torch.load(path, weights_only=True)


def test_filter_names_the_family_of_a_mismatched_checkpoint() -> None:
    flash = load_golden_flash("model_flash_t_like.pt")
    dcnv3 = load_golden("model_t_like.pt")
    with pytest.raises(ValueError, match=r"this is a FlashInternImage \(DCNv4\) state dict "
                                         r".*, the model is an InternImage \(DCNv3\): build "
                                         r"flash_internimage_\* "):
        checkpoint_filter_fn(flash["state_dict"], InternImage(**dcnv3["config"]))
    with pytest.raises(ValueError, match=r"this is an InternImage \(DCNv3\) state dict .*, the "
                                         r"model is a FlashInternImage \(DCNv4\): build "
                                         r"internimage_\* "):
        checkpoint_filter_fn(dcnv3["state_dict"], FlashInternImage(**flash["config"]))


# --- the released variants ----------------------------------------------------------------

# golden-flash README, section 7: the original class with each variant's build.py kwargs.
PARAMS_1K = dict(t=29_815_528, s=50_067_496, b=97_448_960, l=223_297_080)
HEAD_PARAMS = dict(t=769_000, s=961_000, b=1_345_000, l=1_921_000)
DCN_PARAMS = dict(t=8_539_648, s=14_601_696, b=28_535_032, l=66_118_000)
BUFFERS = dict(t=1_537, s=1_921, b=2_689, l=3_841)
STATE_KEYS = dict(t=393, s=553, b=553, l=691)
OFFSET_MASK_WIDTHS = dict(t=[112, 216, 432, 864], s=[136, 272, 544, 1080],
                          b=[192, 384, 760, 1512], l=[272, 544, 1080, 2160])


@pytest.mark.parametrize("variant", list(PARAMS_1K))
def test_variant_sizes_on_meta(variant: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(f"flash_internimage_{variant}")
    assert next(model.parameters()).is_meta
    assert sum(p.numel() for p in model.parameters()) == PARAMS_1K[variant]
    assert sum(p.numel() for p in model.head.fc.parameters()) == HEAD_PARAMS[variant]
    dcns = [m for m in model.modules() if isinstance(m, DCNv4)]
    assert sum(p.numel() for m in dcns for p in m.parameters()) == DCN_PARAMS[variant]
    assert sum(b.numel() for b in model.buffers()) == BUFFERS[variant]
    assert len(model.state_dict()) == STATE_KEYS[variant]
    assert [stage.blocks[0].dcn.offset_mask.out_features for stage in model.stages] == \
        OFFSET_MASK_WIDTHS[variant]
    if variant == "l":
        model.reset_classifier(21841)
        assert sum(p.numel() for p in model.parameters()) == 263_332_641


def test_variant_flags_follow_the_released_configs() -> None:
    """The flags that set the variants apart (README table): gammas, level norms, dw conv,
    biases, offset_scale."""
    expected = dict(  # gammas, level norms, dw conv, dcn output bias, fc2 bias, offset_scale
        t=(False, True, False, False, False, 1.0), s=(True, False, True, False, False, 1.0),
        b=(True, False, True, False, False, 0.5), l=(True, False, True, True, True, 2.0))
    for variant, flags in expected.items():
        with torch.device("meta"):
            model = timm.create_model(f"flash_internimage_{variant}")
        block = model.stages[0].blocks[0]
        assert (
            block.gamma1 is not None,
            not isinstance(model.stages[0].norm, torch.nn.Identity),
            isinstance(block.dcn.offset_mask_dw, torch.nn.Conv2d),
            block.dcn.output_proj.bias is not None,
            block.mlp.fc2.bias is not None,
            block.dcn.offset_scale,
        ) == flags, variant


# --- constructor ----------------------------------------------------------------------------

TINY = dict(channels=32, depths=[1, 1, 1, 1], groups=[2, 4, 8, 16], num_classes=10)


def test_constructor_accepts_the_original_keywords_and_defaults() -> None:
    model = FlashInternImage(
        core_op="DCNv4_pytorch", channels=32, depths=[1, 1, 1, 1], groups=[2, 4, 8, 16],
        num_classes=10, mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.1,
        drop_path_type="linear", act_layer="GELU", norm_layer="LN", layer_scale=None,
        offset_scale=0.5, post_norm=False, cls_scale=1.5, with_cp=False, mlp_fc2_bias=False,
        dcn_output_bias=False, dw_kernel_size=None, use_clip_projector=False,
        level2_post_norm=False, level2_post_norm_block_ids=None, res_post_norm=False,
        center_feature_scale=False, in_chans=3)
    assert model.head_hidden_size == 384
    default = FlashInternImage(**TINY)
    dcn = default.stages[0].blocks[0].dcn
    assert dcn.offset_scale == 0.5 and dcn.core_op == "DCNv4"  # the original's defaults
    assert default.stages[0].blocks[0].mlp.fc2.bias is None and dcn.output_proj.bias is None
    # center_feature_scale keeps the level norms with post_norm and never reaches the DCN
    cfs = FlashInternImage(**TINY, post_norm=True, center_feature_scale=True)
    assert not isinstance(cfs.stages[0].norm, torch.nn.Identity)
    assert cfs.stages[0].blocks[0].dcn.center_feature_scale_proj_weight is None


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(core_op="DCNv3"), ValueError, r"core_op must be one of \['DCNv4', 'DCNv4_pytorch'\]"),
    (dict(use_clip_projector=True), ValueError, "use_clip_projector=True is not supported"),
    (dict(mlp_fc2_bias=1), TypeError, "mlp_fc2_bias must be a bool, got int 1"),
    (dict(remove_center=True), TypeError, "remove_center"),
    (dict(meta_dim=64), TypeError, "meta_dim"),
    (dict(offset_scale=0.0), ValueError, "offset_scale must be a finite number > 0"),
    (dict(dw_kernel_size=4), ValueError, "dw_kernel_size must be None or an odd int"),
    (dict(groups=[2, 4, 8]), ValueError, "groups must have 4 entries"),
])
def test_constructor_rejects(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        FlashInternImage(**dict(TINY, **kwargs))


def test_forward_takes_no_metadata_and_trains() -> None:
    torch.manual_seed(0)
    model = timm.create_model("flash_internimage_t", **TINY, drop_path_rate=0.1,
                              layer_scale=1.0)
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(TypeError):
        model(x, torch.zeros(2, 4))
    model(x).logsumexp(-1).sum().backward()
    # the zero-initialised offset_mask projection gets a gradient: the DCN is live
    grad = model.stages[0].blocks[0].dcn.offset_mask.weight.grad
    assert grad is not None and grad.abs().sum() > 0


# --- registration, pretrained cfgs, TorchScript and torch.compile ---------------------------

RELEASED = {  # the DCNv4 README's classification checkpoints (golden-flash README, section 7)
    "flash_internimage_t.in1k": ("flash_intern_image_t_1k_224.pth", 224),
    "flash_internimage_s.in1k": ("flash_intern_image_s_1k_224.pth", 224),
    "flash_internimage_b.in1k": ("flash_intern_image_b_1k_224.pth", 224),
    "flash_internimage_l.in22k_ft_in1k_384": ("flash_internimage_l_22kto1k_384.pth", 384),
}


def test_registered_models_and_pretrained_cfgs() -> None:
    names = [f"flash_internimage_{v}" for v in "tsbl"]
    assert sorted(timm.list_models("flash_internimage*")) == sorted(names)
    assert sorted(timm.list_models(module="flash_internimage")) == sorted(names)
    assert sorted(timm.list_models("flash_internimage*", pretrained=True)) == sorted(RELEASED)
    for tag, (filename, size) in RELEASED.items():
        cfg = timm.models.get_pretrained_cfg(tag).to_dict()
        assert (cfg["hf_hub_id"], cfg["hf_hub_filename"]) == ("OpenGVLab/DCNv4", filename)
        assert cfg["input_size"] == (3, size, size) and cfg["pool_size"] == (size // 32,) * 2
        assert cfg["num_classes"] == 1000 and cfg["crop_pct"] == 1.0
        assert cfg["interpolation"] == "bicubic" and cfg["license"] == "mit"
        assert cfg["paper_ids"] == "arXiv:2401.06197"
        assert cfg["origin_url"] == "https://github.com/OpenGVLab/DCNv4"
        assert (cfg["first_conv"], cfg["classifier"]) == ("stem.conv1", "head.fc")


def scripting(model: torch.nn.Module) -> torch.jit.ScriptModule:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.14
        return torch.jit.script(model)


@pytest.mark.parametrize("core_op", ["DCNv4", "DCNv4_pytorch"])
def test_torchscript_script_matches_eager(core_op: str) -> None:
    golden = load_golden_flash("model_flash_l_like.pt")
    model = build(golden, core_op, torch.float32)
    scripted = scripting(model)
    ops = str(scripted.inlined_graph).count("internimage::dcnv4")
    assert ops == (sum(golden["config"]["depths"]) if core_op == "DCNv4" else 0)
    x = golden["input"].float()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x))


def test_torch_compile_fullgraph_forward_backward() -> None:
    torch.manual_seed(0)
    model = FlashInternImage(channels=32, depths=[1, 1], groups=[2, 4], num_classes=10,
                             dw_kernel_size=3, layer_scale=1.0, post_norm=True,
                             drop_path_rate=0.0)  # (the constructor's default is 0.2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DCNv4):
                torch.nn.init.normal_(module.offset_mask.weight, std=0.1)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    expected = model(x)
    expected.square().sum().backward()
    grad_x = x.grad.clone()
    x.grad = None
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, grad_x, rtol=1e-5, atol=1e-6)
