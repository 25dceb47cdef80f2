"""InternImage as a backbone in the libraries people use on current torch, run for real on small
inputs: segmentation_models_pytorch (Unet, DeepLabV3+), transformers (UperNet, Mask2Former,
DETR's out_indices), torchvision Mask R-CNN over a features_only + FPN backbone; each saved and
reloaded in a fresh process (which, like any user, imports internimage first: timm only knows
the models once the package has registered them). These libraries come with the package's
``integrations`` extra (part of ``all``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import transformers
from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign

import internimage  # noqa: F401  (registers the models with timm)

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach the network (transformers asks the Hub about unknown names)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _train_step(model: nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# --- segmentation_models_pytorch -------------------------------------------------------------


def smp_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    cls = {"unet": smp.Unet, "deeplabv3plus": smp.DeepLabV3Plus}[kind]
    return cls("tu-internimage_t", encoder_weights=None, classes=3)


@pytest.mark.parametrize("kind", ["unet", "deeplabv3plus"])
def test_smp_forward_backward(kind: str) -> None:
    model = smp_model(kind)
    out = model(X)
    assert out.shape == (2, 3, 64, 64)
    _train_step(model, out.square().mean())
    if kind == "deeplabv3plus":  # asks the encoder for output_stride 16
        assert model.encoder.model.feature_info.reduction()[-1] == 16


# --- transformers ---------------------------------------------------------------------------


def backbone_config() -> transformers.TimmBackboneConfig:
    return transformers.TimmBackboneConfig(backbone="internimage_t", out_indices=(0, 1, 2, 3),
                                           use_pretrained_backbone=False)


def upernet() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.UperNetConfig(backbone_config=backbone_config(), num_labels=3,
                                        hidden_size=32, auxiliary_in_channels=256,
                                        auxiliary_channels=32)
    return transformers.UperNetForSemanticSegmentation(config)


def mask2former() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone_config(), num_labels=3, hidden_dim=32, mask_feature_size=32,
        feature_size=32, num_queries=5, decoder_layers=2, encoder_layers=1,
        dim_feedforward=64, encoder_feedforward_dim=64, num_attention_heads=2)
    return transformers.Mask2FormerForUniversalSegmentation(config)


def test_transformers_upernet_forward_backward() -> None:
    model = upernet()
    out = model(pixel_values=X, labels=torch.randint(0, 3, (2, 64, 64)))
    assert out.logits.shape == (2, 3, 64, 64)
    _train_step(model, out.loss)


def test_transformers_mask2former_forward_backward() -> None:
    model = mask2former()
    masks = [torch.randint(0, 2, (1, 64, 64)).float() for _ in range(2)]
    out = model(pixel_values=X, mask_labels=masks, class_labels=[torch.tensor([1])] * 2)
    assert out.masks_queries_logits.shape == (2, 5, 16, 16)
    _train_step(model, out.loss)


def test_detr_default_out_indices_get_a_clear_message() -> None:
    """DETR's timm defaults ask for ResNet's out_indices (1, 2, 3, 4); the message says what
    InternImage has and what to pass instead."""
    with pytest.raises(ValueError, match=r"got \(1, 2, 3, 4\).*out_indices=\(1, 2, 3\)"):
        transformers.DetrForObjectDetection(
            transformers.DetrConfig(backbone="internimage_t", use_pretrained_backbone=False))
    config = transformers.DetrConfig(backbone_config=transformers.TimmBackboneConfig(
        backbone="internimage_t", out_indices=(1, 2, 3), use_pretrained_backbone=False))
    model = transformers.DetrForObjectDetection(config).eval()
    with torch.no_grad():
        assert model(pixel_values=X).logits.shape[:2] == (2, 100)


# --- torchvision Mask R-CNN -----------------------------------------------------------------


class FPNBackbone(nn.Module):
    """A features_only InternImage (strides 8, 16, 32) with torchvision's FPN on top: the
    ``out_channels`` / OrderedDict contract torchvision's detectors expect."""

    def __init__(self, name: str = "internimage_t", out_channels: int = 64) -> None:
        super().__init__()
        self.body = timm.create_model(name, features_only=True, out_indices=(1, 2, 3))
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def mask_rcnn() -> nn.Module:
    """Mask R-CNN on the three FPN levels (anchors and RoI pooling per level)."""
    torch.manual_seed(0)
    levels = ["0", "1", "2"]
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,)), aspect_ratios=((0.5, 1.0, 2.0),) * 3)
    return MaskRCNN(FPNBackbone(), num_classes=3, min_size=64, max_size=64,
                    rpn_anchor_generator=anchors,
                    box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
                    mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
                    rpn_batch_size_per_image=32, box_batch_size_per_image=16)


def test_torchvision_mask_rcnn_train_step_and_eval() -> None:
    model = mask_rcnn().train()
    images = list(X)
    targets = [dict(boxes=torch.tensor([[8.0, 8.0, 40.0, 48.0]]), labels=torch.tensor([1]),
                    masks=torch.zeros(1, 64, 64, dtype=torch.uint8).index_fill_(1, torch.arange(
                        8, 48), 1)) for _ in images]
    losses = model(images, targets)
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = sum(losses.values())
    _train_step(model, loss)
    optimizer.step()
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2 and {"boxes", "labels", "scores", "masks"} <= set(detections[0])


# --- save here, reload in a fresh process ---------------------------------------------------


_RELOAD = textwrap.dedent('''
    import json, sys, os
    import torch
    import internimage  # the rule: import the package before building its models
    import segmentation_models_pytorch as smp
    import transformers
    sys.path.insert(0, os.environ["TESTS_DIR"])
    from test_integrations import X, mask_rcnn
    root = sys.argv[1]
    loaded = {
        "unet": smp.from_pretrained(f"{root}/unet"),
        "deeplabv3plus": smp.from_pretrained(f"{root}/deeplabv3plus"),
        "upernet": transformers.UperNetForSemanticSegmentation.from_pretrained(f"{root}/upernet"),
    }
    rcnn = mask_rcnn()
    rcnn.load_state_dict(torch.load(f"{root}/mask_rcnn.pt", weights_only=True))
    loaded["mask_rcnn"] = rcnn
    out = {}
    with torch.no_grad():
        for name, model in loaded.items():
            model.eval()
            y = model(list(X))[0]["boxes"] if name == "mask_rcnn" else model(X)
            y = y.logits if hasattr(y, "logits") else y
            out[name] = y.flatten().tolist()
    print(json.dumps(out))
''')


def test_saved_models_reload_in_a_fresh_process(tmp_path: Path) -> None:
    models = {"unet": smp_model("unet"), "deeplabv3plus": smp_model("deeplabv3plus"),
              "upernet": upernet(), "mask_rcnn": mask_rcnn()}
    expected = {}
    with torch.no_grad():
        for name, model in models.items():
            model.eval()
            if name == "mask_rcnn":
                torch.save(model.state_dict(), tmp_path / "mask_rcnn.pt")
                expected[name] = model(list(X))[0]["boxes"]
                continue
            model.save_pretrained(tmp_path / name)
            y = model(X)
            expected[name] = y.logits if hasattr(y, "logits") else y
    env = dict(os.environ, TESTS_DIR=str(Path(__file__).parent), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", _RELOAD, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reloaded = json.loads(done.stdout.strip().splitlines()[-1])
    for name, ours in expected.items():
        theirs = torch.tensor(reloaded[name]).reshape(ours.shape)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4, msg=name)
