"""The `internimage` command: models, bench, predict, convert, export, entry points and the
one-line errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import internimage  # noqa: F401  (registers the models)
from internimage.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY_ARCH = ["--model-arg", "channels=16", "--model-arg", "depths=[1,1,2,1]",
             "--model-arg", "groups=[1,2,4,8]"]


class PickledConfig:
    """Stands in for the yacs config that original training checkpoints pickle."""


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, command: str, *needles: str) -> str:
    assert code == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"internimage {command}: error: "), err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch digits model written by `internimage train` (model.safetensors)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    code = main(["train", "--quiet", "--epochs", "1", "--batch-size", "32",
                 "--set", "data.train_limit=64", "--set", "data.val_limit=32",
                 "--set", "model.kwargs.channels=16", "--set", "model.kwargs.groups=[1,2,4,8]",
                 "--output", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def digit_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    paths = []
    for i in range(3):
        pixels = (digits.images[i] / 16 * 255).astype("uint8")
        path = folder / f"digit_{digits.target[i]}.png"
        Image.fromarray(pixels).resize((32, 32)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def original_pth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The golden tiny T-style model from the original code, saved as an original .pth."""
    golden_path = REPO.parent / "shared" / "golden" / "model_t_like.pt"
    if not golden_path.is_file():
        pytest.fail(f"{golden_path} is missing (the suite needs ../shared/golden)")
    golden = torch.load(golden_path, weights_only=True)
    path = tmp_path_factory.mktemp("original") / "model_t_like.pth"
    torch.save({"model": {k: v.float() for k, v in golden["state_dict"].items()},
                "epoch": 3}, path)
    return path, golden


# --- entry points ---


def test_python_dash_m_and_console_script() -> None:
    result = subprocess.run([sys.executable, "-m", "internimage", "--help"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for command in ("models", "bench", "predict", "convert", "export", "train"):
        assert command in result.stdout
    script = Path(sys.executable).parent / "internimage"
    if script.exists():
        result = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0 and result.stdout.startswith("internimage ")


def test_bad_command_line_is_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bench", "--batch-size", "eight"])
    assert info.value.code == 2


# --- models ---


def test_models_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "models.json"
    code, stdout, _ = run(["models", "--filter", "internimage_t", "--json", str(out)], capsys)
    assert code == 0
    row = next(line for line in stdout.splitlines() if line.startswith("| internimage_t"))
    assert "in1k" in row and "29.92" in row and "224x224" in row and "64-128-256-512" in row
    (record,) = json.loads(out.read_text())
    assert record["params"] == 29_918_424  # the original's measured count
    assert 4.8e9 < record["macs"] < 5.0e9  # README: 5G
    assert record["flops_by_op"]["internimage.dcnv3"] > 0  # the op is counted


def test_flops_of_the_dcnv3_op_and_giant_models_on_meta() -> None:
    from internimage.dcnv3 import DCNv3
    from internimage.flops import count_flops, model_complexity

    with torch.device("meta"):
        module = DCNv3(channels=64, group=4)
    module_flops = count_flops(module, (14, 14, 64))["by_op"]  # DCNv3 input is NHWC
    # 5 multiply-adds (4 bilinear + 1 mask) per output element and sampling point
    assert module_flops["internimage.dcnv3"] == 2 * 5 * 14 * 14 * 64 * 9
    g = model_complexity("internimage_g")
    assert g["params"] == 3_076_373_352
    assert 2.6e12 < g["macs"] < 2.8e12  # README: 2700G at 512


def test_models_unknown_filter(capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["models", "--filter", "resnet"], capsys)
    assert_one_line_error(code, err, "models", "--filter")


# --- bench ---


def test_bench_small_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    code, stdout, err = run(["bench", "--batch-size", "1", "--img-size", "32", "--iters", "2",
                             "--warmup", "1", "--budget", "2", "--quiet", "--json", str(out),
                             "--paths", "eager,optimized"], capsys)
    assert code == 0, stdout + err
    assert "DCNv3 op (forward)" in stdout and "compiled ms" in stdout
    assert "| internimage_t | eager" in stdout and "| internimage_t | optimized" in stdout
    assert "| convnext_tiny | eager" in stdout and "convnext_tiny | optimized" not in stdout
    assert "latency internimage_t / convnext_tiny: eager " in stdout
    assert "best (" in stdout and "GEMM peak:" in stdout
    payload = json.loads(out.read_text())
    cases = payload["cases"]
    assert len([c for c in cases if c["part"] == "op"]) == 8  # 4 stages x 2 paths
    assert [(c["model"], c["path"]) for c in cases if c["part"] == "model"] == [
        ("internimage_t", "eager"), ("internimage_t", "optimized"), ("convnext_tiny", "eager")]
    assert all(c["error"] is None and c["median_s"] > 0 for c in cases)
    op0 = next(c for c in cases if c["part"] == "op")
    assert op0["input_shape"] == [1, 8, 8, 64] and op0["group"] == 4
    assert payload["environment"]["img_size"] == 32


def test_bench_train_mode(capsys: pytest.CaptureFixture) -> None:
    code, stdout, err = run(["bench", "--train", "--skip-op", "--compare", "none",
                             "--batch-size", "2", "--img-size", "32", "--iters", "1",
                             "--warmup", "0", "--dtype", "bfloat16", "--channels-last",
                             "--paths", "eager", "--quiet"], capsys)
    assert code == 0, stdout + err
    assert "train (forward+backward+AdamW step)" in stdout
    assert "DCNv3 op" not in stdout and "convnext" not in stdout


@pytest.mark.parametrize("args, needle", [
    (["--dtype", "float8"], "--dtype"),
    (["--model", "nonexistent_net"], "unknown model"),
    (["--compare", "nonexistent_net"], "--compare"),
    (["--batch-size", "0"], "--batch-size"),
    (["--paths", "eager,fast"], "--paths"),
    (["--paths", "optimized", "--train"], "--paths"),
])
def test_bench_bad_arguments(capsys: pytest.CaptureFixture, args: list[str], needle: str) -> None:
    code, _, err = run(["bench", "--quiet"] + args, capsys)
    assert_one_line_error(code, err, "bench", needle)


# --- predict ---


def test_predict_with_trained_checkpoint(trained: Path, digit_images: list[Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pred.json"
    code, stdout, err = run(["predict", *map(str, digit_images), "--checkpoint",
                             str(trained / "model.safetensors"), "--top-k", "3",
                             "--json", str(out)], capsys)
    assert code == 0, err
    results = json.loads(out.read_text())
    assert [r["image"] for r in results] == [str(p) for p in digit_images]
    for result in results:
        assert len(result["top_k"]) == 3
        assert all(p["label"] in [str(i) for i in range(10)] for p in result["top_k"])
        probs = [p["probability"] for p in result["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert str(digit_images[0]) in stdout


def test_predict_converted_original_matches_golden_logits(
        original_pth: tuple[Path, dict], tmp_path: Path, digit_images: list[Path],
        capsys: pytest.CaptureFixture) -> None:
    pth, golden = original_pth
    converted = tmp_path / "tiny.safetensors"
    code, stdout, err = run(["convert", str(pth), str(converted), "--model", "internimage_t",
                             *TINY_ARCH], capsys)
    assert code == 0, err
    assert "wrote" in stdout and converted.is_file()

    from internimage.commands import model_from_checkpoint

    model, _ = model_from_checkpoint(None, str(converted), False, torch.device("cpu"))
    with torch.no_grad():
        logits = model(golden["input"].float())
    torch.testing.assert_close(logits, golden["logits_fp32"].float(), atol=1e-4, rtol=1e-4)

    # the original .pth works directly too (with the architecture given)
    code, stdout, err = run(["predict", str(digit_images[0]), "--model", "internimage_t",
                             *TINY_ARCH, "--checkpoint", str(pth), "--top-k", "2"], capsys)
    assert code == 0, err
    assert stdout.count("%") == 2


def test_predict_pretrained_offline_is_one_line(digit_images: list[Path],
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(Path(digit_images[0]).parent / "hf_home"))
    code, _, err = run(["predict", str(digit_images[0]), "--model", "internimage_t",
                        "--pretrained"], capsys)
    assert_one_line_error(code, err, "predict", "--pretrained", "--checkpoint",
                          "internimage_t_1k_224.pth")


def test_predict_errors(trained: Path, digit_images: list[Path], tmp_path: Path,
                        capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["predict", str(digit_images[0]), "--model", "internimage_t"], capsys)
    assert_one_line_error(code, err, "predict", "--checkpoint FILE")
    code, _, err = run(["predict", str(tmp_path / "missing.png"), "--checkpoint",
                        str(trained / "model.safetensors")], capsys)
    assert_one_line_error(code, err, "predict", "IMAGE", "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    code, _, err = run(["predict", str(broken), "--checkpoint",
                        str(trained / "model.safetensors")], capsys)
    assert_one_line_error(code, err, "predict", "cannot read", "broken.png")
    code, _, err = run(["predict", str(digit_images[0]), "--checkpoint",
                        str(tmp_path / "nope.pth"), "--model", "internimage_t"], capsys)
    assert_one_line_error(code, err, "predict", "--checkpoint", "not found")
    code, _, err = run(["predict", str(digit_images[0]), "--checkpoint",
                        str(trained / "model.safetensors"), "--model", "internimage_t"], capsys)
    assert_one_line_error(code, err, "predict", "wrong --model")


# --- convert ---


def test_convert_errors(original_pth: tuple[Path, dict], tmp_path: Path,
                        capsys: pytest.CaptureFixture) -> None:
    pth, _ = original_pth
    code, _, err = run(["convert", str(tmp_path / "no.pth"), str(tmp_path / "o.safetensors"),
                        "--model", "internimage_t"], capsys)
    assert_one_line_error(code, err, "convert", "SRC", "not found")
    code, _, err = run(["convert", str(pth), str(tmp_path / "o.pt"), "--model",
                        "internimage_t"], capsys)
    assert_one_line_error(code, err, "convert", "DST", ".safetensors")
    code, _, err = run(["convert", str(pth), str(tmp_path / "o.safetensors"), "--model",
                        "internimage_q"], capsys)
    assert_one_line_error(code, err, "convert", "unknown model")
    # the full-size T does not match the tiny checkpoint: nothing is written
    code, _, err = run(["convert", str(pth), str(tmp_path / "o.safetensors"), "--model",
                        "internimage_t"], capsys)
    assert_one_line_error(code, err, "convert", "cannot convert", "wrong --model")
    assert list(tmp_path.glob("*.safetensors*")) == [] and list(tmp_path.glob(".*")) == []

    unsafe = tmp_path / "unsafe.pth"  # pickles a Python object, as original training files do
    torch.save({"model": {}, "config": PickledConfig()}, unsafe)
    code, _, err = run(["convert", str(unsafe), str(tmp_path / "o.safetensors"), "--model",
                        "internimage_t"], capsys)
    assert_one_line_error(code, err, "convert", "Refusing to load")


# --- export ---


def test_export_unavailable_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "internimage.export", None)  # import raises
    code, _, err = run(["export", "--model", "internimage_t", "--onnx",
                        str(tmp_path / "m.onnx")], capsys)
    assert_one_line_error(code, err, "export", "ONNX export is unavailable")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.skipif(importlib.util.find_spec("internimage.export") is None,
                    reason="internimage.export (export_onnx) is not in this checkout yet")
def test_export_onnx(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "digits.onnx"
    code, stdout, err = run(["export", "--checkpoint", str(trained / "model.safetensors"),
                             "--onnx", str(out), "--img-size", "32"], capsys)
    assert code == 0, err
    assert out.is_file() and out.stat().st_size > 0 and "wrote" in stdout
