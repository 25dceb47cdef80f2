"""Models built by name, the device they run on and their weights files, for the engines
(:mod:`internimage.train`, :mod:`internimage.bench`) and the command line.

Every function raises ``ValueError`` / ``FileNotFoundError`` whose message starts with the
option it was given (``option="--model"`` on the command line, ``"model.name"`` in a training
config), so a caller can show it as it is.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from internimage import checkpoint

__all__ = [
    "CUSTOM_MODEL",
    "CUSTOM_MODELS",
    "resolve_device",
    "available_cores",
    "known_model_names",
    "check_model_name",
    "build_model",
    "custom_pretrained_cfg",
    "load_state_dict_file",
]

#: Name of the bare :class:`internimage.InternImage` class, built from ``model.kwargs`` alone.
CUSTOM_MODEL = "internimage"
#: The bare classes of both families, by name: ``model.kwargs`` alone give the architecture.
CUSTOM_MODELS = {CUSTOM_MODEL: "InternImage", "flash_internimage": "FlashInternImage"}


def resolve_device(name: str | None, option: str = "device") -> torch.device:
    """'auto'/None: CUDA when available, else CPU; otherwise the named device, checked."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = f"{option}: expected 'auto', 'cpu' or 'cuda[:N]', got {name!r}"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ValueError(expected) from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(expected)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option}: {name!r} was asked for but CUDA is not available here")
    return device


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def known_model_names() -> list[str]:
    """The registered variants of both families (InternImage, FlashInternImage)."""
    import timm

    import internimage  # noqa: F401  (registers the families with timm)

    return timm.list_models(["internimage_*", "flash_internimage_*"])


def check_model_name(name: str, option: str = "model.name") -> str:
    """Accepts a registered timm model (any family; tags allowed) or a bare class name
    (``'internimage'``, ``'flash_internimage'``); otherwise ``ValueError`` naming ``option``."""
    import timm

    import internimage  # noqa: F401  (registers the families with timm)

    if not isinstance(name, str) or not name:
        raise ValueError(f"{option}: expected a model name, got {name!r}")
    if name in CUSTOM_MODELS:
        return name
    if not timm.is_model(name.split(".", 1)[0]):
        custom = " or ".join(f"'{n}'" for n in CUSTOM_MODELS)
        raise ValueError(
            f"{option}: unknown model {name!r}; expected one of {', '.join(known_model_names())}, "
            f"{custom} (architecture from model.kwargs) or another timm model name"
        )
    return name


def _custom_class(name: str) -> type[nn.Module]:
    import internimage

    return getattr(internimage, CUSTOM_MODELS[name])


def _check_custom_kwargs(cls: type[nn.Module], kwargs: Mapping[str, Any]) -> None:
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(
            f"model.kwargs: unknown {cls.__name__} argument(s) {unknown}; expected some of "
            f"{sorted(allowed)}"
        )


def build_model(
    name: str,
    num_classes: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    pretrained: bool = False,
    option: str = "model.name",
) -> nn.Module:
    """Builds ``name`` with timm (registered models) or the bare class (``'internimage'``:
    :class:`InternImage`, ``'flash_internimage'``: :class:`FlashInternImage`).

    ``num_classes`` None keeps the model's default. A bad name is a ``ValueError`` naming
    ``option``; arguments the constructor refuses are a ``ValueError`` naming the model.
    """
    import timm

    check_model_name(name, option)
    kwargs = dict(kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    try:
        if name in CUSTOM_MODELS:
            cls = _custom_class(name)
            _check_custom_kwargs(cls, kwargs)
            with torch.device(device or "cpu"):
                model = cls(**kwargs)
            model.pretrained_cfg = custom_pretrained_cfg(model, architecture=name)
            return model
        return timm.create_model(name, pretrained=pretrained, device=device, **kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"model {name!r} with {kwargs}: {_one_line(error)}") from error


def custom_pretrained_cfg(model: nn.Module, img_size: int = 224,
                          architecture: str = CUSTOM_MODEL) -> dict[str, Any]:
    """A ``pretrained_cfg`` for a bare InternImage or FlashInternImage (what
    ``resolve_data_config`` reads)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return dict(
        architecture=architecture, input_size=(3, img_size, img_size), interpolation="bicubic",
        crop_pct=1.0, crop_mode="center", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        num_classes=getattr(model, "num_classes", 0), first_conv="stem.conv1",
        classifier="head.fc",
    )


def load_state_dict_file(path: str | os.PathLike,
                         option: str = "model.checkpoint") -> dict[str, Tensor]:
    """Tensors of an original ``.pth`` (any wrapper), a converted or trained ``.safetensors``
    file, always loaded safely (``weights_only=True``). A missing file is a
    ``FileNotFoundError``, whatever else is wrong with it a ``ValueError``, both naming
    ``option``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option}: file not found: '{path}'")
    try:
        return checkpoint.load_original_checkpoint(path)
    except ValueError as error:  # empty, text, damaged, unsafe, or no tensors
        raise ValueError(f"{option}: {_one_line(error)}") from error
    except OSError as error:
        raise ValueError(f"{option}: cannot read '{path}' ({_one_line(error)})") from error


def _one_line(error: BaseException) -> str:
    return "; ".join(part.strip() for part in str(error).splitlines() if part.strip())
