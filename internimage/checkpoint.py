"""Checkpoints: safe loading of original InternImage and FlashInternImage files, strict
loading into a model, safetensors saving and conversion.

Original ``.pth`` files (``OpenGVLab/InternImage`` and ``OpenGVLab/DCNv4`` on the Hugging Face
hub) are a dict with the state dict under ``'model'``; training checkpoints also carry
optimizer state and a pickled yacs ``config``, which loads as a plain dict through an inert
stand-in (:data:`ORIGINAL_CHECKPOINT_GLOBALS`). Loading is always
``torch.load(weights_only=True)``: a file that pickles any other Python global is refused with
an error that names the globals and offers only safe ways out, because unpickling arbitrary
objects can execute code from the file.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from internimage.checkpoint_filter import WRAPPER_KEYS, checkpoint_filter_fn, unwrap_state_dict
from internimage.files import atomic_path

__all__ = [
    "UnsafeCheckpointError",
    "CheckpointMismatchError",
    "ORIGINAL_CHECKPOINT_GLOBALS",
    "load_checkpoint_file",
    "load_original_checkpoint",
    "read_safetensors_metadata",
    "checkpoint_num_classes",
    "state_dict_mismatches",
    "load_weights",
    "save_safetensors",
    "convert_checkpoint",
]

PathLike = str | os.PathLike


class UnsafeCheckpointError(ValueError):
    """A checkpoint pickles Python globals that ``torch.load(weights_only=True)`` refuses; the
    message names them and offers only safe ways out."""


class CheckpointMismatchError(ValueError):
    """A readable checkpoint whose keys or tensor shapes do not match the model."""


class _YacsCfgNode:
    """Unpickles as ``yacs.config.CfgNode`` (the training config that the original
    ``save_checkpoint`` stores under 'config'): builds an ``OrderedDict`` (one of the few types
    ``weights_only`` may fill and set attributes on), so neither yacs nor code from the file
    runs."""

    def __new__(cls, *args: Any, **kwargs: Any) -> OrderedDict:
        return OrderedDict()


#: The globals original InternImage checkpoints carry besides tensors: the yacs config class,
#: mapped to an inert stand-in. Every load here allows them; with plain ``torch.load``:
#: ``with torch.serialization.safe_globals(ORIGINAL_CHECKPOINT_GLOBALS): torch.load(...)``.
ORIGINAL_CHECKPOINT_GLOBALS: list[tuple[Any, str]] = [(_YacsCfgNode, "yacs.config.CfgNode")]

_QUALIFIED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL\s+([A-Za-z_][\w.]*)")  # both spellings torch uses
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE",
               "SHORT_BINUNICODE", "BINUNICODE8"}


def _pickle_globals(data: bytes) -> list[str]:
    """'module.name' of the GLOBAL / STACK_GLOBAL opcodes in the pickles at the start of
    ``data``. ``pickletools`` only disassembles: nothing is constructed or called."""
    names: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        strings: list[str] = []
        memo: dict[int, Any] = {}
        last: Any = None
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                if opcode.name in _STRING_OPS:
                    last = str(arg)
                    strings.append(last)
                elif opcode.name == "MEMOIZE":
                    memo[len(memo)] = last
                elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = last
                elif opcode.name in ("GET", "BINGET", "LONG_BINGET"):
                    last = memo.get(int(arg))
                    if isinstance(last, str):
                        strings.append(last)
                else:
                    last = None
        except Exception:  # storage bytes after a legacy torch.save pickle, or garbage
            break
    return names


def _allowed_global_names() -> set[str]:
    try:  # the names weights_only allows (torch's defaults and the active allowlist)
        from torch import _weights_only_unpickler as unpickler

        return set(unpickler._get_allowed_globals()) | set(unpickler._get_user_allowed_globals())
    except Exception:  # private API: without it, every global found is listed
        return set()


def _blocked_globals(path: Path, error: Exception) -> list[str]:
    """The globals of ``path`` that weights_only refuses, found without unpickling."""
    names = _GLOBAL_IN_MESSAGE.findall(str(error))
    try:
        if zipfile.is_zipfile(path):
            names += torch.serialization.get_unsafe_globals_in_checkpoint(path)
        else:
            allowed = _allowed_global_names()
            names += [n for n in _pickle_globals(path.read_bytes()) if n not in allowed]
    except Exception:  # a damaged file: the names from the error are all there is
        pass
    # A truncated file ends inside a name ('collect.', 'collections.Ord'): not a global.
    allowed = _allowed_global_names()
    return [name for name in dict.fromkeys(names) if _QUALIFIED_NAME.fullmatch(name)
            and not any(a.startswith(name) and a != name for a in allowed)]


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # the PROTO opcode that starts protocol >= 2 pickles (torch.save's)


def _check_not_empty(path: Path) -> bytes:
    """The first bytes of ``path``; an empty file is a ValueError."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not head:
        raise ValueError(f"'{path}' is empty (0 bytes), not a checkpoint")
    return head


def _describe(head: bytes) -> str:
    """'a text file (...)' or 'a file starting with ...' for error messages."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"a file starting with the bytes {head[:16]!r}"
    if all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"a text file (starting {text[:32]!r})"
    return f"a file starting with the bytes {head[:16]!r}"


def _short(error: BaseException) -> str:
    """The first sentence of an error from torch or safetensors, never their advice."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = text.split(". ")[0][:160]
    return type(error).__name__ if "weights_only" in text else text


def _unreadable_safetensors(path: Path, head: bytes, error: BaseException) -> ValueError:
    if len(head) < 8:
        what = f"too short for a safetensors header ({len(head)} bytes)"
    elif _describe(head).startswith("a text file"):
        what = _describe(head)
    else:
        what = f"truncated or damaged ({_short(error)})"
    return ValueError(f"'{path}' is not a readable safetensors file: {what}")


def _refusal_message(path: Path, names: list[str]) -> str:
    found = (f"Python globals that torch.load(weights_only=True) does not allow: "
             f"{', '.join(names)}" if names
             else "pickle content that torch.load(weights_only=True) does not allow")
    return (
        f"Refusing to load '{path}': it pickles {found}. Unpickling them could run code from "
        "the file; nothing from it was run, and this package only loads checkpoints with "
        "weights_only=True. Original InternImage checkpoints carry no global besides "
        "yacs.config.CfgNode (their training config), which is allowed here as a plain dict, "
        "so this file holds something else. Safe ways out: (1) extract the tensors: get the "
        "weights as a plain state dict of tensors (torch.save(model.state_dict(), ...)) or as "
        "safetensors, and load that file; (2) with torch.load itself, allow exactly the "
        "classes original checkpoints carry: `with torch.serialization.safe_globals("
        "internimage.checkpoint.ORIGINAL_CHECKPOINT_GLOBALS): torch.load(path, "
        "weights_only=True)`. Do not allow the globals listed above unless you know what "
        "they do."
    )


def load_checkpoint_file(
    path: PathLike,
    map_location: str | torch.device = "cpu",
    safe_globals: Iterable[Any] | None = None,
) -> Any:
    """Loads a ``.pth``/``.pt`` file with ``weights_only=True``, or a ``.safetensors`` file.

    Args:
        path: the checkpoint file.
        map_location: where tensors are loaded.
        safe_globals: classes/functions to allow-list for this load only, besides
            :data:`ORIGINAL_CHECKPOINT_GLOBALS` (passed to
            ``torch.serialization.safe_globals``); only classes you know to be inert data.

    Raises:
        FileNotFoundError: the file does not exist.
        UnsafeCheckpointError: the file pickles globals ``weights_only`` refuses (named).
        ValueError: the file is empty, text, truncated or damaged (the message says which).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: '{path}'")
    head = _check_not_empty(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as error:  # safetensors' own error type: a damaged header or data
            raise _unreadable_safetensors(path, head, error) from error
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)):
        raise ValueError(f"'{path}' is not a PyTorch checkpoint: {_describe(head)}, neither "
                         "a torch.save archive nor a pickle")
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        raise ValueError(f"'{path}' is a truncated or damaged torch.save archive (its zip "
                         "directory is missing); download or copy it again")
    allowed = ORIGINAL_CHECKPOINT_GLOBALS + list(safe_globals or [])
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            names = _blocked_globals(path, error)
            if names:
                raise UnsafeCheckpointError(_refusal_message(path, names)) from error
            raise ValueError(
                f"'{path}' cannot be unpickled with weights_only=True: its pickle data is "
                "truncated or damaged, or uses opcodes that safe loading does not support"
            ) from error
        except (RuntimeError, EOFError, OSError, KeyError, IndexError, ValueError, TypeError,
                AttributeError, struct.error) as error:  # what torch raises on damaged files
            raise ValueError(f"'{path}' is a truncated or damaged PyTorch checkpoint "
                             f"({_short(error)})") from error


def load_original_checkpoint(
    path: PathLike,
    use_ema: bool = False,
    map_location: str | torch.device = "cpu",
    safe_globals: Iterable[Any] | None = None,
) -> dict[str, Tensor]:
    """The tensors of an original InternImage checkpoint, keys as stored (original layout).

    Unwraps ``'model'`` (or ``'model_ema'`` when ``use_ema`` and present), ``'state_dict'`` or
    ``'module'``; other entries (optimizer, lr_scheduler, epoch, ...) are dropped. See
    :func:`load_checkpoint_file` for ``safe_globals`` and the errors.
    """
    checkpoint = load_checkpoint_file(path, map_location, safe_globals)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"'{path}' does not hold a state dict: expected a mapping, got "
            f"{type(checkpoint).__name__}"
        )
    ema = checkpoint.get("model_ema") if use_ema else None
    if isinstance(ema, Mapping):
        checkpoint = ema
    else:
        unwrapped = unwrap_state_dict(checkpoint)  # the filter's own wrapper handling
        if use_ema and unwrapped is checkpoint:
            raise ValueError(f"use_ema=True but '{path}' has no 'model_ema' entry")
        checkpoint = unwrapped
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}
    if not tensors:
        keys = (["model_ema"] if use_ema else []) + list(WRAPPER_KEYS)
        raise ValueError(f"'{path}' holds no tensors under {keys} or at the top level")
    return tensors


def read_safetensors_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file ({} for other files).

    Raises:
        ValueError: the file ends in '.safetensors' but is empty or its header cannot be
            read.
    """
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    head = _check_not_empty(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # a damaged header
        raise _unreadable_safetensors(path, head, error) from error


def checkpoint_num_classes(state_dict: Mapping[str, Tensor]) -> int | None:
    """The classifier size of a (converted) state dict, or None when it has no classifier."""
    for key in ("head.fc.weight", "head.weight", "fc.weight", "classifier.weight"):
        value = state_dict.get(key)
        if isinstance(value, Tensor) and value.ndim == 2:
            return int(value.shape[0])
    return None


def state_dict_mismatches(
    state_dict: Mapping[str, Tensor], expected: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """``(missing keys, unexpected keys, 'key: (checkpoint shape) vs (model shape)')``."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and isinstance(v, Tensor) and v.shape != expected[k].shape
    ]
    return missing, unexpected, mismatched


def _first(items: list[str]) -> str:
    return f"{len(items)} {items[:4]}{' ...' if len(items) > 4 else ''}"


def _classifier_prefix(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier")
    if isinstance(classifier, str) and classifier:
        return classifier
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):  # a bare model without a pretrained_cfg
        head = get_classifier()
        for name, module in model.named_modules():
            if module is head and name and not isinstance(head, nn.Identity):
                return name
    return None


def load_weights(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str = "state_dict",
    allow_head_reset: bool = False,
) -> list[str]:
    """Loads (original-layout or converted) weights into ``model``, strictly.

    The keys pass through :func:`internimage.checkpoint_filter_fn` for InternImage and
    FlashInternImage models. With ``allow_head_reset`` a classifier of another size is skipped
    (the model keeps its freshly initialised head); the returned notes say so.

    Raises:
        CheckpointMismatchError: a missing or unexpected key or a shape mismatch (named, with
            ``source``), a checkpoint of the other family, or a classifier of another size
            without ``allow_head_reset``.
    """
    from internimage.network import InternImageBase

    notes: list[str] = []
    if isinstance(model, InternImageBase):
        try:
            state_dict = checkpoint_filter_fn(state_dict, model)
        except ValueError as error:  # e.g. a FlashInternImage checkpoint for an InternImage
            raise CheckpointMismatchError(f"{source}: {error}") from error
    state_dict = dict(state_dict)
    target = model.state_dict()
    classifier = _classifier_prefix(model)
    if classifier is not None:
        weight = state_dict.get(f"{classifier}.weight")
        own = target.get(f"{classifier}.weight")
        if weight is not None and own is not None and weight.shape[0] != own.shape[0]:
            if not allow_head_reset:
                raise CheckpointMismatchError(
                    f"{source}: its classifier has {weight.shape[0]} classes, the model "
                    f"{own.shape[0]}; build the model with num_classes={weight.shape[0]}"
                )
            for key in [k for k in state_dict if k.startswith(f"{classifier}.")]:
                del state_dict[key]
            notes.append(
                f"{source}: its classifier has {weight.shape[0]} classes, the model "
                f"{own.shape[0]}: the classifier head '{classifier}' was re-initialised"
            )
    missing, unexpected, bad_shapes = state_dict_mismatches(state_dict, target)
    if bad_shapes:
        raise CheckpointMismatchError(
            f"{source}: tensor shapes do not match the model (checkpoint vs model): "
            f"{_first(bad_shapes)}")
    if notes:  # the re-initialised head is expected to be missing
        missing = [k for k in missing if not k.startswith(f"{classifier}.")]
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{source}: does not match the model: missing keys {_first(missing)}, "
            f"unexpected keys {_first(unexpected)}")
    model.load_state_dict(state_dict, strict=False)
    return notes


def save_safetensors(
    path: PathLike, state_dict: Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None
) -> None:
    """Atomically saves ``state_dict`` as safetensors (on the CPU, contiguous, cloning tensors
    that share storage, which safetensors refuses) with string metadata (other values are
    JSON-encoded)."""
    import json

    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        value = value.detach().to("cpu").contiguous()
        if value.untyped_storage().data_ptr() in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def convert_checkpoint(
    src: PathLike,
    dst: PathLike,
    model_name: str = "internimage_t",
    use_ema: bool = False,
    safe_globals: Iterable[Any] | None = None,
    **model_kwargs: Any,
) -> Path:
    """Converts an original checkpoint into a safetensors file in this project's layout.

    The keys are converted with :func:`internimage.checkpoint_filter_fn` and validated
    against ``timm.create_model(model_name, num_classes=<from the checkpoint's head>,
    **model_kwargs)`` built on the meta device (strict: every key and shape must match). The
    result loads with ``timm.create_model(model_name, pretrained=True,
    pretrained_cfg_overlay=dict(file=dst))`` or ``load_state_dict``.

    Args:
        src: original ``.pth`` (raw state dict or under 'model' / 'state_dict' / 'module').
        dst: output ``.safetensors`` path (parent directories are created).
        model_name: a registered InternImage or FlashInternImage variant, e.g.
            'internimage_b' or 'flash_internimage_b'.
        use_ema: take 'model_ema' instead of 'model' when the file has both.
        safe_globals: see :func:`load_checkpoint_file`.
        **model_kwargs: extra model arguments (e.g. a non-default architecture).

    Returns:
        The ``dst`` path.
    """
    import timm

    if not isinstance(model_name, str) or not timm.is_model(model_name):
        raise ValueError(f"model_name must be a registered timm model name, got {model_name!r}")
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"dst must end in '.safetensors', got '{dst}'")
    state_dict = checkpoint_filter_fn(load_original_checkpoint(src, use_ema, "cpu", safe_globals))
    model_kwargs.setdefault("num_classes", checkpoint_num_classes(state_dict) or 0)
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, **model_kwargs)
    try:
        state_dict = checkpoint_filter_fn(state_dict, model)
    except ValueError as error:  # a checkpoint of the other family
        raise CheckpointMismatchError(str(error)) from error
    missing, unexpected, mismatched = state_dict_mismatches(state_dict, model.state_dict())
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"'{src}' does not match {model_name} (model kwargs {model_kwargs}): missing keys "
            f"{_first(missing)}, unexpected keys {_first(unexpected)}, shape mismatches "
            f"(checkpoint vs model) {_first(mismatched)}"
        )
    metadata = {"format": "pt", "model_name": model_name, "source": Path(src).name,
                "num_classes": str(model_kwargs["num_classes"])}
    save_safetensors(dst, state_dict, metadata)
    return dst
