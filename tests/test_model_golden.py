"""InternImage against the original model's golden vectors, and the variants' parameter counts.

Every ``/work/shared/golden/model_*.pt`` file is rebuilt from its ``config`` (the original
constructor's keywords), loaded through ``checkpoint_filter_fn`` from the original key layout
and compared stage by stage. Golden stage maps are NHWC; ours are NCHW.
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import build_golden_model, load_golden, nhwc, run_golden_model

from internimage import InternImage, checkpoint_filter_fn, optimize_for_inference

MODEL_FILES = (
    "model_t_like.pt",
    "model_b_like_layerscale_postnorm.pt",
    "model_h_like_clip.pt",
)
# README tolerances: float64 vs primary 1e-9 (models); float32 ~5e-5 on stage features and
# ~5e-6 on logits.
F64_ATOL = 1e-9
F32_STAGE_ATOL = 5e-5
F32_LOGITS_ATOL = 5e-6



@pytest.fixture(scope="module", params=MODEL_FILES)
def golden(request: pytest.FixtureRequest) -> dict:
    return load_golden(request.param)


def build(golden: dict, core_op: str, dtype: torch.dtype) -> InternImage:
    return build_golden_model(InternImage, golden, core_op, dtype)


@pytest.mark.parametrize("core_op", ["DCNv3", "DCNv3_pytorch"])
def test_golden_float64(golden: dict, core_op: str) -> None:
    model = build(golden, core_op, torch.float64)
    assert sum(p.numel() for p in model.parameters()) == golden["meta"]["param_count"]
    out = run_golden_model(model, golden["input"])
    torch.testing.assert_close(nhwc(out["stem"]), golden["stem"], rtol=0, atol=F64_ATOL,
                               msg="stem")
    assert len(out["stages"]) == len(golden["stages"]) == 4
    for i, (ours, ref) in enumerate(zip(out["stages"], golden["stages"], strict=True)):
        torch.testing.assert_close(nhwc(ours), ref, rtol=0, atol=F64_ATOL, msg=f"stage {i}")
    torch.testing.assert_close(out["pre_logits"], golden["pre_logits"], rtol=0, atol=F64_ATOL,
                               msg="pre_logits")
    torch.testing.assert_close(out["logits"], golden["logits"], rtol=0, atol=F64_ATOL,
                               msg="logits")


@pytest.mark.parametrize("optimized", [False, True], ids=["plain", "optimize_for_inference"])
def test_golden_float32(golden: dict, optimized: bool) -> None:
    model = build(golden, "DCNv3", torch.float32)
    if optimized:
        model = optimize_for_inference(model)
    out = run_golden_model(model, golden["input"].float())
    for i, (ours, ref) in enumerate(zip(out["stages"], golden["stages"], strict=True)):
        torch.testing.assert_close(nhwc(ours).double(), ref, rtol=0, atol=F32_STAGE_ATOL,
                                   msg=f"stage {i}")
    torch.testing.assert_close(out["pre_logits"].double(), golden["pre_logits"], rtol=0,
                               atol=F32_LOGITS_ATOL, msg="pre_logits")
    torch.testing.assert_close(out["logits"].double(), golden["logits"], rtol=0,
                               atol=F32_LOGITS_ATOL, msg="logits")
    # and against the untouched official model run in float32
    torch.testing.assert_close(out["logits"], golden["logits_fp32"], rtol=0,
                               atol=F32_LOGITS_ATOL)


def test_golden_channels_last_input(golden: dict) -> None:
    model = build(golden, "DCNv3", torch.float64)
    x = golden["input"].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits, golden["logits"], rtol=0, atol=F64_ATOL)


def test_golden_state_dict_layout_round_trip(golden: dict) -> None:
    """Every original key maps to exactly one of ours, and a converted dict passes through."""
    model = InternImage(**golden["config"])
    converted = checkpoint_filter_fn(golden["state_dict"], model)
    assert len(converted) == len(golden["state_dict"]) == len(model.state_dict())
    assert set(converted) == set(model.state_dict())
    assert checkpoint_filter_fn(converted, model).keys() == converted.keys()


# Parameter counts of the official class with a 1000-class head (original-internimage.md 1.2)
# and with the 21841-class head; state-dict key counts where documented.
PARAMS_1K = dict(t=29_918_424, s=50_079_880, b=97_461_832, l=223_334_810, xl=334_819_780,
                 h=1_089_636_760, g=3_076_373_352)
PARAMS_22K = dict(l=263_370_371, xl=382_858_285, h=1_105_663_489, g=3_092_400_081)
STATE_KEYS = dict(t=633, b=751, h=1357, g=1295)


@pytest.mark.parametrize("variant", list(PARAMS_1K))
def test_variant_parameter_counts_on_meta(variant: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(f"internimage_{variant}")
        assert next(model.parameters()).is_meta
        assert sum(p.numel() for p in model.parameters()) == PARAMS_1K[variant]
        if variant in STATE_KEYS:
            assert len(model.state_dict()) == STATE_KEYS[variant]
        if variant in PARAMS_22K:
            model.reset_classifier(21841)
            assert sum(p.numel() for p in model.parameters()) == PARAMS_22K[variant]


def test_internimage_t_small_forward() -> None:
    torch.manual_seed(0)
    model = timm.create_model("internimage_t").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features)
    assert features.shape == (1, 512, 2, 2)
    assert logits.shape == (1, 1000)
    assert torch.isfinite(logits).all()
