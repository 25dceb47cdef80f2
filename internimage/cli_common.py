"""Helpers shared by the ``internimage`` subcommands and the ``bench`` / ``train``
libraries: devices, model building, and the checkpoint functions of
:mod:`internimage.checkpoint` with errors that name the command-line option.

:func:`internimage.cli.main` turns :class:`CommandError` into a one-line message and a
non-zero exit status.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from internimage import checkpoint
from internimage.checkpoint import checkpoint_num_classes, save_safetensors
from internimage.cli.errors import CommandError, one_line
from internimage.files import atomic_path, atomic_write_bytes, atomic_write_text

__all__ = [
    "CommandError",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "resolve_device",
    "known_model_names",
    "build_model",
    "load_weights",
    "read_safetensors_metadata",
    "save_safetensors",
    "one_line",
    "checkpoint_num_classes",
    "load_state_dict_file",
]

#: Name of the bare :class:`internimage.InternImage` class, built from ``model.kwargs`` alone.
CUSTOM_MODEL = "internimage"
#: The bare classes of both families, by name: ``model.kwargs`` alone give the architecture.
CUSTOM_MODELS = {CUSTOM_MODEL: "InternImage", "flash_internimage": "FlashInternImage"}


# ---------------------------------------------------------------------------------------------
# Devices and models


def resolve_device(name: str | None) -> torch.device:
    """'auto'/None: CUDA when available, else CPU; otherwise the named device, checked."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise CommandError(
            f"--device: expected 'auto', 'cpu' or 'cuda[:N]', got {name!r}"
        ) from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device: {name!r} was asked for but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise CommandError(f"--device: expected 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
    return device


def known_model_names() -> list[str]:
    """The registered variants of both families (InternImage, FlashInternImage)."""
    import timm

    return timm.list_models(["internimage_*", "flash_internimage_*"])


def check_model_name(name: str, option: str = "--model") -> str:
    """Accepts a registered timm model (any family; tags allowed) or a bare class name
    (``'internimage'``, ``'flash_internimage'``)."""
    import timm

    if not isinstance(name, str) or not name:
        raise CommandError(f"{option}: expected a model name, got {name!r}")
    if name in CUSTOM_MODELS:
        return name
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        custom = " or ".join(f"'{n}'" for n in CUSTOM_MODELS)
        raise CommandError(
            f"{option}: unknown model {name!r}; expected one of {', '.join(known_model_names())}, "
            f"{custom} (architecture from model.kwargs) or another timm model name"
        )
    return name


def _custom_class(name: str) -> type[nn.Module]:
    import internimage

    return getattr(internimage, CUSTOM_MODELS[name])


def _check_custom_kwargs(cls: type[nn.Module], kwargs: Mapping[str, Any]) -> None:
    import inspect

    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise CommandError(
            f"model.kwargs: unknown {cls.__name__} argument(s) {unknown}; expected some of "
            f"{sorted(allowed)}"
        )


def build_model(
    name: str,
    num_classes: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """Builds ``name`` with timm (registered models) or the bare class (``'internimage'``:
    :class:`InternImage`, ``'flash_internimage'``: :class:`FlashInternImage`).

    ``num_classes`` None keeps the model's default. Bad names or arguments raise
    :class:`CommandError`.
    """
    import timm

    check_model_name(name)
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
        raise CommandError(f"model {name!r} with {kwargs}: {one_line(error)}") from error


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


# ---------------------------------------------------------------------------------------------
# Weights (the library functions of internimage.checkpoint, with the command line's errors)


def read_safetensors_metadata(path: str | os.PathLike,
                              option: str = "--checkpoint") -> dict[str, str]:
    """:func:`internimage.checkpoint.read_safetensors_metadata`; a damaged file is a
    :class:`CommandError` naming ``option``."""
    try:
        return checkpoint.read_safetensors_metadata(path)
    except ValueError as error:
        raise CommandError(f"{option}: {one_line(error)}") from error


def load_state_dict_file(
    path: str | os.PathLike, option: str = "--checkpoint"
) -> dict[str, Tensor]:
    """Tensors of an original ``.pth`` (any wrapper), a converted or trained ``.safetensors``
    file, always loaded safely (``weights_only=True``). Whatever is wrong with the file is
    one :class:`CommandError` naming ``option``."""
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"{option}: file not found: '{path}'")
    try:
        return checkpoint.load_original_checkpoint(path)
    except ValueError as error:  # empty, text, damaged, unsafe, or no tensors
        raise CommandError(f"{option}: {one_line(error)}") from error
    except OSError as error:
        raise CommandError(f"{option}: cannot read '{path}' ({one_line(error)})") from error


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str,
    allow_head_reset: bool = False,
) -> list[str]:
    """:func:`internimage.checkpoint.load_weights`; a mismatch is a :class:`CommandError`."""
    try:
        return checkpoint.load_weights(model, state_dict, source, allow_head_reset)
    except checkpoint.CheckpointMismatchError as error:
        raise CommandError(f"{one_line(error)} (wrong --model?)") from error


# ---------------------------------------------------------------------------------------------
# Hub access


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the Hugging Face hub answers a TCP connection (a quick probe, so commands fail
    in seconds instead of retrying for half a minute when there is no network)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False, "HF_HUB_OFFLINE is set"
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as error:
        return False, f"{host}:{port} unreachable: {error}"
