"""Shared test fixtures: the golden folders from the original InternImage and DCNv4 code."""

from __future__ import annotations

import re
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


_TO_ORIGINAL = [  # inverse of the filter, written independently for the test
    (r"^stem\.(conv[12])\.", r"patch_embed.\1."),
    (r"^stem\.(norm[12])\.", r"patch_embed.\1.1."),
    (r"^stages\.(\d+)\.downsample\.conv\.",
     lambda m: f"levels.{int(m.group(1)) - 1}.downsample.conv."),
    (r"^stages\.(\d+)\.downsample\.norm\.",
     lambda m: f"levels.{int(m.group(1)) - 1}.downsample.norm.1."),
    (r"^stages\.(\d+)\.norm\.", r"levels.\1.norm.0."),
    (r"^stages\.(\d+)\.post_norms\.(\d+)\.", r"levels.\1.post_norms.\2.0."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.(norm[12]|res_post_norm[12])\.",
     r"levels.\1.blocks.\2.\3.0."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.dcn\.dw_conv\.", r"levels.\1.blocks.\2.dcn.dw_conv.0."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.dcn\.dw_norm\.", r"levels.\1.blocks.\2.dcn.dw_conv.1.1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"levels.\1.blocks.\2."),
    (r"^head\.conv\.", "conv_head.0."),
    (r"^head\.norm\.", "conv_head.1.0."),
    (r"^head\.fc\.", "head."),
]


def to_original_layout(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in _TO_ORIGINAL:
            new, count = re.subn(pattern, replacement, key, count=1)
            if count:
                key = new
                break
        out[key] = value
    return out
