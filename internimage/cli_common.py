"""Helpers shared by the ``internimage`` subcommands: errors, atomic writes, model building,
weight loading and the metadata stored next to the weights.

Everything here is usable from Python too; the command-line layer (:mod:`internimage.cli`)
turns :class:`CommandError` into a one-line message and a non-zero exit status.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from internimage.cli.errors import CommandError, one_line

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
]

#: Name of the bare :class:`internimage.InternImage` class, built from ``model.kwargs`` alone.
CUSTOM_MODEL = "internimage"


# ---------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it replaces ``path`` atomically
    (``os.replace``), on error it is removed. ``suffix`` keeps an extension some writers need
    (e.g. '.safetensors', '.png')."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}",
                                    dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and ``os.replace``."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


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
    """The registered InternImage variants."""
    import timm

    return timm.list_models("internimage_*")


def check_model_name(name: str, option: str = "--model") -> str:
    """Accepts a registered timm model (any family; tags allowed) or ``'internimage'``."""
    import timm

    if not isinstance(name, str) or not name:
        raise CommandError(f"{option}: expected a model name, got {name!r}")
    if name == CUSTOM_MODEL:
        return name
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise CommandError(
            f"{option}: unknown model {name!r}; expected one of {', '.join(known_model_names())}, "
            f"'{CUSTOM_MODEL}' (architecture from model.kwargs) or another timm model name"
        )
    return name


def _check_custom_kwargs(kwargs: Mapping[str, Any]) -> None:
    import inspect

    from internimage.internimage import InternImage

    allowed = set(inspect.signature(InternImage.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise CommandError(
            f"model.kwargs: unknown InternImage argument(s) {unknown}; expected some of "
            f"{sorted(allowed)}"
        )


def build_model(
    name: str,
    num_classes: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    pretrained: bool = False,
) -> nn.Module:
    """Builds ``name`` with timm (registered models) or :class:`InternImage` (``'internimage'``).

    ``num_classes`` None keeps the model's default. Bad names or arguments raise
    :class:`CommandError`.
    """
    import timm

    check_model_name(name)
    kwargs = dict(kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    try:
        if name == CUSTOM_MODEL:
            from internimage.internimage import InternImage

            _check_custom_kwargs(kwargs)
            with torch.device(device or "cpu"):
                model = InternImage(**kwargs)
            model.pretrained_cfg = custom_pretrained_cfg(model)
            return model
        return timm.create_model(name, pretrained=pretrained, device=device, **kwargs)
    except (TypeError, ValueError) as error:
        raise CommandError(f"model {name!r} with {kwargs}: {one_line(error)}") from error


def custom_pretrained_cfg(model: nn.Module, img_size: int = 224) -> dict[str, Any]:
    """A ``pretrained_cfg`` for a bare InternImage (what ``resolve_data_config`` reads)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    return dict(
        architecture=CUSTOM_MODEL, input_size=(3, img_size, img_size), interpolation="bicubic",
        crop_pct=1.0, crop_mode="center", mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        num_classes=getattr(model, "num_classes", 0), first_conv="stem.conv1",
        classifier="head.fc",
    )


# ---------------------------------------------------------------------------------------------
# Weights


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file ({} for other files)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # a corrupt header
        raise CommandError(
            f"'{path}': not a readable safetensors file ({one_line(error)})"
        ) from error


def load_state_dict_file(
    path: str | os.PathLike, option: str = "--checkpoint"
) -> dict[str, Tensor]:
    """Tensors of an original ``.pth`` (any wrapper), a converted or trained ``.safetensors``
    file, always loaded safely (``weights_only=True``)."""
    from internimage.checkpoint import UnsafeCheckpointError, load_original_checkpoint

    path = Path(path)
    if not path.is_file():
        raise CommandError(f"{option}: file not found: '{path}'")
    try:
        return load_original_checkpoint(path)
    except UnsafeCheckpointError as error:
        raise CommandError(f"{option}: {error}") from error
    except (ValueError, RuntimeError, OSError, EOFError) as error:
        raise CommandError(
            f"{option}: cannot read '{path}' as a checkpoint ({one_line(error)})"
        ) from error


def checkpoint_num_classes(state_dict: Mapping[str, Tensor]) -> int | None:
    """The classifier size of a (converted) state dict, or None when it has no classifier."""
    for key in ("head.fc.weight", "head.weight", "fc.weight", "classifier.weight"):
        value = state_dict.get(key)
        if isinstance(value, Tensor) and value.ndim == 2:
            return int(value.shape[0])
    return None


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str,
    allow_head_reset: bool = False,
) -> list[str]:
    """Loads (original-layout or converted) weights into ``model``.

    The keys pass through :func:`internimage.checkpoint_filter_fn` for InternImage models.
    With ``allow_head_reset`` a classifier of another size is skipped (the model keeps its
    freshly initialised head); the returned notes say so. Any other mismatch raises
    :class:`CommandError` naming the keys.
    """
    from internimage.internimage import InternImage, checkpoint_filter_fn

    notes: list[str] = []
    if isinstance(model, InternImage):
        state_dict = checkpoint_filter_fn(state_dict, model)
    state_dict = dict(state_dict)
    target = model.state_dict()
    classifier = _classifier_prefix(model)
    if classifier is not None:
        weight = state_dict.get(f"{classifier}.weight")
        own = target.get(f"{classifier}.weight")
        if weight is not None and own is not None and weight.shape[0] != own.shape[0]:
            if not allow_head_reset:
                raise CommandError(
                    f"{source}: its classifier has {weight.shape[0]} classes, the model "
                    f"{own.shape[0]}; pass the matching --num-classes"
                )
            for key in [k for k in state_dict if k.startswith(f"{classifier}.")]:
                del state_dict[key]
            notes.append(
                f"the checkpoint's head has {weight.shape[0]} classes but --num-classes is "
                f"{own.shape[0]}: the classifier head '{classifier}' was re-initialised"
            )
    bad_shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}"
        for k, v in state_dict.items()
        if k in target and isinstance(v, Tensor) and v.shape != target[k].shape
    ]
    if bad_shapes:
        raise CommandError(
            f"{source}: tensor shapes do not match the model: {bad_shapes[:4]}"
            f"{' ...' if len(bad_shapes) > 4 else ''} (wrong --model?)"
        )
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys
               if classifier is None or not k.startswith(f"{classifier}.") or not notes]
    if missing or result.unexpected_keys:
        raise CommandError(
            f"{source}: does not match the model (wrong --model?): missing keys "
            f"{missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected keys "
            f"{result.unexpected_keys[:4]}{' ...' if len(result.unexpected_keys) > 4 else ''}"
        )
    return notes


def _classifier_prefix(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier")
    if isinstance(classifier, str) and classifier:
        return classifier
    return None


def save_safetensors(
    path: str | os.PathLike, state_dict: Mapping[str, Tensor], metadata: Mapping[str, Any]
) -> None:
    """Atomically saves ``state_dict`` (cloning tensors that share storage) with string
    metadata (non-string values are JSON-encoded)."""
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        value = value.detach().to("cpu").contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)


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
