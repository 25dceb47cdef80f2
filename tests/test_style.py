"""The code base stays `ruff` clean (configuration in pyproject.toml)."""

import shutil
import subprocess
from pathlib import Path

import pytest


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed: pip install -e '.[test]'")
    repo_root = Path(__file__).resolve().parents[1]
    result = subprocess.run([ruff, "check", "."], cwd=repo_root, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
