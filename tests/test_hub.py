"""hubconf.py: torch.hub loads the models from a checkout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import timm
import torch

from internimage import FlashInternImage, InternImage

REPO = Path(__file__).resolve().parents[1]


def test_torch_hub_load_from_a_checkout() -> None:
    model = torch.hub.load(str(REPO), "internimage_t", source="local", pretrained=False,
                           num_classes=7)
    assert isinstance(model, InternImage) and model.num_classes == 7
    features = torch.hub.load(str(REPO), "internimage_s", source="local", pretrained=False,
                              features_only=True, out_indices=(2, 3))
    assert features.feature_info.reduction() == [16, 32]
    flash = torch.hub.load(str(REPO), "flash_internimage_t", source="local", pretrained=False,
                           num_classes=7)
    assert isinstance(flash, FlashInternImage) and flash.num_classes == 7


def test_hubconf_lists_every_registered_variant() -> None:
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entry_points = {name for name in dir(hubconf)
                    if name.startswith(("internimage_", "flash_internimage_"))}
    assert entry_points == set(timm.list_models(["internimage_*", "flash_internimage_*"]))
    assert hubconf.dependencies == ["torch", "timm"]
