"""`internimage train`: end to end on tiny data, exact resume, torchrun (2 processes, gloo),
bad input (one-line errors, nothing left behind), config handling and parameter groups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import interrupt_training_in_epoch
from safetensors import safe_open
from safetensors.torch import load_file

import internimage  # noqa: F401  (registers the models)
from internimage.cli import main
from internimage.train_config import config_dir, load_recipe, validate_config

REPO = Path(__file__).resolve().parents[1]

# The embedded digits with a very small model: 96 training / 48 validation images at 32 px.
TINY = [
    "train", "--quiet", "--epochs", "2", "--batch-size", "32", "--set", "sched.warmup_epochs=1",
    "--set", "data.train_limit=96", "--set", "data.val_limit=48",
    "--set", "model.kwargs.channels=16", "--set", "model.kwargs.groups=[1,2,4,8]",
]
TIMING_KEYS = {"train_time_s", "val_time_s", "train_images_per_s"}


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 1
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("internimage train: error: "), err
    for needle in needles:
        assert needle in last, (needle, last)


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


def make_image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 32) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", per_class), ("val", 2)):
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (size, size, 3), generator=generator,
                                       dtype=torch.uint8)
                pixels[:, :, c % 3] = 255  # a class-dependent colour
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


# ---------------------------------------------------------------------------------------------


def test_train_digits_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code, stdout, err = run(TINY + ["--output", str(out)], capsys)
    assert code == 0, err
    assert "epoch 2/2" in stdout and "done: 2 epoch(s)" in stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.yaml", "curves.png", "metrics.csv", "metrics.json",
                     "model.safetensors", "model_ema.safetensors", "state.pt"]
    history = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert all(0 <= r["val_acc1"] <= 100 and r["train_loss"] > 0 for r in history)
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,lr,train_loss") and len(csv_lines) == 3
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["model_name"] == "internimage"
    assert json.loads(meta["class_names"]) == [str(i) for i in range(10)]
    assert json.loads(meta["model_kwargs"])["channels"] == 16
    assert json.loads(meta["data_config"])["input_size"] == [3, 32, 32]
    state = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["global_step"] == 6  # 96 images / 32 per step
    # the config written is complete and loads as a recipe
    cfg = load_recipe(out / "config.yaml")
    assert cfg["data"]["train_limit"] == 96 and cfg["sched"]["epochs"] == 2


def test_resume_is_exact(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Exercise every random stream: mixup (numpy), drop path and shifts (torch), EMA with
    # warm-up, layer decay and the DCN LR multiplier.
    extra = ["--set", "aug.mixup=0.5", "--set", "model.drop_path_rate=0.2",
             "--set", "optim.layer_decay=0.8", "--set", "optim.dcn_lr_mul=0.1"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(TINY + extra + ["--output", str(full)], capsys)[0] == 0
    code, stdout, _ = run(TINY + extra + ["--output", str(part), "--stop-after", "1"], capsys)
    assert code == 0 and "--resume" in stdout
    assert torch.load(part / "state.pt", weights_only=True)["epoch"] == 1
    code, stdout, err = run(["train", "--quiet", "--resume", str(part)], capsys)
    assert code == 0, err
    assert "resuming after epoch 1" in stdout

    assert without_timing(json.loads((full / "metrics.json").read_text())) == \
        without_timing(json.loads((part / "metrics.json").read_text()))
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(part / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)

    # a finished run has nothing left to do
    code, stdout, _ = run(["train", "--quiet", "--resume", str(part)], capsys)
    assert code == 0 and "nothing to do" in stdout
    # settings that change the computation cannot change on resume
    code, _, err = run(["train", "--resume", str(part), "--set", "optim.lr=1"], capsys)
    assert_one_line_error(code, err, "optim.lr cannot change when resuming")


def test_torchrun_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "internimage"] + TINY[:2] + ["--epochs", "1"] + TINY[4:] + [
           "--output", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    # every parameter's gradient has the layout of DDP's bucket view (the 1x1 head conv and
    # the depthwise convs get channels-last gradients from channels-last activations)
    assert "Grad strides do not match bucket view strides" not in result.stderr
    assert "2 process(es)" in result.stdout and "batch 32x2" in result.stdout
    assert result.stdout.count("done: 1 epoch(s)") == 1  # only rank 0 logs
    history = json.loads((out / "metrics.json").read_text())
    assert len(history) == 1
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["global_step"] == 2  # 96 images / (32 x 2 processes) = 1.5 -> 2 steps

    # the sharded validation was reduced exactly: re-evaluate the saved weights on all 48
    from internimage.data import DigitsDataset, digits_split
    from internimage.factory import build_model

    meta_kwargs = {"channels": 16, "depths": [1, 1, 2, 1], "groups": [1, 2, 4, 8],
                   "mlp_ratio": 4.0}
    model = build_model("internimage", num_classes=10, kwargs=meta_kwargs)
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    model.eval()
    _, _, val_x, val_y, _ = digits_split(0.2, seed=0)
    data = DigitsDataset(val_x[:48], val_y[:48], 32)
    images = torch.stack([data[i][0] for i in range(48)])
    with torch.no_grad():
        correct = (model(images).argmax(-1) == val_y[:48]).sum().item()
    assert history[0]["val_acc1"] == pytest.approx(correct / 48 * 100)


def test_image_folder_with_original_checkpoint_resets_head(
        tmp_path: Path, capsys: pytest.CaptureFixture, golden_dir: Path) -> None:
    golden = torch.load(golden_dir / "model_t_like.pt", weights_only=True)
    pth = tmp_path / "original.pth"  # original layout, under 'model', 10-class head
    torch.save({"model": {k: v.float() for k, v in golden["state_dict"].items()}}, pth)
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    code, stdout, err = run([
        "train", "--quiet", "--data", str(data), "--model", "internimage",
        "--set", "model.kwargs={channels: 16, depths: [1, 1, 2, 1], groups: [1, 2, 4, 8]}",
        "--checkpoint", str(pth), "--img-size", "32", "--epochs", "1", "--batch-size", "4",
        "--set", "data.num_workers=0", "--output", str(out),
    ], capsys)
    assert code == 0, err
    assert "its classifier has 10 classes, the model 3" in err
    assert "re-initialised" in err
    assert "3 classes" in stdout and "12 train / 6 val images" in stdout
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["class_names"]) == ["class_0", "class_1", "class_2"]
        assert handle.get_tensor("head.fc.weight").shape == (3, 192)
    # the backbone came from the checkpoint (fine-tuning moved it only a little)
    trained = load_file(str(out / "model.safetensors"))
    original = golden["state_dict"]["patch_embed.conv1.weight"].float()
    assert (trained["stem.conv1.weight"] - original).abs().max() < 0.05


# --- errors ---


def test_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code, _, err = run(["train", "--data", str(tmp_path / "nope"), "--output", str(out)], capsys)
    assert_one_line_error(code, err, "--data (data.dir): folder not found")
    assert not out.exists()


@pytest.mark.parametrize("layout", ["no_val", "no_classes", "empty_class", "mismatch"])
def test_bad_dataset_layouts(tmp_path: Path, capsys: pytest.CaptureFixture, layout: str) -> None:
    data = make_image_folder(tmp_path / "data", classes=2)
    if layout == "no_val":
        import shutil

        shutil.rmtree(data / "val")
        needle = "must contain 'val/'"
    elif layout == "no_classes":
        import shutil

        shutil.rmtree(data / "train")
        (data / "train").mkdir()
        needle = "has no class folders"
    elif layout == "empty_class":
        (data / "train" / "class_9").mkdir()
        needle = "without images"
    else:
        (data / "val" / "class_1").rename(data / "val" / "other")
        needle = "same class folders"
    out = tmp_path / "run"
    code, _, err = run(["train", "--data", str(data), "--output", str(out)], capsys)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_unreadable_image(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_image_folder(tmp_path / "data", classes=2)
    bad = data / "train" / "class_1" / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    out = tmp_path / "run"
    code, _, err = run(["train", "--data", str(data), "--output", str(out), "--img-size", "32"],
                       capsys)
    assert_one_line_error(code, err, "unreadable image", "broken.jpg")
    assert not out.exists()


def test_unknown_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["train", "--model", "internimage_zz", "--output", str(tmp_path / "r")],
                       capsys)
    assert_one_line_error(code, err, "--model: unknown model 'internimage_zz'")
    assert not (tmp_path / "r").exists()


def test_unknown_config_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["train", "--set", "optim.lrr=0.1"], capsys)
    assert_one_line_error(code, err, "unknown config key 'optim.lrr'", "'optim.lr'")
    code, _, err = run(["train", "--set", "optimizer.lr=0.1"], capsys)
    assert_one_line_error(code, err, "unknown config key 'optimizer.lr'")
    # a key that exists in another section: the README once said --set train.epochs=2
    code, _, err = run(["train", "--set", "train.epochs=2"], capsys)
    assert_one_line_error(code, err, "unknown config key 'train.epochs'",
                          "did you mean 'sched.epochs'")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("base: digits_tiny\ndata:\n  batch_sise: 8\n")
    code, _, err = run(["train", "--config", str(recipe)], capsys)
    assert_one_line_error(code, err, "unknown config key 'data.batch_sise'", "data.batch_size")
    code, _, err = run(["train", "--set", "data.batch_size=many"], capsys)
    assert_one_line_error(code, err, "data.batch_size", "an integer", "'many'")
    code, _, err = run(["train", "--set", "model.kwargs.depthz=[1,1,1,1]",
                        "--output", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, "unknown InternImage argument", "depthz")
    assert not (tmp_path / "r").exists()


def test_existing_output_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    code, _, err = run(TINY + ["--output", str(tmp_path / "run")], capsys)
    assert_one_line_error(code, err, "already exists")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["keep.txt"]


# --- config ---


def test_exponent_numbers_without_a_dot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """YAML 1.1 (PyYAML) reads 1e-3 as a string; the docs write --set optim.lr=1e-3."""
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: digits_tiny\nsched:\n  min_lr: 1e-6\n  warmup_lr: 2E-5\n")
    code, stdout, err = run(["train", "--print-config", "--config", str(recipe), "--set",
                             "optim.lr=1e-3", "--set", "optim.betas=[0.9, 9.99e-1]",
                             "--set", "data.auto_augment=rand-m9"], capsys)
    assert code == 0, err
    cfg = yaml.safe_load(stdout)
    assert cfg["optim"]["lr"] == 1e-3 and cfg["sched"]["min_lr"] == 1e-6
    assert cfg["sched"]["warmup_lr"] == 2e-5 and cfg["optim"]["betas"] == [0.9, 0.999]
    assert cfg["data"]["auto_augment"] == "rand-m9"  # other strings stay strings


def test_print_config_and_overrides(capsys: pytest.CaptureFixture) -> None:
    code, stdout, _ = run(["train", "--print-config", "--lr", "0.01", "--set",
                           "optim.layer_decay=0.75", "--set", "ema.enabled=false"], capsys)
    assert code == 0
    import yaml

    cfg = yaml.safe_load(stdout)
    assert cfg["optim"]["lr"] == 0.01 and cfg["optim"]["layer_decay"] == 0.75
    assert cfg["ema"]["enabled"] is False
    assert cfg["model"]["name"] == "internimage"  # the digits_tiny recipe


@pytest.mark.parametrize("recipe", sorted(p.stem for p in config_dir().glob("*.yaml")))
def test_every_recipe_is_valid(recipe: str) -> None:
    cfg = load_recipe(config_dir() / f"{recipe}.yaml")
    validate_config(cfg)
    if recipe.endswith("_ft"):
        assert cfg["optim"]["layer_decay"] == 0.9 and cfg["optim"]["dcn_lr_mul"] == 0.1
        assert cfg["aug"]["label_smoothing"] == 0.3 and cfg["sched"]["epochs"] == 20


def test_train_flash_internimage_on_digits(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          ) -> None:
    """The bare FlashInternImage class from model.kwargs trains, and its weights file names
    the class, so predict rebuilds it."""
    out = tmp_path / "run"
    code, stdout, err = run(["train", "--quiet", "--epochs", "1", "--batch-size", "32",
                             "--set", "data.train_limit=64", "--set", "data.val_limit=32",
                             "--set", "model.name=flash_internimage",
                             "--set", "model.kwargs.channels=16",
                             "--set", "model.kwargs.groups=[1,2,4,8]", "--output", str(out)],
                            capsys)
    assert code == 0, err
    assert "done: 1 epoch(s)" in stdout
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
    assert meta["model_name"] == "flash_internimage"
    assert "stages.0.blocks.0.dcn.offset_mask.weight" in keys
    from internimage.cli.common import model_from_checkpoint

    model, info = model_from_checkpoint(None, str(out / "model.safetensors"), False,
                                        torch.device("cpu"))
    assert type(model).__name__ == "FlashInternImage" and len(info["class_names"]) == 10


def test_flash_recipes_name_the_family_and_the_original_drop_paths(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A recipe per variant; --model with --data picks the variant's fine-tuning recipe."""
    import yaml

    drop_paths = dict(t=0.1, s=0.4, b=0.5, l=0.1)  # the original classification configs
    for variant, drop_path in drop_paths.items():
        kinds = ("in1k", "ft") if variant != "l" else ("ft",)
        for kind in kinds:
            cfg = load_recipe(config_dir() / f"flash_internimage_{variant}_{kind}.yaml")
            assert cfg["model"]["name"] == f"flash_internimage_{variant}"
            assert cfg["model"]["drop_path_rate"] == drop_path
        code, stdout, err = run(["train", "--model", f"flash_internimage_{variant}", "--data",
                                 str(tmp_path), "--print-config"], capsys)
        assert code == 0, err
        cfg = yaml.safe_load(stdout)
        assert cfg["model"]["drop_path_rate"] == drop_path
        assert cfg["model"]["grad_checkpointing"] is (variant == "l")  # L's with_cp
        assert cfg["data"]["img_size"] == (384 if variant == "l" else 224)


def test_param_groups_dcn_lr_of_flash_internimage() -> None:
    """As the original DCNv4 training code does ('offset' in the name), the packed
    offset_mask projection and its depthwise conv train at dcn_lr_mul x the LR."""
    from internimage.factory import build_model
    from internimage.train import build_param_groups

    model = build_model("flash_internimage", num_classes=10,
                        kwargs=dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8],
                                    dw_kernel_size=3))
    groups = build_param_groups(model, 0.05, layer_decay=0.5, dcn_lr_mul=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert len(scale) == len(names)
    assert scale["stages.3.blocks.0.dcn.offset_mask.weight"] == pytest.approx(0.05)
    assert scale["stages.3.blocks.0.dcn.offset_mask_dw.weight"] == pytest.approx(0.05)
    assert scale["stages.3.blocks.0.dcn.value_proj.weight"] == pytest.approx(0.5)
    assert scale["stem.conv1.weight"] == pytest.approx(0.5 ** 6)


def test_param_groups_layer_decay_and_dcn_lr() -> None:
    from internimage.factory import build_model
    from internimage.train import build_param_groups

    model = build_model("internimage", num_classes=10,
                        kwargs=dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8]))
    groups = build_param_groups(model, 0.05, layer_decay=0.5, dcn_lr_mul=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    decay = {names[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert len(scale) == len(names)  # every parameter exactly once
    # 7 layers: stem, 5 blocks, head -> stem 0.5**6, last block 0.5, head 1
    assert scale["stem.conv1.weight"] == pytest.approx(0.5 ** 6)
    assert scale["stages.3.blocks.0.mlp.fc1.weight"] == pytest.approx(0.5)
    assert scale["head.fc.weight"] == 1.0
    assert scale["stages.3.blocks.0.dcn.offset.weight"] == pytest.approx(0.05)
    assert scale["stages.0.blocks.0.dcn.offset.bias"] == pytest.approx(0.1 * 0.5 ** 5)
    assert scale["stages.0.blocks.0.dcn.mask.weight"] == pytest.approx(0.5 ** 5)  # not 'offset'
    assert decay["stages.0.blocks.0.dcn.offset.bias"] == 0.0
    assert decay["stages.0.blocks.0.dcn.offset.weight"] == 0.05
    assert decay["stages.0.blocks.0.norm1.weight"] == 0.0


def test_randaugment_posterize_is_pillow_safe() -> None:
    from PIL import Image
    from timm.data import create_transform

    from internimage.train import _cap_posterize

    transform = create_transform((3, 32, 32), is_training=True,
                                 auto_augment="rand-m9-mstd0.5-inc1")
    _cap_posterize(transform)
    (op,) = [op for step in transform.transforms for op in getattr(step, "ops", [])
             if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10.0, 0.0  # the draw that asks for 0 bits
    op(Image.new("RGB", (8, 8), (200, 100, 50)))  # must not raise on any Pillow


def test_failure_before_the_first_epoch_leaves_nothing(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    # mixup needs full batches: 96 images cannot fill one batch of 128
    out = tmp_path / "run"
    code, _, err = run(TINY + ["--set", "aug.mixup=0.5", "--batch-size", "128",
                               "--output", str(out)], capsys)
    assert_one_line_error(code, err, "data.batch_size", "128")
    assert not out.exists()


def test_config_and_data_libraries_raise_python_errors(tmp_path: Path) -> None:
    """Library errors are ValueError / FileNotFoundError without command-line option names;
    the CLI adds those (next test)."""
    import copy

    from internimage.cli.errors import CommandError
    from internimage.data import check_images, scan_image_folder
    from internimage.train_config import DEFAULTS, resolve_recipe, set_key

    errors = []
    with pytest.raises(FileNotFoundError, match="no recipe 'nope'") as info:
        resolve_recipe("nope")
    errors.append(info.value)
    cfg = copy.deepcopy(DEFAULTS)
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'") as info:
        set_key(cfg, "optim.lrr", 1)
    errors.append(info.value)
    cfg["data"]["batch_size"] = "many"
    with pytest.raises(ValueError, match="data.batch_size: expected an integer") as info:
        validate_config(cfg)
    errors.append(info.value)
    with pytest.raises(FileNotFoundError, match="folder not found") as info:
        scan_image_folder(tmp_path / "nope")
    errors.append(info.value)
    data = make_image_folder(tmp_path / "data", classes=2)
    (data / "val" / "class_1").rename(data / "val" / "other")
    with pytest.raises(ValueError, match="same class folders") as info:
        scan_image_folder(data)
    errors.append(info.value)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="unreadable image") as info:
        check_images([bad])
    errors.append(info.value)
    for error in errors:
        assert not isinstance(error, CommandError)
        assert not str(error).startswith("--"), error


@pytest.mark.parametrize("args, needle", [
    (["--img-size", "0"], "--img-size (data.img_size): "),
    (["--batch-size", "0"], "--batch-size (data.batch_size): "),
    (["--epochs", "0"], "--epochs (sched.epochs): "),
    (["--lr", "-1"], "--lr (optim.lr): "),
    (["--num-classes", "0"], "--num-classes (model.num_classes): "),
    (["--config", "nope"], "--config: no recipe 'nope'"),
    (["--set", "optim.lrr=1"], "--set: unknown config key 'optim.lrr'"),
    (["--set", "data.img_size=0"], "--set data.img_size=0: expected an integer"),
])
def test_config_errors_name_the_option(args: list[str], needle: str,
                                       capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["train", "--print-config"] + args, capsys)
    assert_one_line_error(code, err, needle)


def test_lr_scaling_is_told(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """optim.lr is per optim.lr_base_batch images: the run says what it became."""
    args = TINY + ["--epochs", "1", "--lr", "2e-5", "--set", "optim.lr_base_batch=512",
                   "--output", str(tmp_path / "run")]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    note = next(line for line in err.splitlines() if "lr_base_batch" in line)
    assert "2e-05" in note and "512" in note and "32" in note and "1.25e-06" in note, note
    assert "lr 1.25e-06" in stdout
    code, _, err = run(TINY + ["--epochs", "1", "--output", str(tmp_path / "abs")], capsys)
    assert code == 0 and "lr_base_batch" not in err  # digits_tiny: absolute LR, nothing to say


def test_ctrl_c_prints_the_resume_command(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_training_in_epoch(monkeypatch, 2)
    out = tmp_path / "run"
    code, _, err = run(TINY + ["--output", str(out)], capsys)
    assert code == 130
    assert f"internimage train --resume {out}" in err and "epoch 1" in err, err
    assert err.strip().splitlines()[-1] == "internimage train: interrupted"
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 1

    interrupt_training_in_epoch(monkeypatch, 1)  # interrupted before any epoch finished
    code, _, err = run(TINY + ["--output", str(tmp_path / "early")], capsys)
    assert code == 130 and "--resume" not in err and "no epoch finished" in err, err
    assert not (tmp_path / "early").exists()
