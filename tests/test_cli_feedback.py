"""What the `internimage` command tells its user while and after it works: progress on long
steps (a bar on a terminal, plain lines in a log), inputs checked before a model is built,
one-line warnings where numbers would mislead, and the machine-fitting defaults."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from internimage.cli import main

TINY = ["--model", "internimage", "--model-arg", "channels=16", "--model-arg",
        "depths=[1,1,2,1]", "--model-arg", "groups=[1,2,4,8]", "--img-size", "32"]


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("WARNING: ")]


def image_folder(root: Path, classes: list[str], per_class: int = 2) -> Path:
    from PIL import Image

    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 40), (40 * index, 10 * i, 90)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def no_model_building(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if a command gets as far as building its model."""
    import internimage.cli.common as common

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the inputs were checked")

    monkeypatch.setattr(common, "_build_with_weights", refuse)


# --- progress ---


def test_line_progress_prints_plain_periodic_lines_in_a_log() -> None:
    from internimage.progress import LineProgress, progress, working

    log = io.StringIO()  # not a terminal
    assert isinstance(progress(3, "x", file=log), LineProgress)
    with LineProgress(3, "epoch 1 train", unit="batch", file=log, interval=0.0) as bar:
        for _ in range(3):
            bar.update(1)
            bar.set_postfix(loss="0.5")
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("epoch 1 train: 1/3 batch [") and "\r" not in log.getvalue()
    assert lines[-1].startswith("epoch 1 train: 3/3 batch [") and "loss=0.5" in lines[-1]

    quiet = io.StringIO()  # a step shorter than the interval prints nothing
    with LineProgress(2, "short", file=quiet, interval=60.0) as bar:
        bar.update(2)
    assert quiet.getvalue() == ""

    silent = io.StringIO()
    with progress(5, "off", enabled=False, file=silent) as bar:
        bar.update(5)
    assert silent.getvalue() == ""

    import internimage.progress as module

    log = io.StringIO()
    interval, module.LINE_INTERVAL = module.LINE_INTERVAL, 0.05
    try:
        with working("exporting t.onnx", file=log):
            import time

            time.sleep(0.3)
    finally:
        module.LINE_INTERVAL = interval
    assert re.match(r"exporting t\.onnx: \d+ s$", log.getvalue().splitlines()[0])


def test_bench_progress_lines_when_stderr_is_not_a_terminal(
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import internimage.progress as module

    monkeypatch.setattr(module, "LINE_INTERVAL", 0.0)
    code, out, err = run(["bench", "--img-size", "32", "--batch-size", "1", "--iters", "1",
                          "--warmup", "0", "--skip-op", "--compare", "none", "--paths",
                          "eager"], capsys)
    assert code == 0, err
    assert re.search(r"^set up internimage_t eager: \d/2 case \[", err, re.MULTILINE), err
    assert "\r" not in err
    assert out.startswith("internimage bench: ")  # the results come first on stdout


# --- checks before work ---


def test_predict_checks_images_before_building_the_model(
        tmp_path: Path, capsys: pytest.CaptureFixture, no_model_building: None) -> None:
    fake = tmp_path / "notimg.png"
    fake.write_text("not an image")
    code, _, err = run(["predict", str(fake), "--random-weights", *TINY], capsys)
    assert code == 1 and "IMAGE:" in err and "notimg.png" in err and "unreadable" in err
    assert len(err.strip().splitlines()) == 1, err
    code, _, err = run(["predict", str(fake), "--checkpoint", str(tmp_path / "no.pth"),
                        "--model", "internimage_t"], capsys)
    assert code == 1 and "--checkpoint: file not found" in err
    code, _, err = run(["predict", str(fake), "--random-weights", "--model", "nonexistent_net"],
                       capsys)
    assert code == 1 and "unknown model 'nonexistent_net'" in err


def test_validate_checks_images_before_building_the_model(
        tmp_path: Path, capsys: pytest.CaptureFixture, no_model_building: None) -> None:
    data = image_folder(tmp_path / "data", ["a", "b"])
    (data / "b" / "broken.png").write_bytes(b"\x89PNG broken")
    code, _, err = run(["validate", str(data), "--random-weights", *TINY], capsys)
    assert code == 1 and "DIR:" in err and "broken.png" in err, err


# --- random-weights smoke mode ---


def test_predict_and_validate_random_weights_smoke_mode(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    data = image_folder(tmp_path / "data", ["a", "b"])
    code, out, err = run(["predict", str(data / "a" / "0.png"), "--random-weights", *TINY,
                          "--model-arg", "num_classes=3", "--top-k", "2"], capsys)
    assert code == 0, err
    assert "random weights" in err and "meaningless" in err
    assert re.search(r"^  1\. +\d+\.\d\d%", out, re.MULTILINE), out
    code, _, err = run(["predict", str(data / "a" / "0.png"), "--model", "internimage_t"],
                       capsys)
    assert code == 1 and "--random-weights" in err  # named among the ways to give weights


# --- warnings ---


def test_validate_warns_on_positional_classes_and_a_top5_that_cannot_miss(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = image_folder(tmp_path / "data", ["cat", "dog"])
    code, out, err = run(["validate", str(data), "--random-weights", *TINY,
                          "--model-arg", "num_classes=3", "--num-workers", "0"], capsys)
    assert code == 0, err
    found = warnings_in(err)
    assert len(found) == 2, err
    assert "by sorted position, not by name" in found[0] and "(cat, dog)" in found[0]
    assert "top-5 accuracy is 100 % by construction" in found[1]
    assert "top-5 100.00%" in out  # what the warning is about

    code, _, err = run(["validate", str(data), "--random-weights", *TINY,
                        "--model-arg", "num_classes=2", "--num-workers", "0"], capsys)
    assert code == 0 and len(warnings_in(err)) == 1  # as many folders as classes: top-5 only


def test_bench_warns_when_other_work_shares_the_cores() -> None:
    from internimage.bench import Case, busy_warnings

    def case(label: str, wall: float, cpu: float, part: str = "model") -> Case:
        made = Case(part, label, lambda: None, 8, {"cpu_s": [cpu] * 3})
        made.samples = [wall] * 3
        return made

    quiet = {"device": "cpu", "cpu_count": 2, "threads": 2, "load_average_1min": 0.3}
    assert busy_warnings([case("internimage_t eager", 1.0, 1.9)], quiet) == []
    # an op case of a few ms is mostly synchronisation: it does not count
    assert busy_warnings([case("stage 3 compiled", 0.001, 0.0005, "op")], quiet) == []
    loaded = dict(quiet, load_average_1min=3.6)
    starved = [case("internimage_t eager", 1.0, 0.7), case("convnext_tiny eager", 1.0, 1.9)]
    found = busy_warnings(starved, loaded)
    assert len(found) == 2 and all("\n" not in line for line in found)
    assert "load average was 3.6 on 2 core(s)" in found[0] and "--threads 1" in found[0]
    assert "1 case(s)" in found[1] and "internimage_t eager, 0.70 CPU s" in found[1]
    assert busy_warnings(starved, dict(loaded, device="cuda:0")) == []


def test_train_warns_on_a_tiny_scaled_lr_and_a_run_in_warm_up_and_caps_workers(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from internimage.factory import available_cores

    code, out, err = run(["train", "--quiet", "--epochs", "1", "--batch-size", "16",
                          "--set", "optim.lr_base_batch=512", "--set", "optim.lr=2e-5",
                          "--set", "data.train_limit=32", "--set", "data.val_limit=16",
                          "--set", "model.kwargs.channels=16",
                          "--set", "model.kwargs.groups=[1,2,4,8]",
                          "--set", f"data.num_workers={available_cores() + 3}",
                          "--output", str(tmp_path / "run")], capsys)
    assert code == 0, err
    found = warnings_in(err)
    assert len(found) == 2, err
    assert "sched.warmup_epochs (2) >= sched.epochs (1)" in found[0]
    assert "--epochs" in found[0]
    assert "scales it by 0.0312 to 6.25e-07, below 1e-06" in found[1]
    capped = [line for line in err.splitlines() if "data.num_workers" in line]
    assert len(capped) == 1 and f"using {available_cores()}" in capped[0]
    assert "epoch 1/1:" in out


def test_the_cuda_home_notice_of_torch_is_not_printed_first() -> None:
    """torch.utils.cpp_extension logs 'No CUDA runtime is found, using CUDA_HOME=...' when
    Inductor imports it on a machine with a CUDA toolkit and no GPU; the command drops it."""
    import logging

    with pytest.raises(SystemExit):
        main(["--help"])
    logger = logging.getLogger("torch.utils.cpp_extension")

    def record(message: str) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.WARNING, __file__, 1, message,
                                 ("/usr/local/cuda",), None)

    assert not logger.filter(record("No CUDA runtime is found, using CUDA_HOME='%s'"))
    assert logger.filter(record("Error checking compiler version for %s"))
