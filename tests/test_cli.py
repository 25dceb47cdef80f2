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


@pytest.fixture(scope="module")
def flash_original_pth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The golden tiny FlashInternImage-T-style model from the original DCNv4 code, saved as
    an original .pth."""
    golden_path = REPO.parent / "shared" / "golden-flash" / "model_flash_t_like.pt"
    if not golden_path.is_file():
        pytest.fail(f"{golden_path} is missing (the suite needs ../shared/golden-flash)")
    golden = torch.load(golden_path, weights_only=True)
    path = tmp_path_factory.mktemp("original_flash") / "model_flash_t_like.pth"
    torch.save({"model": {k: v.float() for k, v in golden["state_dict"].items()},
                "epoch": 3}, path)
    return path, golden


FLASH_ARCH = ["--model-arg", "channels=32", "--model-arg", "depths=[1,1,2,1]",
              "--model-arg", "groups=[2,4,8,16]"]


# --- entry points ---


def test_python_dash_m_and_console_script() -> None:
    result = subprocess.run([sys.executable, "-m", "internimage", "--help"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for command in ("models", "bench", "predict", "convert", "export", "train", "validate"):
        assert command in result.stdout
    script = Path(sys.executable).parent / "internimage"
    if script.exists():
        result = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0 and result.stdout.startswith("internimage ")


def test_version_reports_the_build(capsys: pytest.CaptureFixture) -> None:
    from internimage import _C

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"internimage {internimage.__version__}\n"), out
    assert f"torch {torch.__version__}" in out
    assert (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build") in out
    assert "extension internimage._C:" in out and "CPU kernels" in out
    assert f"CPU kernels in use: {_C.cpu_isa()}" in out
    cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key("internimage::dcnv3", "CUDA")
    assert ("CUDA kernels" if cuda_kernels else "no CUDA kernels") in out


def test_bad_command_line_is_exit_2(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["bench", "--batch-size", "eight"])
    assert info.value.code == 2


# --- models ---


def test_models_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "models.json"
    code, stdout, _ = run(["models", "--filter", "*internimage_t.*", "--json", str(out)], capsys)
    assert code == 0
    row = next(line for line in stdout.splitlines() if line.startswith("| internimage_t"))
    assert "in1k" in row and "29.92" in row and "224x224" in row and "64-128-256-512" in row
    flash = next(line for line in stdout.splitlines()
                 if line.startswith("| flash_internimage_t"))
    assert "in1k" in flash and "29.82" in flash and "flash_intern_image_t_1k_224.pth" in flash
    record, flash_record = json.loads(out.read_text())  # InternImage first
    assert record["params"] == 29_918_424  # the original's measured count
    assert 4.8e9 < record["macs"] < 5.0e9  # README: 5G
    assert record["flops_by_op"]["internimage.dcnv3"] > 0  # the op is counted
    assert flash_record["arch"] == "flash_internimage_t"
    assert flash_record["hf_hub_id"] == "OpenGVLab/DCNv4"
    assert flash_record["params"] == 29_815_528
    assert flash_record["flops_by_op"]["internimage.dcnv4"] > 0


def test_models_filter_is_a_prefix_or_a_glob() -> None:
    from internimage.cli.models import matches

    assert matches("internimage_t.in1k", "internimage_t")
    assert not matches("flash_internimage_t.in1k", "internimage_t")  # not 'contains'
    assert not matches("internimage_xl.in22k", "internimage_l")
    assert matches("internimage_h_meta", "internimage_h")
    assert matches("flash_internimage_t.in1k", "*_t.*") and matches("internimage_t", "*_t*")
    assert not matches("internimage_s.in1k", "*_t*")


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


def test_flops_of_the_dcnv4_op_and_flash_internimage() -> None:
    from internimage.dcnv4 import DCNv4
    from internimage.flops import count_flops, model_complexity

    with torch.device("meta"):
        module = DCNv4(channels=64, group=4)
    module_flops = count_flops(module, (14, 14, 64))["by_op"]
    assert module_flops["internimage.dcnv4"] == 2 * 5 * 14 * 14 * 64 * 9  # as DCNv3 samples
    t = model_complexity("flash_internimage_t")
    assert t["params"] == 29_815_528 and t["flops_by_op"]["internimage.dcnv4"] > 0
    assert 4.8e9 < t["macs"] < 5.0e9  # InternImage-T's 5 GMACs, less the offset branch


def test_models_unknown_filter(capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["models", "--filter", "resnet"], capsys)
    assert_one_line_error(code, err, "models", "--filter")


# --- bench ---


def test_bench_small_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bench.json"
    code, stdout, err = run(["bench", "--batch-size", "1", "--img-size", "32", "--iters", "2",
                             "--warmup", "1", "--budget", "2", "--quiet", "--json", str(out)],
                            capsys)  # the default paths: eager, optimized
    assert code == 0, stdout + err
    assert "not timed: the torch.compile (Inductor) paths compiled, optimized+compiled; add " \
        "them with --paths eager,optimized,compiled,optimized+compiled" in stdout
    assert_like_the_documented_output(stdout)
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


def assert_like_the_documented_output(stdout: str) -> None:
    """docs/cli.md's example of the default bench output holds the lines a real run prints:
    each table header, and each other line up to its first '(', with numbers as '#'."""
    import re

    doc = (REPO / "docs" / "cli.md").read_text()
    example = doc.split("<!-- bench output -->\n```\n", 1)[1].split("\n```", 1)[0]

    def skeleton(line: str) -> str:
        return re.sub(r"\d+(\.\d+)*", "#", line.split("(", 1)[0]).strip()

    def header(line: str) -> list[str]:
        return [re.sub(r"\d+", "#", cell.strip()) for cell in line.strip("|").split("|")]

    real = stdout.splitlines()
    lines = example.splitlines()
    assert len(lines) > 15, example
    for index, line in enumerate(lines):
        if line.startswith("|"):
            if index + 1 < len(lines) and lines[index + 1].startswith("|-"):  # a header
                assert any(r.startswith("|") and header(r) == header(line) for r in real), line
        elif line.strip():
            assert any(skeleton(r) == skeleton(line) for r in real if r.strip()), line


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
    (["--paths", "eager,optimized", "--dtype", "bfloat16"], "--paths"),
    # BatchNorm cannot train on one value per channel (batch 1, a 1x1 final map)
    (["--train", "--batch-size", "1", "--img-size", "32", "--skip-op", "--compare", "none",
      "--iters", "1", "--warmup", "0"], "--batch-size 1"),
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
    assert "using internimage.optimize_for_inference" in stdout
    # the model as built gives the same classes with the same probabilities (float32)
    plain = tmp_path / "plain.json"
    code, stdout, err = run(["predict", *map(str, digit_images), "--checkpoint",
                             str(trained / "model.safetensors"), "--top-k", "3",
                             "--json", str(plain), "--no-optimize"], capsys)
    assert code == 0, err
    assert "optimize_for_inference" not in stdout
    for fused, built in zip(results, json.loads(plain.read_text()), strict=True):
        assert [p["index"] for p in fused["top_k"]] == [p["index"] for p in built["top_k"]]
        for a, b in zip(fused["top_k"], built["top_k"], strict=True):
            assert abs(a["probability"] - b["probability"]) < 1e-5


def test_predict_converted_original_matches_golden_logits(
        original_pth: tuple[Path, dict], tmp_path: Path, digit_images: list[Path],
        capsys: pytest.CaptureFixture) -> None:
    pth, golden = original_pth
    converted = tmp_path / "tiny.safetensors"
    code, stdout, err = run(["convert", str(pth), str(converted), "--model", "internimage_t",
                             *TINY_ARCH], capsys)
    assert code == 0, err
    assert "wrote" in stdout and converted.is_file()

    from internimage.cli.common import model_from_checkpoint

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
    assert_one_line_error(code, err, "predict", "IMAGE: 1 unreadable image(s)", "broken.png")
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
    # an existing file is kept unless --force is given (as convert does)
    out.write_bytes(b"keep me")
    args = ["export", "--checkpoint", str(trained / "model.safetensors"), "--onnx", str(out),
            "--img-size", "32"]
    code, _, err = run(args, capsys)
    assert_one_line_error(code, err, "export", "--onnx", "exists", "--force")
    assert out.read_bytes() == b"keep me"
    code, stdout, err = run(args + ["--force"], capsys)
    assert code == 0, err
    assert out.stat().st_size > 1000


class _Payload:
    """Unpickling this calls os.system: a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_one_line_naming_the_global(
        tmp_path: Path, digit_images: list[Path], capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "config": _Payload(marker)}, evil)
    commands = {
        "convert": ["convert", str(evil), str(tmp_path / "o.safetensors"), "--model",
                    "internimage_t"],
        "predict": ["predict", str(digit_images[0]), "--model", "internimage_t",
                    "--checkpoint", str(evil)],
        "export": ["export", "--model", "internimage_t", "--checkpoint", str(evil),
                   "--onnx", str(tmp_path / "m.onnx")],
        "train": ["train", "--checkpoint", str(evil), "--output", str(tmp_path / "run")],
    }
    for command, args in commands.items():
        code, _, err = run(args, capsys)
        line = assert_one_line_error(code, err, command, "posix.system", "safe_globals(")
        assert "weights_only=False" not in line.replace(" ", "")
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "run").exists() and not (tmp_path / "o.safetensors").exists()


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the one-line error must say about the file)."""
    from safetensors.torch import save_file

    good_pth, good_st = folder / "good.pth", folder / "good.safetensors"
    torch.save({"model": {"w": torch.zeros(4096)}}, good_pth)
    save_file({"w": torch.zeros(4096)}, str(good_st))
    files = {
        "text": ("text.pth", b"hello world, this is not a checkpoint\n", "text file"),
        "yaml": ("config.pth", b"model:\n  name: internimage_t\n", "text file"),
        "empty": ("empty.pth", b"", "empty"),
        "truncated": ("truncated.pth", good_pth.read_bytes()[:3000], "truncated"),
        "st_truncated": ("t.safetensors", good_st.read_bytes()[:3000], "safetensors"),
        "st_corrupt": ("c.safetensors", b"\x10" + b"\x00" * 7 + b"{not json at all}",
                       "safetensors"),
        "st_text": ("x.safetensors", b"hello\n", "safetensors"),
    }
    out = {}
    for key, (name, data, needle) in files.items():
        path = folder / name
        path.write_bytes(data)
        out[key] = (path, needle)
    return out


@pytest.mark.parametrize("command", ["convert", "predict", "export", "train"])
def test_bad_checkpoint_files_are_one_line_about_the_file(
        command: str, tmp_path: Path, digit_images: list[Path],
        capsys: pytest.CaptureFixture) -> None:
    for key, (path, needle) in _bad_files(tmp_path).items():
        args = {
            "convert": ["convert", str(path), str(tmp_path / "o.safetensors"), "--model",
                        "internimage_t"],
            "predict": ["predict", str(digit_images[0]), "--model", "internimage_t",
                        "--checkpoint", str(path)],
            "export": ["export", "--model", "internimage_t", "--checkpoint", str(path),
                       "--onnx", str(tmp_path / "m.onnx")],
            "train": ["train", "--checkpoint", str(path), "--output", str(tmp_path / "run")],
        }[command]
        code, _, err = run(args, capsys)
        line = assert_one_line_error(code, err, command, str(path), needle)
        assert "wrong --model" not in line, (key, line)  # the file is at fault, not --model
        assert "weights_only=False" not in line.replace(" ", ""), (key, line)
        assert not (tmp_path / "run").exists() and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("size", ["-5", "0", "8"])
def test_predict_bad_img_size(size: str, trained: Path, digit_images: list[Path],
                              capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["predict", str(digit_images[0]), "--checkpoint",
                        str(trained / "model.safetensors"), "--img-size", size], capsys)
    assert_one_line_error(code, err, "predict", "--img-size", ">= 32", f"got {size}")


@pytest.mark.parametrize("size", ["0", "-5"])
def test_img_size_zero_or_negative_is_refused(size: str, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """0 used to be taken as 'the default' (bench); every command names the option."""
    for command, args in {
        "bench": ["bench", "--quiet", "--skip-op", "--compare", "none", "--iters", "1"],
        "export": ["export", "--model", "internimage_t", "--onnx", str(tmp_path / "m.onnx")],
        "train": ["train", "--print-config"],
    }.items():
        code, _, err = run(args + ["--img-size", size], capsys)
        assert_one_line_error(code, err, command, "--img-size", f"got {size}")


def test_predict_a_folder(trained: Path, digit_images: list[Path], tmp_path: Path,
                          capsys: pytest.CaptureFixture) -> None:
    import shutil

    folder = tmp_path / "images"
    (folder / "more").mkdir(parents=True)
    shutil.copy(digit_images[0], folder / "b.png")
    shutil.copy(digit_images[1], folder / "more" / "a.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "pred.json"
    code, stdout, err = run(["predict", str(folder), str(digit_images[2]), "--checkpoint",
                             str(trained / "model.safetensors"), "--top-k", "1",
                             "--json", str(out)], capsys)
    assert code == 0, err
    images = [r["image"] for r in json.loads(out.read_text())]
    assert images == [str(folder / "b.png"), str(folder / "more" / "a.png"),
                      str(digit_images[2])]
    (tmp_path / "empty").mkdir()
    code, _, err = run(["predict", str(tmp_path / "empty"), "--checkpoint",
                        str(trained / "model.safetensors")], capsys)
    assert_one_line_error(code, err, "predict", "IMAGE", "no images", "empty")


def test_convert_slices_a_22k_head_to_1k(original_pth: tuple[Path, dict], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    from safetensors.torch import load_file

    from internimage import imagenet22k_to_1k_indices

    _, golden = original_pth
    state = {k: v.float() for k, v in golden["state_dict"].items()}
    hidden = state["head.weight"].shape[1]
    state["head.weight"] = torch.randn(21841, hidden)
    state["head.bias"] = torch.randn(21841)
    src = tmp_path / "tiny_22k.pth"
    torch.save({"model": state}, src)
    dst = tmp_path / "tiny_1k.safetensors"
    code, stdout, err = run(["convert", str(src), str(dst), "--model", "internimage_t",
                             *TINY_ARCH, "--num-classes", "1000"], capsys)
    assert code == 0, err
    assert "num_classes 1000" in stdout
    tensors = load_file(str(dst))
    rows = imagenet22k_to_1k_indices()
    assert torch.equal(tensors["head.fc.weight"], state["head.weight"][rows])
    assert torch.equal(tensors["head.fc.bias"], state["head.bias"][rows])
    code, _, err = run(["convert", str(src), str(tmp_path / "x.safetensors"), "--model",
                        "internimage_t", *TINY_ARCH, "--num-classes", "0"], capsys)
    assert_one_line_error(code, err, "convert", "--num-classes", "got 0")


# --- validate ---


def _digits_folder(root: Path, per_class: int = 3) -> Path:
    """An ImageFolder of scikit-learn digits: root/<digit>/<i>.png (32x32 grey)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[int, int] = {}
    for image, label in zip(digits.images, digits.target):
        if counts.get(int(label), 0) >= per_class:
            continue
        counts[int(label)] = counts.get(int(label), 0) + 1
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image / 16 * 255).astype("uint8")
        Image.fromarray(pixels).resize((32, 32)).save(folder / f"{counts[int(label)]}.png")
    return root


def test_validate_top1_top5_on_an_image_folder(trained: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from internimage.cli.common import model_from_checkpoint

    data = _digits_folder(tmp_path / "digits")
    out = tmp_path / "val.json"
    checkpoint = str(trained / "model.safetensors")
    code, stdout, err = run(["validate", str(data), "--checkpoint", checkpoint,
                             "--batch-size", "7", "--json", str(out)], capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["images"] == 30 and result["classes"] == 10
    assert 0 <= result["top1"] <= result["top5"] <= 100
    assert f"top-1 {result['top1']:.2f}%" in stdout and f"top-5 {result['top5']:.2f}%" in stdout

    # the same numbers, image by image, with the model's own eval transform
    model, info = model_from_checkpoint(None, checkpoint, False, torch.device("cpu"))
    transform = create_transform(**resolve_data_config(model=model), is_training=False)
    top1 = top5 = 0
    for path in sorted(data.rglob("*.png")):
        with Image.open(path) as image:
            x = transform(image.convert("RGB")).unsqueeze(0)
        with torch.no_grad():
            ranked = model(x)[0].topk(5).indices.tolist()
        label = info["class_names"].index(path.parent.name)
        top1 += ranked[0] == label
        top5 += label in ranked
    assert result["top1"] == pytest.approx(top1 / 30 * 100, abs=100 / 30 + 1e-9)
    assert result["top5"] == pytest.approx(top5 / 30 * 100, abs=100 / 30 + 1e-9)

    # a train/val root validates its val/ split
    (tmp_path / "root").mkdir()
    data.rename(tmp_path / "root" / "val")
    code, stdout2, err = run(["validate", str(tmp_path / "root"), "--checkpoint", checkpoint],
                             capsys)
    assert code == 0, err
    assert f"top-1 {result['top1']:.2f}%" in stdout2


def test_validate_errors(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = str(trained / "model.safetensors")
    code, _, err = run(["validate", str(tmp_path / "nope"), "--checkpoint", checkpoint], capsys)
    assert_one_line_error(code, err, "validate", "DIR", "folder not found")
    (tmp_path / "empty").mkdir()
    code, _, err = run(["validate", str(tmp_path / "empty"), "--checkpoint", checkpoint], capsys)
    assert_one_line_error(code, err, "validate", "DIR", "no class folders")
    data = _digits_folder(tmp_path / "digits", per_class=1)
    (data / "7").rename(data / "seven")
    code, _, err = run(["validate", str(data), "--checkpoint", checkpoint], capsys)
    assert_one_line_error(code, err, "validate", "DIR", "'seven'", "class names")
    code, _, err = run(["validate", str(data), "--checkpoint", checkpoint, "--batch-size", "0"],
                       capsys)
    assert_one_line_error(code, err, "validate", "--batch-size", "got 0")


# --- FlashInternImage through every command ---


def test_flash_internimage_convert_predict_export(
        flash_original_pth: tuple[Path, dict], tmp_path: Path, digit_images: list[Path],
        capsys: pytest.CaptureFixture) -> None:
    pth, golden = flash_original_pth
    converted = tmp_path / "flash.safetensors"
    code, stdout, err = run(["convert", str(pth), str(converted), "--model",
                             "flash_internimage_t", *FLASH_ARCH], capsys)
    assert code == 0, err
    assert "flash_internimage_t, num_classes 10" in stdout

    from internimage import FlashInternImage
    from internimage.cli.common import model_from_checkpoint

    model, _ = model_from_checkpoint(None, str(converted), False, torch.device("cpu"))
    assert isinstance(model, FlashInternImage)
    with torch.no_grad():
        logits = model(golden["input"].float())
    # golden-flash README: float32 logits within 2e-5 of the original's
    torch.testing.assert_close(logits.double(), golden["logits"], rtol=0, atol=2e-5)

    code, stdout, err = run(["predict", str(digit_images[0]), "--checkpoint", str(converted),
                             "--top-k", "2"], capsys)
    assert code == 0, err
    assert stdout.count("%") == 2
    assert "optimize_for_inference" not in stdout  # nothing fused for DCNv4

    onnx_file = tmp_path / "flash.onnx"
    code, stdout, err = run(["export", "--checkpoint", str(converted), "--onnx",
                             str(onnx_file), "--img-size", "64", "--static-batch"], capsys)
    assert code == 0, err  # (a static batch halves the export time; dynamic is tested above)
    assert "input 1x3x64x64, static batch, standard ONNX ops" in stdout
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    inputs = golden["input"].float()[:1]  # the static batch of 1
    (ort_logits,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    torch.testing.assert_close(torch.from_numpy(ort_logits), logits[:1], rtol=1e-4, atol=1e-4)


def test_flash_checkpoint_for_an_internimage_is_one_line(
        flash_original_pth: tuple[Path, dict], tmp_path: Path, digit_images: list[Path],
        capsys: pytest.CaptureFixture) -> None:
    pth, _ = flash_original_pth
    code, _, err = run(["convert", str(pth), str(tmp_path / "o.safetensors"), "--model",
                        "internimage_t", *FLASH_ARCH], capsys)
    assert_one_line_error(code, err, "convert", "FlashInternImage (DCNv4) state dict",
                          "build flash_internimage_*")
    code, _, err = run(["predict", str(digit_images[0]), "--model", "internimage_t",
                        *FLASH_ARCH, "--checkpoint", str(pth)], capsys)
    assert_one_line_error(code, err, "predict", "FlashInternImage (DCNv4) state dict",
                          "wrong --model")


def test_bench_flash_internimage_times_the_dcnv4_op(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    # --train: forward and backward of the op and the model (and no GEMM-peak measurement,
    # which inference runs add and test_bench_small_run covers)
    out = tmp_path / "bench.json"
    code, stdout, err = run(["bench", "--model", "flash_internimage_t", "--compare", "none",
                             "--batch-size", "2", "--img-size", "32", "--iters", "1",
                             "--warmup", "0", "--budget", "1", "--quiet", "--json", str(out),
                             "--train", "--paths", "eager"], capsys)
    assert code == 0, stdout + err
    assert "DCNv4 op (forward+backward) at flash_internimage_t's stage shapes" in stdout
    cases = json.loads(out.read_text())["cases"]
    ops = [c for c in cases if c["part"] == "op"]
    assert len(ops) == 8 and {c["op"] for c in ops} == {"DCNv4"}
    assert [c["offset_mask_channels"] for c in ops if c["impl"] == "compiled"] == \
        [112, 216, 432, 864]
    assert [(c["model"], c["path"]) for c in cases if c["part"] == "model"] == [
        ("flash_internimage_t", "eager")]
    assert all(c["error"] is None and c["median_s"] > 0 for c in cases)
