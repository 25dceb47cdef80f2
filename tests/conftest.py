"""Shared test fixtures: the golden folders from the original InternImage and DCNv4 code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

GOLDEN_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
GOLDEN_FLASH_DIR = GOLDEN_DIR.parent / "golden-flash"


def golden_files(pattern: str, folder: Path = GOLDEN_DIR) -> list[Path]:
    """Golden files matching `pattern`; fails (never skips) when the folder is missing."""
    files = sorted(folder.glob(pattern))
    if not files:
        raise FileNotFoundError(
            f"no golden files matching {pattern!r} in {folder}: the parity tests need "
            f"../shared/{folder.name} beside the repository root"
        )
    return files


def load_golden(name: str) -> dict:
    """One golden file; fails (never skips) when it is missing."""
    path = GOLDEN_DIR / name
    if not path.is_file():
        pytest.fail(
            f"golden file {path} is missing: the parity tests need the shared golden vectors "
            f"in {GOLDEN_DIR} (see its README.md); they are never skipped"
        )
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.fail(f"golden folder {GOLDEN_DIR} is missing: parity cannot be checked")
    return GOLDEN_DIR
