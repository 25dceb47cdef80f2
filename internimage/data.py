"""Datasets for ``internimage train``: an ImageFolder tree (``train/`` and ``val/``) or the
embedded default, scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes, no
download), upscaled to a small RGB input.

Everything is validated up front (folders, classes, readable images) so a bad dataset fails
before any output is written. Errors are ``FileNotFoundError`` (a missing folder),
``ValueError`` (a bad layout or image; :class:`ImageDecodeError` while training) and
``ImportError`` (the digits without scikit-learn).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["DigitsDataset", "digits_split", "ImageFolderData", "scan_image_folder",
           "class_folder_names", "scan_class_folders", "check_images", "eval_transform",
           "ImageDecodeError", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)


class ImageDecodeError(ValueError):
    """An image of the dataset could not be decoded while loading a batch."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


# ---------------------------------------------------------------------------------------------
# Embedded digits


def digits_split(val_fraction: float = 0.2, seed: int = 0
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
    """scikit-learn's digits, split per class with a fixed permutation.

    Returns ``(train_images, train_labels, val_images, val_labels, class_names)``; images are
    float tensors ``(N, 8, 8)`` in [0, 1]. The split depends only on ``val_fraction`` and
    ``seed``: every class contributes ``round(val_fraction * count)`` images to validation.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the embedded digits data (used when no image folder is given) needs scikit-learn: "
            "pip install 'internimage-timm[train]'"
        ) from error
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for cls in range(10):
        idx = np.flatnonzero(digits.target == cls)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(val_fraction * len(idx)))
        val_idx.extend(idx[:n_val].tolist())
        train_idx.extend(idx[n_val:].tolist())
    train_idx.sort()
    val_idx.sort()
    return (images[train_idx], labels[train_idx], images[val_idx], labels[val_idx],
            [str(c) for c in range(10)])


class DigitsDataset(Dataset):
    """Digits upscaled (bilinear) to ``img_size``, repeated to 3 channels and normalised with
    mean/std 0.5. Training adds a random shift of up to ``max_shift`` pixels (zero padding is
    the digits' background), drawn from torch's global RNG."""

    def __init__(self, images: Tensor, labels: Tensor, img_size: int, train: bool = False,
                 max_shift: int = 0) -> None:
        self.images = F.interpolate(images.unsqueeze(1), size=(img_size, img_size),
                                    mode="bilinear", align_corners=False).clamp_(0, 1)
        self.labels = labels
        self.train = train
        self.max_shift = int(max_shift)
        self.mean = torch.tensor(DIGITS_MEAN).view(3, 1, 1)
        self.std = torch.tensor(DIGITS_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.train and self.max_shift > 0:
            s = self.max_shift
            dx, dy = (torch.randint(-s, s + 1, (2,))).tolist()
            size = image.shape[-1]
            padded = F.pad(image, (s, s, s, s))
            image = padded[:, s + dy:s + dy + size, s + dx:s + dx + size]
        image = (image.expand(3, -1, -1) - self.mean) / self.std
        return image, int(self.labels[index])


# ---------------------------------------------------------------------------------------------
# Image folders


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def class_folder_names(folder: str | Path) -> list[str]:
    """The sorted class folder names of one ImageFolder split (hidden folders skipped),
    without listing the images."""
    return sorted(p.name for p in Path(folder).iterdir() if p.is_dir()
                  and not p.name.startswith("."))


def scan_class_folders(folder: str | Path) -> tuple[list[str], dict[str, list[Path]]]:
    """One split of an ImageFolder tree: ``folder/<class>/<image>``.

    Returns ``(sorted class names, {class: sorted image paths})``; a missing folder, no class
    folders or a class folder without images are errors.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: '{folder}'")
    classes = class_folder_names(folder)
    if not classes:
        raise ValueError(
            f"'{folder}' has no class folders (expected {folder}/<class>/<image>)"
        )
    files = {cls: _images_in(folder / cls) for cls in classes}
    empty = [cls for cls, paths in files.items() if not paths]
    if empty:
        raise ValueError(
            f"class folder(s) without images in '{folder}': {empty[:5]}"
            f"{' ...' if len(empty) > 5 else ''} (extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return classes, files


def scan_image_folder(root: str | Path) -> dict[str, Any]:
    """Validates an ImageFolder tree and lists it.

    ``root`` must hold ``train/`` and ``val/``, each with one sub-folder per class holding at
    least one image; both splits must have the same class folders. Returns ``{'classes': [...],
    'train': [(path, label)], 'val': [(path, label)]}``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"folder not found: '{root}'")
    splits: dict[str, dict[str, list[Path]]] = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise ValueError(
                f"'{root}' must contain '{split}/' (expected {root}/train/<class>/*.jpg "
                f"and {root}/val/<class>/*.jpg), '{folder}' is missing"
            )
        splits[split] = scan_class_folders(folder)[1]
    train_classes, val_classes = list(splits["train"]), list(splits["val"])
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise ValueError(
            f"train/ and val/ must have the same class folders; only in train: "
            f"{only_train[:5]}, only in val: {only_val[:5]}"
        )
    out: dict[str, Any] = {"classes": train_classes}
    for split, files in splits.items():
        out[split] = [(path, label) for label, cls in enumerate(train_classes)
                      for path in files[cls]]
    return out


def check_images(paths: Sequence[Path], progress: Callable[[int], None] | None = None) -> None:
    """Opens every image (header and data integrity via PIL ``verify``); raises
    ``ValueError`` listing the unreadable ones."""
    from PIL import Image

    bad: list[str] = []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # PIL raises many types for corrupt files
            bad.append(f"'{path}' ({_one_line(error)[:80]})")
        if progress is not None:
            progress(i + 1)
    if bad:
        raise ValueError(
            f"{len(bad)} unreadable image(s): {'; '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}; remove or replace them"
        )


def load_rgb(path: str) -> Any:
    """PIL loader used by :class:`ImageFolderData`; a decoding error names the file."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            return image.convert("RGB")
    except Exception as error:
        raise ImageDecodeError(f"cannot decode image '{path}' ({_one_line(error)[:80]})") \
            from error


def eval_transform(data_config: dict[str, Any]) -> Callable:
    """timm's evaluation transform for a data config (resize, centre crop, normalise), as
    validation during training uses it."""
    from timm.data import create_transform

    return create_transform(
        data_config["input_size"], is_training=False,
        interpolation=data_config["interpolation"], mean=data_config["mean"],
        std=data_config["std"], crop_pct=data_config.get("crop_pct"),
        crop_mode=data_config.get("crop_mode"),
    )


class ImageFolderData(Dataset):
    """``(path, label)`` samples with a transform (torchvision ImageFolder semantics)."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable | None) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = load_rgb(str(path))
        if self.transform is not None:
            image = self.transform(image)
        return image, label
