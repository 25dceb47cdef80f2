"""The iNaturalist metadata head (the original's ``intern_image_meta_former``): layout, loading,
numerics against a functional re-computation, timm integration and the metadata encoding."""

from __future__ import annotations

import math
import warnings
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import load_golden
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

from internimage import InternImage, MetadataHead, checkpoint_filter_fn, encode_inat_metadata

META_DIM = 16  # small width for the numeric tests (the released model uses 64)
GOLDEN = {"clip": "model_h_like_clip.pt", "conv": "model_b_like_layerscale_postnorm.pt"}


@pytest.fixture(scope="module", params=["clip", "conv"])
def golden(request: pytest.FixtureRequest) -> dict:
    """Golden file from the original code: original-layout state dict, input, logits."""
    return load_golden(GOLDEN[request.param])


def original_meta_state(dim: int, num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random metadata-head tensors under the original's key names (float64 holding float32
    values, so that a float32 model loads them exactly, like the fp16 golden weights)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def linear(prefix: str, out_f: int, in_f: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": (rand(out_f, in_f) / math.sqrt(in_f)).double(),
                f"{prefix}.bias": (0.1 * rand(out_f)).double()}

    def norm(prefix: str, width: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": (1 + 0.2 * rand(width)).double(),
                f"{prefix}.bias": (0.2 * rand(width)).double()}

    sd: dict[str, torch.Tensor] = {}
    for branch, in_f in (("meta_head_1", 4), ("meta_head_2", 3)):
        sd |= linear(f"{branch}.0", dim, in_f) | norm(f"{branch}.2", dim)
        sd |= linear(f"{branch}.3.w1", dim, dim) | norm(f"{branch}.3.norm_fn1", dim)
        sd |= linear(f"{branch}.3.w2", dim, dim) | norm(f"{branch}.3.norm_fn2", dim)
    sd |= norm("meta_norm", 2 * dim) | linear("meta_head", num_classes, 2 * dim)
    return sd


def reference_meta_logits(sd: dict, temporal: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    """The original's metadata logits, written out with torch.nn.functional."""

    def ln(x: torch.Tensor, prefix: str, eps: float) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)

    def lin(x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.linear(x, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    def branch(x: torch.Tensor, p: str) -> torch.Tensor:
        x = ln(F.relu(lin(x, f"{p}.0")), f"{p}.2", 1e-5)  # Linear, ReLU, LayerNorm()
        y = ln(F.relu(lin(x, f"{p}.3.w1")), f"{p}.3.norm_fn1", 1e-5)  # MetaEncoder
        y = ln(F.relu(lin(y, f"{p}.3.w2")), f"{p}.3.norm_fn2", 1e-5)
        return x + y

    meta = torch.cat([branch(temporal, "meta_head_1"), branch(spatial, "meta_head_2")], dim=-1)
    return lin(ln(meta, "meta_norm", 1e-6), "meta_head")


def meta_model_and_state(golden: dict, seed: int = 0) -> tuple[InternImage, dict]:
    """Small meta model (float64, eval) loaded strictly from an original-layout state dict."""
    num_classes = golden["config"]["num_classes"]
    original = dict(golden["state_dict"]) | original_meta_state(META_DIM, num_classes, seed)
    model = InternImage(**golden["config"], meta_dim=META_DIM).double().eval()
    result = model.load_state_dict(checkpoint_filter_fn({"model": original}, model))
    assert not result.missing_keys and not result.unexpected_keys
    return model, original


def metadata(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randn(n, 3, generator=g, dtype=torch.float64))


# --- architecture -----------------------------------------------------------------------------


def linear_params(in_f: int, out_f: int) -> int:
    return in_f * out_f + out_f


def test_parameter_counts_on_meta() -> None:
    num_classes, dim, clip_out = 8142, 64, 768
    ln = 2 * dim  # LayerNorm(dim): weight + bias

    def branch(in_f: int) -> int:  # Linear(in_f, dim), LN, MetaEncoder(dim)
        return linear_params(in_f, dim) + ln + 2 * (linear_params(dim, dim) + ln)

    meta_head = branch(4) + branch(3) + 2 * (2 * dim) + linear_params(2 * dim, num_classes)
    assert meta_head == 1_068_558  # the original class's metadata modules at 8142 classes
    h_1k = 1_089_636_760  # InternImage-H with a 1000-class head (tests/test_model_golden.py)
    h_inat = h_1k - linear_params(clip_out, 1000) + linear_params(clip_out, num_classes)
    with torch.device("meta"):
        model = timm.create_model("internimage_h_meta")
    assert model.num_classes == num_classes and model.meta_dim == dim
    assert sum(p.numel() for p in model.meta_head.parameters()) == meta_head
    assert sum(p.numel() for p in model.parameters()) == h_inat + meta_head
    assert len(model.state_dict()) == 1357 + 28  # H's keys + the metadata head's


def test_no_meta_dim_keeps_the_model_unchanged() -> None:
    config = load_golden(GOLDEN["clip"])["config"]
    plain = InternImage(**config)
    assert plain.meta_head is None and plain.meta_dim is None
    assert not any(k.startswith("meta") for k in plain.state_dict())
    with_meta = InternImage(**config, meta_dim=8)
    extra = set(with_meta.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("meta_head.") for k in extra)
    assert set(plain.state_dict()) <= set(with_meta.state_dict())
    for bad in (0, -1, 2.0, True, "64"):
        with pytest.raises(ValueError, match="meta_dim"):
            InternImage(**config, meta_dim=bad)


def test_metadata_head_init_and_reset() -> None:
    head = MetadataHead(num_classes=5, dim=8)
    assert [name for name, _ in head.named_children()] == ["temporal", "spatial", "norm", "fc"]
    assert head.temporal.norm.eps == 1e-5 and head.temporal.block.norm2.eps == 1e-5
    assert head.norm.eps == 1e-6
    model = InternImage(**load_golden(GOLDEN["conv"])["config"], meta_dim=8)
    mh = model.meta_head
    assert torch.equal(mh.temporal.proj.bias, torch.zeros(8))  # the model's Linear init
    assert torch.equal(mh.spatial.block.norm1.weight, torch.ones(8))
    assert 0.01 < mh.fc.weight.std().item() < 0.03
    out = mh(torch.randn(2, 4), torch.randn(2, 3))
    assert out.shape == (2, 10)
    mh.reset(3)
    assert mh.fc.out_features == 3 and mh.num_classes == 3
    mh.reset(0)
    assert isinstance(mh.fc, torch.nn.Identity)
    assert mh(torch.randn(2, 4), torch.randn(2, 3)).shape == (2, 16)


# --- checkpoint filter and numerics -------------------------------------------------------------


def test_filter_maps_original_meta_keys() -> None:
    sd = original_meta_state(8, 10)
    converted = checkpoint_filter_fn(sd)
    pairs = {
        "meta_head_1.0.weight": "meta_head.temporal.proj.weight",
        "meta_head_1.2.bias": "meta_head.temporal.norm.bias",
        "meta_head_1.3.w1.weight": "meta_head.temporal.block.fc1.weight",
        "meta_head_1.3.norm_fn1.weight": "meta_head.temporal.block.norm1.weight",
        "meta_head_2.3.w2.bias": "meta_head.spatial.block.fc2.bias",
        "meta_head_2.3.norm_fn2.bias": "meta_head.spatial.block.norm2.bias",
        "meta_head_2.0.bias": "meta_head.spatial.proj.bias",
        "meta_norm.weight": "meta_head.norm.weight",
        "meta_head.weight": "meta_head.fc.weight",  # not mistaken for the image 'head.weight'
        "meta_head.bias": "meta_head.fc.bias",
    }
    for original, ours in pairs.items():
        assert converted[ours] is sd[original], (original, ours)
    assert len(converted) == len(sd) == 28
    assert not any(k.startswith("head.") for k in converted)
    # the transformers-port style 'model.' prefix and DDP's 'module.' are stripped as well
    assert checkpoint_filter_fn({f"model.{k}": v for k, v in sd.items()}).keys() == \
        converted.keys()
    assert checkpoint_filter_fn({f"module.{k}": v for k, v in sd.items()}).keys() == \
        converted.keys()


def test_filter_drops_the_metadata_head_for_a_plain_model(golden: dict) -> None:
    """The iNat meta-former file loads strictly into a model without meta_dim: the image
    network only, with the meta model's features and image-head logits."""
    meta_model, original = meta_model_and_state(golden)
    plain = InternImage(**golden["config"]).double().eval()
    converted = checkpoint_filter_fn({"model": original}, plain)
    assert not any(k.startswith("meta_head") for k in converted)
    result = plain.load_state_dict(converted)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        features = meta_model.forward_features(x)
        torch.testing.assert_close(plain.forward_features(x), features)
        torch.testing.assert_close(plain(x), meta_model.head(features))


def test_forward_matches_the_original_formula(golden: dict) -> None:
    model, original = meta_model_and_state(golden)
    x = golden["input"]
    temporal, spatial = metadata(x.shape[0])
    converted = checkpoint_filter_fn(original, model)
    assert checkpoint_filter_fn(converted, model).keys() == converted.keys()  # pass-through
    with torch.no_grad():
        image = model.head(model.forward_features(x))  # the image classifier alone
        out = model(x, temporal, spatial)
    torch.testing.assert_close(image, golden["logits"], rtol=0, atol=1e-9)  # original code
    expected = golden["logits"] + reference_meta_logits(original, temporal, spatial)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    assert (reference_meta_logits(original, temporal, spatial).abs() > 0.1).any()


def test_missing_metadata_is_zeros_and_pre_logits_ignores_it(golden: dict) -> None:
    model, original = meta_model_and_state(golden)
    x = golden["input"]
    n = x.shape[0]
    temporal, spatial = metadata(n)
    zeros_t = torch.zeros(n, 4, dtype=torch.float64)
    zeros_s = torch.zeros(n, 3, dtype=torch.float64)
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(model(x), model(x, zeros_t, zeros_s), rtol=0, atol=0)
        torch.testing.assert_close(model(x, temporal), model(x, temporal, zeros_s), rtol=0, atol=0)
        torch.testing.assert_close(model(x, spatial=spatial), model(x, zeros_t, spatial),
                                   rtol=0, atol=0)
        torch.testing.assert_close(
            model(x), golden["logits"] + reference_meta_logits(original, zeros_t, zeros_s),
            rtol=0, atol=1e-9)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (n, model.head_hidden_size)
        torch.testing.assert_close(
            model.forward_head(features, pre_logits=True, temporal=temporal, spatial=spatial),
            pooled, rtol=0, atol=0)
        # float32 metadata goes to the model's dtype
        torch.testing.assert_close(model(x, temporal.float(), spatial.float()),
                                   model(x, temporal.float().double(), spatial.float().double()),
                                   rtol=0, atol=0)


def test_metadata_errors() -> None:
    config = load_golden(GOLDEN["conv"])["config"]
    model = InternImage(**config, meta_dim=8).eval()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    cases = [
        (dict(temporal=torch.zeros(2, 3)),
         r"temporal must have shape \(N, 4\) = \(2, 4\).*\[2, 3\]"),
        (dict(spatial=torch.zeros(2, 4)), r"spatial must have shape \(N, 3\).*\[2, 4\]"),
        (dict(temporal=torch.zeros(3, 4)), r"temporal .*batch of 2 images, got \[3, 4\]"),
        (dict(spatial=torch.zeros(3)), r"spatial .*got \[3\]"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            model(x, **kwargs)
        with pytest.raises(ValueError, match=match):
            model.forward_head(features, pre_logits=True, **kwargs)
    plain = InternImage(**config).eval()
    with pytest.raises(ValueError, match=r"temporal must be None for a model without a "
                                         r"metadata head.*\[2, 4\]"):
        plain(x, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"spatial must be None for a model without"):
        plain.forward_head(plain.forward_features(x), spatial=torch.zeros(2, 3))


def test_reset_classifier_resets_the_metadata_classifier(golden: dict) -> None:
    model, _ = meta_model_and_state(golden)
    x = golden["input"]
    temporal, spatial = metadata(x.shape[0])
    model.reset_classifier(7)
    assert model.meta_head.fc.out_features == 7 and model.meta_head.num_classes == 7
    assert model.meta_head.fc.weight.dtype == torch.float64
    with torch.no_grad():
        features = model.forward_features(x)
        image = model.head(features)  # the image classifier alone
        meta = model.meta_head(temporal, spatial)
        assert meta.shape == image.shape == (x.shape[0], 7)
        torch.testing.assert_close(model(x, temporal, spatial), image + meta, rtol=0, atol=1e-12)
    model.reset_classifier(0)  # no classifiers: features only, metadata skipped
    assert isinstance(model.meta_head.fc, torch.nn.Identity)
    with torch.no_grad():
        pooled = model.forward_head(features, pre_logits=True)
        torch.testing.assert_close(model(x, temporal, spatial), pooled, rtol=0, atol=0)
        assert model(x).shape == (x.shape[0], model.head_hidden_size)
    # a 4-D per-pixel classifier gets the metadata logits at every pixel
    model.reset_classifier(5, "", reset_other=True)
    model.double()  # after reset_other the head has no parameter left to take the dtype from
    with torch.no_grad():
        out = model(x, temporal, spatial)
        assert out.ndim == 4 and out.shape[:2] == (x.shape[0], 5)
        expected = model.head(features) + model.meta_head(temporal, spatial)[:, :, None, None]
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_group_matcher_puts_the_metadata_head_with_the_head() -> None:
    model = InternImage(**load_golden(GOLDEN["clip"])["config"], meta_dim=8)
    layer_of = timm.models.group_parameters(model, model.group_matcher(), reverse=True)
    last = max(layer_of.values())
    meta_names = [n for n in layer_of if n.startswith("meta_head.")]
    assert len(meta_names) == 28
    assert all(layer_of[n] == last == layer_of["head.fc.weight"] for n in meta_names)
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    assert coarse["meta_head.fc.weight"] == coarse["head.fc.weight"] == max(coarse.values())
    # the metadata Linears are decayed like every other Linear (1-D params: timm skips them)
    decayed = [n for n in meta_names if n.endswith(".weight") and "norm" not in n]
    assert len(decayed) == 7
    assert not any(fnmatch(n, p) for p in model.no_weight_decay() for n in decayed)


# --- TorchScript, fx, timm --------------------------------------------------------------------


def test_torchscript_script_matches_eager(golden: dict) -> None:
    model, _ = meta_model_and_state(golden)
    x = golden["input"]
    temporal, spatial = metadata(x.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x, temporal, spatial), model(x, temporal, spatial),
                                   rtol=0, atol=0)
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(scripted(x, temporal), model(x, temporal), rtol=0, atol=0)
        features = model.forward_features(x)
        torch.testing.assert_close(
            scripted.forward_head(features, True, temporal, spatial),
            model.forward_head(features, pre_logits=True), rtol=0, atol=0)
        with pytest.raises(torch.jit.Error, match="temporal must have shape"):
            scripted(x, temporal[:, :3])


def test_fx_graph_takes_optional_metadata(golden: dict) -> None:
    model, _ = meta_model_and_state(golden)
    x = golden["input"]
    temporal, spatial = metadata(x.shape[0])
    _, eval_nodes = get_graph_node_names(model)
    extractor = create_feature_extractor(model, {eval_nodes[-1]: "out", "meta_head.fc": "meta"})
    with torch.no_grad():
        out = extractor(x, temporal, spatial)
        torch.testing.assert_close(out["out"], model(x, temporal, spatial), rtol=0, atol=0)
        torch.testing.assert_close(out["meta"], model.meta_head(temporal, spatial),
                                   rtol=0, atol=0)
        torch.testing.assert_close(extractor(x)["out"], model(x), rtol=0, atol=0)
        with pytest.raises(ValueError, match="spatial must have shape"):
            extractor(x, temporal, temporal)


def test_registered_tag() -> None:
    cfg = timm.models.get_pretrained_cfg("internimage_h_meta.inat18_384").to_dict()
    assert cfg["hf_hub_id"] == "OpenGVLab/InternImage"
    assert cfg["hf_hub_filename"] == "internimage_h_22ktoinat18_384.pth"
    assert cfg["num_classes"] == 8142
    assert cfg["input_size"] == (3, 384, 384) and cfg["pool_size"] == (24, 24)
    assert cfg["classifier"] == ("head.fc", "meta_head.fc")
    assert "metadata" in cfg["notes"][0]
    assert "internimage_h_meta" in timm.list_models("internimage*")


def save_original_file(tmp_path: Path, golden: dict) -> tuple[Path, InternImage, dict]:
    model, original = meta_model_and_state(golden)
    path = tmp_path / "internimage_h_like_inat.pth"
    torch.save({"model": original, "epoch": 99}, path)
    return path, model, original


def test_timm_pretrained_from_original_file(tmp_path: Path) -> None:
    golden = load_golden(GOLDEN["clip"])
    path, source, _ = save_original_file(tmp_path, golden)
    config = {k: v for k, v in golden["config"].items() if k not in ("core_op", "num_classes")}
    x = golden["input"]
    temporal, spatial = metadata(x.shape[0])
    # the overlay names the file's head size, else timm drops both classifiers (cfg: 8142)
    model = timm.create_model(
        "internimage_h_meta", pretrained=True, meta_dim=META_DIM, num_classes=10,
        pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **config,
    ).double().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, temporal, spatial), source(x, temporal, spatial),
                                   rtol=0, atol=1e-9)
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=1e-9)
    # another class count: timm drops both classifiers ('classifier' lists them), loads the rest
    adapted = timm.create_model(
        "internimage_h_meta.inat18_384", pretrained=True, meta_dim=META_DIM, num_classes=5,
        pretrained_cfg_overlay=dict(file=str(path)), **config,
    ).double().eval()
    assert adapted.head.fc.out_features == adapted.meta_head.fc.out_features == 5
    torch.testing.assert_close(adapted.meta_head.norm.weight, source.meta_head.norm.weight,
                               rtol=0, atol=0)
    with torch.no_grad():
        features = source.forward_features(x)
        torch.testing.assert_close(adapted.forward_head(features, pre_logits=True),
                                   source.forward_head(features, pre_logits=True),
                                   rtol=0, atol=0)


# --- metadata encoding ------------------------------------------------------------------------


def test_encode_inat_metadata_values() -> None:
    temporal, spatial = encode_inat_metadata(month=3, hour=6, latitude=90, longitude=0)
    assert temporal.shape == (1, 4) and spatial.shape == (1, 3)
    assert temporal.dtype == spatial.dtype == torch.float32
    torch.testing.assert_close(temporal, torch.tensor([[1.0, 0.0, 1.0, 0.0]]), atol=1e-7, rtol=0)
    torch.testing.assert_close(spatial, torch.tensor([[0.0, 0.0, 1.0]]), atol=1e-7, rtol=0)

    temporal, spatial = encode_inat_metadata(
        month=[12, 6, None], hour=torch.tensor([0.0, 18.0, 12.0]),
        latitude=[0.0, 30.0, 45.0], longitude=[90.0, -60.0, float("nan")], dtype=torch.float64)
    expected_t = torch.tensor([
        [0.0, 1.0, 0.0, 1.0],  # December: 2 pi; midnight
        [0.0, -1.0, -1.0, 0.0],  # June: pi; 18:00 is 3/4 of the day
        [0.0, 0.0, 0.0, -1.0],  # month missing; noon
    ], dtype=torch.float64)
    c30 = math.sqrt(3) / 2
    expected_s = torch.tensor([
        [0.0, 1.0, 0.0],  # equator, 90 E (a latitude of 0 is a value, not missing)
        [c30 * 0.5, -c30 * c30, 0.5],  # cos(-60) = 1/2, sin(-60) = -sqrt(3)/2
        [0.0, 0.0, 0.0],  # longitude missing
    ], dtype=torch.float64)
    torch.testing.assert_close(temporal, expected_t, atol=1e-12, rtol=0)
    torch.testing.assert_close(spatial, expected_s, atol=1e-12, rtol=0)


def test_encode_inat_metadata_missing_and_batching() -> None:
    temporal, spatial = encode_inat_metadata()
    assert torch.equal(temporal, torch.zeros(1, 4)) and torch.equal(spatial, torch.zeros(1, 3))
    temporal, spatial = encode_inat_metadata(batch_size=3)
    assert torch.equal(temporal, torch.zeros(3, 4)) and torch.equal(spatial, torch.zeros(3, 3))
    temporal, spatial = encode_inat_metadata(month=[1, 7], latitude=10.0)  # no longitude
    assert temporal.shape == (2, 4) and torch.equal(spatial, torch.zeros(2, 3))
    torch.testing.assert_close(temporal[:, 2:], torch.zeros(2, 2))  # hour missing
    torch.testing.assert_close(temporal[0, :2], torch.tensor([0.5, math.sqrt(3) / 2]))
    # numpy arrays and scalars work like tensors and numbers
    from_numpy = encode_inat_metadata(month=np.array([1, 7]), hour=np.int64(5),
                                      latitude=np.array([10.0, np.nan]), longitude=np.float32(3))
    expected = encode_inat_metadata(month=[1, 7], hour=5, latitude=[10.0, None], longitude=3)
    for ours, ref in zip(from_numpy, expected):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    temporal, _ = encode_inat_metadata(hour=[3, None, 9], month=2)  # scalars broadcast
    assert torch.equal(temporal[1, 2:], torch.zeros(2))  # None: that sample's hour is missing
    torch.testing.assert_close(temporal[:, :2], torch.tensor([[math.sqrt(3) / 2, 0.5]] * 3))
    torch.testing.assert_close(temporal[2, 2:], torch.tensor([math.sqrt(0.5)] * 2) * torch.tensor(
        [1.0, -1.0]))  # 09:00 is 3/8 of the day


def test_encode_inat_metadata_errors() -> None:
    for kwargs, match in [
        (dict(month=0), r"month must lie in \[1, 12\]"),
        (dict(month=[3, 13]), r"month .*\[3, 13\]"),
        (dict(hour=25), r"hour must lie in \[0, 24\]"),
        (dict(latitude=91.0, longitude=0.0), "latitude"),
        (dict(latitude=0.0, longitude=math.pi * 100), "longitude"),
        (dict(month=[1, 2], hour=[1, 2, 3]), "same length"),
        (dict(month=[1, 2], batch_size=3), "batch_size=3"),
        (dict(batch_size=0), "batch_size"),
        (dict(month=torch.ones(2, 2)), r"month must be a scalar or 1-D, got shape \[2, 2\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            encode_inat_metadata(**kwargs)
    for kwargs, match in [(dict(month="3"), "month"), (dict(hour=[1, "2"]), "hour"),
                          (dict(latitude=True), "latitude"), (dict(longitude={1: 2}), "longitude")]:
        with pytest.raises(TypeError, match=match):
            encode_inat_metadata(**kwargs)


def test_encoded_metadata_runs_through_the_model() -> None:
    model = InternImage(**load_golden(GOLDEN["conv"])["config"], meta_dim=8).eval()
    x = torch.randn(2, 3, 64, 64)
    temporal, spatial = encode_inat_metadata(month=[5, None], hour=[14, None],
                                             latitude=[48.1, None], longitude=[11.6, None])
    with torch.no_grad():
        out = model(x, temporal, spatial)
        torch.testing.assert_close(out[1:], model(x[1:]), rtol=1e-5, atol=1e-5)  # all missing
    assert out.shape == (2, 10)
