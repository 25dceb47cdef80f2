"""Checkpoint filter (original / transformers-port keys), safe loading and conversion."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
from conftest import load_golden
from safetensors.torch import load_file
from timm.data import ImageNetInfo

from internimage import (
    InternImage,
    checkpoint_filter_fn,
    convert_checkpoint,
    imagenet22k_to_1k_indices,
)
from internimage.checkpoint import UnsafeCheckpointError, load_original_checkpoint


@pytest.fixture(scope="module")
def golden_b() -> dict:
    return load_golden("model_b_like_layerscale_postnorm.pt")


@pytest.fixture(scope="module")
def golden_h() -> dict:
    return load_golden("model_h_like_clip.pt")


def model_for(golden: dict, **kwargs) -> InternImage:
    return InternImage(**dict(golden["config"], **kwargs))


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


# --- filter -------------------------------------------------------------------------------------


def test_filter_maps_original_keys(golden_h: dict) -> None:
    model = model_for(golden_h)
    converted = checkpoint_filter_fn(golden_h["state_dict"], model)
    assert set(converted) == set(model.state_dict())
    sd = golden_h["state_dict"]
    pairs = {
        "patch_embed.conv1.weight": "stem.conv1.weight",
        "patch_embed.norm1.1.weight": "stem.norm1.weight",
        "patch_embed.norm2.1.bias": "stem.norm2.bias",
        "levels.0.downsample.conv.weight": "stages.1.downsample.conv.weight",
        "levels.2.downsample.norm.1.weight": "stages.3.downsample.norm.weight",
        "levels.1.norm.0.weight": "stages.1.norm.weight",
        "levels.2.post_norms.1.0.bias": "stages.2.post_norms.1.bias",
        "levels.2.blocks.1.norm1.0.weight": "stages.2.blocks.1.norm1.weight",
        "levels.2.blocks.1.res_post_norm2.0.weight": "stages.2.blocks.1.res_post_norm2.weight",
        "levels.3.blocks.0.dcn.dw_conv.0.weight": "stages.3.blocks.0.dcn.dw_conv.weight",
        "levels.3.blocks.0.dcn.dw_conv.1.1.weight": "stages.3.blocks.0.dcn.dw_norm.weight",
        "levels.3.blocks.0.dcn.offset.weight": "stages.3.blocks.0.dcn.offset.weight",
        "levels.3.blocks.0.dcn.center_feature_scale_proj_weight":
            "stages.3.blocks.0.dcn.center_feature_scale_proj_weight",
        "levels.0.blocks.0.mlp.fc2.bias": "stages.0.blocks.0.mlp.fc2.bias",
        "dcnv3_head_x4.0.weight": "fuse.proj_x4.weight",
        "dcnv3_head_x3.bias": "fuse.proj_x3.bias",
        "clip_projector.norm1_k.0.weight": "head.attn_pool.norm_k.weight",
        "clip_projector.cross_dcn.v_bias": "head.attn_pool.v_bias",
        "clip_projector.cross_dcn.q.weight": "head.attn_pool.q.weight",
        "clip_projector.cross_dcn.proj.bias": "head.attn_pool.proj.bias",
        "fc_norm.0.weight": "head.norm.weight",
        "head.weight": "head.fc.weight",
    }
    for original, ours in pairs.items():
        assert original in sd, original
        assert converted[ours] is sd[original], (original, ours)


def test_filter_maps_conv_head_and_gammas(golden_b: dict) -> None:
    model = model_for(golden_b)
    sd = golden_b["state_dict"]
    converted = checkpoint_filter_fn(sd, model)
    assert set(converted) == set(model.state_dict())
    assert converted["head.conv.weight"] is sd["conv_head.0.weight"]
    assert converted["head.norm.running_var"] is sd["conv_head.1.0.running_var"]
    assert converted["head.norm.num_batches_tracked"] is sd["conv_head.1.0.num_batches_tracked"]
    assert converted["stages.2.blocks.1.gamma2"] is sd["levels.2.blocks.1.gamma2"]


@pytest.mark.parametrize("wrapper", ["model", "state_dict", "module", None])
@pytest.mark.parametrize("prefix", ["", "module.", "backbone.", "module.backbone."])
def test_filter_unwraps_and_strips_prefixes(golden_b: dict, wrapper: str | None,
                                            prefix: str) -> None:
    model = model_for(golden_b)
    expected = checkpoint_filter_fn(golden_b["state_dict"], model)
    sd = {prefix + k: v for k, v in golden_b["state_dict"].items()}
    checkpoint = {wrapper: sd, "epoch": 3} if wrapper else sd
    assert_same_state(checkpoint_filter_fn(checkpoint, model), expected)


def test_filter_transformers_port_keys(golden_b: dict) -> None:
    """The HF port: every key under 'model.', gamma1/2 renamed layer_scale1/2."""
    model = model_for(golden_b)
    expected = checkpoint_filter_fn(golden_b["state_dict"], model)
    hf = {}
    for key, value in golden_b["state_dict"].items():
        key = key.replace(".gamma1", ".layer_scale1").replace(".gamma2", ".layer_scale2")
        hf["model." + key] = value
    assert any(k.endswith("layer_scale1") for k in hf)
    assert_same_state(checkpoint_filter_fn(hf, model), expected)
    assert_same_state(checkpoint_filter_fn({"model": hf}, model), expected)


def test_filter_passes_converted_dicts_through(golden_b: dict) -> None:
    model = model_for(golden_b)
    converted = checkpoint_filter_fn(golden_b["state_dict"], model)
    assert_same_state(checkpoint_filter_fn(converted, model), converted)
    ddp = {"module." + k: v for k, v in converted.items()}
    assert_same_state(checkpoint_filter_fn({"state_dict": ddp}, model), converted)
    assert_same_state(checkpoint_filter_fn(golden_b["state_dict"]), converted)  # no model


def test_filter_rejects_non_mappings() -> None:
    with pytest.raises(ValueError, match="mapping"):
        checkpoint_filter_fn([1, 2, 3])


def test_filter_converts_3x3_checkpoint_to_remove_center(golden_b: dict) -> None:
    model = model_for(golden_b, remove_center=True)
    sd = golden_b["state_dict"]
    converted = checkpoint_filter_fn(sd, model)
    result = model.load_state_dict(converted)
    assert not result.missing_keys and not result.unexpected_keys
    group = model.stages[2].blocks[0].dcn.group
    offset = sd["levels.2.blocks.0.dcn.offset.weight"].reshape(group, 9, 2, -1)
    mask = sd["levels.2.blocks.0.dcn.mask.bias"].reshape(group, 9)
    keep = [0, 1, 2, 3, 5, 6, 7, 8]  # the centre tap of a 3x3 kernel is point 4
    torch.testing.assert_close(converted["stages.2.blocks.0.dcn.offset.weight"],
                               offset[:, keep].reshape(group * 16, -1))
    torch.testing.assert_close(converted["stages.2.blocks.0.dcn.mask.bias"],
                               mask[:, keep].reshape(group * 8))


def test_filter_fills_missing_layer_scale_from_model() -> None:
    """T checkpoints have no gammas; detection configs use T with layer_scale=1.0."""
    golden = load_golden("model_t_like.pt")
    model = model_for(golden, layer_scale=1.0)
    converted = checkpoint_filter_fn(golden["state_dict"], model)
    result = model.load_state_dict(converted)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.stages[1].blocks[0].gamma1, torch.ones(32))


# --- ImageNet-22k -> 1k head slicing -------------------------------------------------------------


def test_imagenet22k_to_1k_indices_match_the_synset_lists() -> None:
    """Row k of the 22k head is 1k class k's synset in timm's sorted 21841-synset list."""
    idx = imagenet22k_to_1k_indices()
    assert idx.dtype == torch.long and idx.shape == (1000,)
    assert idx[:3].tolist() == [359, 368, 460] and idx[-1].item() == 21815  # the file's ends
    synsets_1k = ImageNetInfo("imagenet-1k").label_names()
    synsets_22k = ImageNetInfo("imagenet-22k").label_names()
    assert len(synsets_22k) == 21841
    mismatched = [k for k in range(1000) if synsets_22k[idx[k]] != synsets_1k[k]]
    # n04399382 (teddy bear) is not a 22k synset; the original reuses class 849's row
    assert mismatched == [850] and synsets_1k[850] == "n04399382"
    assert idx[850] == idx[849] == 11136 and len(set(idx.tolist())) == 999
    idx[0] = -1  # callers get a fresh tensor
    assert imagenet22k_to_1k_indices()[0] == 359


def with_22k_head(golden: dict) -> tuple[dict, dict]:
    """The golden original-layout state dict with a random 21841-class ``head`` instead."""
    sd = dict(golden["state_dict"])
    width = sd["head.weight"].shape[1]
    generator = torch.Generator().manual_seed(22)
    sd["head.weight"] = torch.randn(21841, width, generator=generator)
    sd["head.bias"] = torch.randn(21841, generator=generator)
    config = {k: v for k, v in golden["config"].items() if k != "num_classes"}
    return sd, config


@pytest.mark.parametrize("kind", ["conv", "clip"])
def test_22k_head_is_sliced_for_a_1k_model(tmp_path: Path, kind: str, golden_b: dict,
                                           golden_h: dict) -> None:
    golden, name = (golden_b, "internimage_b") if kind == "conv" else (golden_h, "internimage_h")
    tag_22k = {"conv": "internimage_l.in22k_384", "clip": "internimage_h.in22k_384"}[kind]
    sd, config = with_22k_head(golden)
    idx = imagenet22k_to_1k_indices()

    model_22k = InternImage(**config, num_classes=21841).eval()
    model_22k.load_state_dict(checkpoint_filter_fn(sd, model_22k))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model_22k(x)[:, idx]

    model_1k = InternImage(**config, num_classes=1000).eval()
    converted = checkpoint_filter_fn(sd, model_1k)
    torch.testing.assert_close(converted["head.fc.weight"], sd["head.weight"][idx], rtol=0, atol=0)
    torch.testing.assert_close(converted["head.fc.bias"], sd["head.bias"][idx], rtol=0, atol=0)
    model_1k.load_state_dict(converted)  # strict
    with torch.no_grad():
        torch.testing.assert_close(model_1k(x), expected)

    path = tmp_path / "in22k.pth"
    torch.save({"model": sd}, path)
    # a 1k tag (cfg 1000 classes) and a 22k tag (cfg 21841) asked for 1000 classes
    for model_name, kwargs in [(name, {}), (tag_22k, dict(num_classes=1000))]:
        model = timm.create_model(model_name, pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(path)), **config,
                                  **kwargs).eval()
        assert model.pretrained_cfg["num_classes"] == 1000
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, msg=model_name)

    dst = convert_checkpoint(path, tmp_path / "in1k.safetensors", name, num_classes=1000,
                             **config)
    torch.testing.assert_close(load_file(str(dst))["head.fc.bias"], sd["head.bias"][idx],
                               rtol=0, atol=0)


def test_22k_head_other_sizes_keep_timm_behaviour(tmp_path: Path, golden_b: dict) -> None:
    """Only a 1000-class model slices: 21841 loads the head as is, other sizes get a new head
    (timm drops the classifier when num_classes differs from the cfg's)."""
    sd, config = with_22k_head(golden_b)
    assert checkpoint_filter_fn(sd)["head.fc.weight"] is sd["head.weight"]
    assert checkpoint_filter_fn(sd, InternImage(**config, num_classes=10))["head.fc.weight"] \
        is sd["head.weight"]
    path = tmp_path / "in22k.pth"
    torch.save({"model": sd}, path)
    overlay = dict(file=str(path))
    full = timm.create_model("internimage_l.in22k_384", pretrained=True,
                             pretrained_cfg_overlay=overlay, **config).eval()
    torch.testing.assert_close(full.head.fc.weight, sd["head.weight"], rtol=0, atol=0)
    small = timm.create_model("internimage_l.in22k_384", pretrained=True,
                              pretrained_cfg_overlay=overlay, **config, num_classes=10).eval()
    assert small.head.fc.weight.shape == (10, sd["head.weight"].shape[1])
    assert small.pretrained_cfg["num_classes"] == 21841
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(small.forward_head(small.forward_features(x), pre_logits=True),
                                   full.forward_head(full.forward_features(x), pre_logits=True),
                                   rtol=0, atol=0)


# --- safe loading -------------------------------------------------------------------------------

EXECUTED = []


class FakeYacsConfig:
    """Stands in for the yacs CfgNode pickled by the original save_checkpoint."""

    def __init__(self) -> None:
        self.MODEL = "intern_image"

    def __setstate__(self, state: dict) -> None:  # would run if the file were unpickled
        EXECUTED.append(state)
        self.__dict__.update(state)


def save_training_checkpoint(path: Path, state_dict: dict) -> None:
    torch.save({"model": state_dict, "optimizer": {}, "epoch": 10,
                "config": FakeYacsConfig()}, path)


def test_pickled_objects_are_refused_with_a_way_out(tmp_path: Path, golden_b: dict) -> None:
    path = tmp_path / "internimage_b_train.pth"
    save_training_checkpoint(path, golden_b["state_dict"])
    with pytest.raises(UnsafeCheckpointError) as info:
        load_original_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert "weights_only" in message and "run code" in message
    assert "test_checkpoint.FakeYacsConfig" in message  # names the blocked global
    assert_only_safe_ways_out(message)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert isinstance(info.value, ValueError)  # a bad file, not a bug
    with pytest.raises(UnsafeCheckpointError):
        convert_checkpoint(path, tmp_path / "out.safetensors", "internimage_b")
    assert not EXECUTED, "the pickled object must never be constructed"


def assert_only_safe_ways_out(message: str) -> None:
    """The refusal offers the original's allowlist and tensor extraction, never an unsafe
    load."""
    assert "weights_only=False" not in message.replace(" ", "")
    assert "weights_only=True" in message
    assert "torch.serialization.safe_globals(" in message
    assert "ORIGINAL_CHECKPOINT_GLOBALS" in message


class _Payload:
    """A pickle whose unpickling calls os.system (the classic malicious checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("form", ["zip", "legacy", "pickle2", "pickle4"])
def test_malicious_pickle_is_refused_naming_the_global(tmp_path: Path, form: str) -> None:
    marker = tmp_path / "payload_ran"
    payload = {"model": {"w": torch.zeros(2)}, "config": _Payload(marker)}
    path = tmp_path / "evil.pth"
    if form == "zip":
        torch.save(payload, path)
    elif form == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(form[-1])))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_original_checkpoint(path)
    message = str(info.value)
    assert "posix.system" in message, message  # os.system's real name on Linux
    assert_only_safe_ways_out(message)
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        convert_checkpoint(path, tmp_path / "out.safetensors", "internimage_t")
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "out.safetensors").exists()


def test_original_training_checkpoint_with_yacs_config_loads(tmp_path: Path,
                                                             golden_b: dict) -> None:
    """The original save_checkpoint pickles a yacs CfgNode (a dict subclass) under 'config':
    its one allowlisted global loads as an inert OrderedDict, without yacs."""
    import sys
    import types

    from internimage.checkpoint import ORIGINAL_CHECKPOINT_GLOBALS, load_checkpoint_file

    class CfgNode(dict):  # pickled exactly as yacs' class: NEWOBJ + SETITEMS + BUILD
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    module = types.ModuleType("yacs.config")
    module.CfgNode = CfgNode
    config = CfgNode(MODEL=CfgNode(TYPE="intern_image", DROP_PATH_RATE=0.5))
    config.__dict__["__immutable__"] = True
    path = tmp_path / "internimage_b_train.pth"
    saved = dict(sys.modules)
    sys.modules.update({"yacs": types.ModuleType("yacs"), "yacs.config": module})
    try:
        torch.save({"model": golden_b["state_dict"], "optimizer": {"state": {}},
                    "epoch": 299, "max_accuracy": 84.9, "config": config}, path)
    finally:
        sys.modules.clear()
        sys.modules.update(saved)
    assert [name for _, name in ORIGINAL_CHECKPOINT_GLOBALS] == ["yacs.config.CfgNode"]
    sd = load_original_checkpoint(path)
    assert sd.keys() == golden_b["state_dict"].keys()
    whole = load_checkpoint_file(path)
    assert whole["config"] == {"MODEL": {"TYPE": "intern_image", "DROP_PATH_RATE": 0.5}}
    assert type(whole["config"]).__module__ == "collections"  # nothing from yacs
    with torch.serialization.safe_globals(ORIGINAL_CHECKPOINT_GLOBALS):  # plain torch.load
        assert torch.load(path, weights_only=True)["epoch"] == 299


def test_safe_globals_allow_list(tmp_path: Path, golden_b: dict) -> None:
    path = tmp_path / "ckpt.pth"
    save_training_checkpoint(path, golden_b["state_dict"])
    sd = load_original_checkpoint(path, safe_globals=[FakeYacsConfig])
    assert sd.keys() == golden_b["state_dict"].keys()
    EXECUTED.clear()


def test_load_original_checkpoint_variants(tmp_path: Path, golden_b: dict) -> None:
    sd = golden_b["state_dict"]
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / "with_ema.pth"
    torch.save({"model": sd, "model_ema": ema, "epoch": 1}, path)
    assert torch.equal(load_original_checkpoint(path)["head.bias"], sd["head.bias"])
    assert torch.equal(load_original_checkpoint(path, use_ema=True)["head.bias"],
                       ema["head.bias"])
    raw = tmp_path / "raw.pth"
    torch.save(sd, raw)
    assert load_original_checkpoint(raw).keys() == sd.keys()
    with pytest.raises(ValueError, match="model_ema"):
        load_original_checkpoint(raw, use_ema=True)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_original_checkpoint(tmp_path / "missing.pth")


# --- conversion to safetensors --------------------------------------------------------------------


def test_convert_round_trip(tmp_path: Path, golden_h: dict) -> None:
    src = tmp_path / "internimage_h_like.pth"
    torch.save({"model": golden_h["state_dict"], "epoch": 30}, src)
    config = {k: v for k, v in golden_h["config"].items() if k != "num_classes"}
    dst = convert_checkpoint(src, tmp_path / "out" / "h_like.safetensors", "internimage_h",
                             **config)
    assert dst.is_file()
    tensors = load_file(str(dst))
    from safetensors import safe_open

    with safe_open(str(dst), "pt") as f:
        metadata = f.metadata()
    assert metadata["model_name"] == "internimage_h" and metadata["num_classes"] == "10"
    assert metadata["source"] == src.name

    model = InternImage(**golden_h["config"])
    model.load_state_dict(tensors)  # strict: this project's layout
    with torch.no_grad():
        logits = model.double().eval()(golden_h["input"])
    torch.testing.assert_close(logits, golden_h["logits"], rtol=0, atol=1e-9)

    timm_model = timm.create_model(
        "internimage_h", pretrained=True,
        pretrained_cfg_overlay=dict(file=str(dst), num_classes=10), **config, num_classes=10,
    ).double().eval()
    with torch.no_grad():
        torch.testing.assert_close(timm_model(golden_h["input"]), golden_h["logits"], rtol=0,
                                   atol=1e-9)


def test_convert_errors(tmp_path: Path, golden_b: dict) -> None:
    src = tmp_path / "b.pth"
    torch.save({"model": golden_b["state_dict"]}, src)
    with pytest.raises(ValueError, match="registered timm model"):
        convert_checkpoint(src, tmp_path / "x.safetensors", "internimage_xxl")
    with pytest.raises(ValueError, match=".safetensors"):
        convert_checkpoint(src, tmp_path / "x.pth", "internimage_b")
    with pytest.raises(ValueError, match="does not match internimage_b"):
        convert_checkpoint(src, tmp_path / "x.safetensors", "internimage_b")  # real B size


def test_convert_fills_layer_scale_for_t_checkpoints(tmp_path: Path) -> None:
    golden = load_golden("model_t_like.pt")
    src = tmp_path / "t_like.pth"
    torch.save({"model": golden["state_dict"]}, src)
    config = dict(golden["config"], layer_scale=1.0)
    dst = convert_checkpoint(src, tmp_path / "t_like_ls.safetensors", "internimage_t", **config)
    tensors = load_file(str(dst))
    assert torch.equal(tensors["stages.3.blocks.0.gamma2"], torch.ones(128))
    model = InternImage(**config)
    model.load_state_dict(tensors)


# --- strict loading, num_classes, safetensors (library API, no CLI errors) -----------------------


def test_load_weights_is_strict_and_raises_value_error(golden_b: dict) -> None:
    from internimage.checkpoint import checkpoint_num_classes, load_weights

    sd = golden_b["state_dict"]
    model = model_for(golden_b).double()
    assert checkpoint_num_classes(checkpoint_filter_fn(sd, model)) == \
        golden_b["config"]["num_classes"]
    assert checkpoint_num_classes({"stem.conv1.weight": torch.zeros(1)}) is None
    assert load_weights(model, sd) == []  # original layout, through the filter
    assert_same_state(model.state_dict(), {k: v.to(model.state_dict()[k].dtype)
                                           for k, v in checkpoint_filter_fn(sd, model).items()})

    wider = model_for(golden_b, channels=golden_b["config"]["channels"] * 2)
    with pytest.raises(ValueError, match="shapes do not match") as info:
        load_weights(wider, sd, source="b.pth")
    assert str(info.value).startswith("b.pth: ")
    with pytest.raises(ValueError, match="missing keys 1 .'stem.conv1.weight'."):
        load_weights(model_for(golden_b), {k: v for k, v in sd.items()
                                           if k != "patch_embed.conv1.weight"})
    other_head = model_for(golden_b, num_classes=3)
    with pytest.raises(ValueError, match="num_classes=10"):
        load_weights(other_head, sd)
    (note,) = load_weights(other_head, sd, allow_head_reset=True)
    assert "re-initialised" in note


def test_save_safetensors_shared_storage_and_metadata(tmp_path: Path) -> None:
    from safetensors import safe_open

    from internimage.checkpoint import read_safetensors_metadata, save_safetensors

    base = torch.arange(6.0)
    path = tmp_path / "shared.safetensors"
    save_safetensors(path, {"a": base, "b": base[:3], "c": base.view(2, 3).t()},
                     {"name": "x", "kwargs": {"depths": [1, 2]}})
    tensors = load_file(str(path))
    assert torch.equal(tensors["b"], base[:3]) and tensors["c"].is_contiguous()
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"name": "x", "kwargs": '{"depths": [1, 2]}'}
    assert read_safetensors_metadata(path)["name"] == "x"
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        read_safetensors_metadata(corrupt)


def test_unreadable_files_are_value_errors_about_the_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from internimage.checkpoint import CheckpointMismatchError, load_checkpoint_file

    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.zeros(4096)}}, good)
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": {"w": torch.zeros(4096)}}, legacy, _use_new_zipfile_serialization=False)
    save_file({"w": torch.zeros(4096)}, str(tmp_path / "good.safetensors"))
    cases = {
        "text.pth": (b"hello, not a checkpoint\n", "a text file"),
        "empty.pth": (b"", r"empty \(0 bytes\)"),
        "binary.pth": (b"\x00\x01\x02\x03" * 8, "neither a torch.save archive nor a pickle"),
        "truncated.pth": (good.read_bytes()[:2000], "truncated or damaged"),
        "truncated_legacy.pth": (legacy.read_bytes()[:300], "truncated or damaged"),
        "t.safetensors": ((tmp_path / "good.safetensors").read_bytes()[:3000],
                          "not a readable safetensors file"),
        "short.safetensors": (b"hello", "too short"),
    }
    for name, (data, needle) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=needle) as info:
            load_checkpoint_file(path)
        assert not isinstance(info.value, (UnsafeCheckpointError, CheckpointMismatchError))
        assert str(path) in str(info.value) and "weights_only=False" not in str(info.value)
