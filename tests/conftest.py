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


def build_golden_model(model_class: type, golden: dict, core_op: str,
                       dtype: torch.dtype) -> torch.nn.Module:
    """`model_class` (InternImage or FlashInternImage) built from a golden model file's
    config, its original state dict loaded strictly through the checkpoint filter."""
    from internimage import checkpoint_filter_fn

    model = model_class(**dict(golden["config"], core_op=core_op))
    result = model.load_state_dict(checkpoint_filter_fn(golden["state_dict"], model))
    assert not result.missing_keys and not result.unexpected_keys
    return model.to(dtype).eval()


def run_golden_model(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """The outputs a golden model file holds: stem, stage maps, pre-logits and logits."""
    with torch.no_grad():
        stem = model.stem(x)
        final, stages = model.forward_intermediates(x)
        features = model.forward_features(x)
        pre_logits = model.forward_head(final, pre_logits=True)
        logits = model(x)
    torch.testing.assert_close(final, features, rtol=0, atol=0)
    return dict(stem=stem, stages=stages, pre_logits=pre_logits, logits=logits)


def nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def interrupt_training_in_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> object:
    """Makes ``internimage.train.train_one_epoch`` raise KeyboardInterrupt (Ctrl-C) when it is
    called for the ``epoch``-th time (1-based) in this process; returns the real function."""
    import internimage.train as train_module

    real = train_module.train_one_epoch
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    return real
