"""The package as users install it: a wheel built from the sources, installed into a fresh
folder, trains the default recipe from outside the source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _copy_sources(dst: Path) -> None:
    """The files a wheel is built from (no compiled extension, no build folder)."""
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.pyc")
    for folder in ("internimage", "csrc"):
        shutil.copytree(REPO / folder, dst / folder, ignore=ignore)


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip wheel`` + ``pip install --target``: the installed package, not the sources."""
    root = tmp_path_factory.mktemp("wheel")
    src, wheels, target = root / "src", root / "dist", root / "site"
    src.mkdir()
    _copy_sources(src)
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "2"), FORCE_CUDA="0",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
         "-w", str(wheels), str(src)],
        capture_output=True, text=True, env=env, timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = wheels.glob("internimage_timm-*.whl")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
         str(wheel)], capture_output=True, text=True, env=env, timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return target


def test_installed_wheel_trains_the_default_recipe(installed_wheel: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(installed_wheel), OMP_NUM_THREADS="1")
    where = subprocess.run(
        [sys.executable, "-c", "import internimage; print(internimage.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed_wheel), where.stdout

    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "internimage", "train", "--quiet", "--epochs", "1",
         "--batch-size", "32", "--set", "data.train_limit=64", "--set", "data.val_limit=32",
         "--set", "model.kwargs.channels=16", "--set", "model.kwargs.groups=[1,2,4,8]",
         "--output", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "digits" in result.stdout and "done: 1 epoch(s)" in result.stdout
    assert (out / "model.safetensors").is_file() and (out / "state.pt").is_file()
    config = (out / "config.yaml").read_text()
    assert "name: internimage" in config and "max_shift: 3" in config  # digits_tiny's values
