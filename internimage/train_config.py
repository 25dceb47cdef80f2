"""Training recipes: the config schema with defaults, YAML loading (with ``base:``
inheritance), ``--set key=value`` overrides and validation.

A recipe is a YAML mapping of sections (``model``, ``data``, ``aug``, ``optim``, ``sched``,
``ema``, ``train``). Every key must exist in :data:`DEFAULTS` (``model.kwargs`` is free-form:
its keys are the model constructor's); an unknown key is an error naming the key and the known
ones. A recipe may start with ``base: other.yaml`` (a path relative to the recipe, or a recipe
name) whose values it overrides.

Errors are :class:`ConfigError` (a ``ValueError`` that records the config key) and
``FileNotFoundError``; ``internimage train`` adds the command-line option they came from.

The defaults are the original InternImage ImageNet-1k recipe for T/S/B (300 epochs, AdamW
5e-4 per 512 images, cosine with 20 warm-up epochs, label smoothing 0.1, mixup 0.8 / cutmix
1.0, RandAugment, random erasing 0.25, EMA 0.9999, gradient clipping 5.0).
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "DEFAULTS", "config_dir", "resolve_recipe", "load_recipe",
           "apply_override", "set_key", "get_key", "validate_config", "dump_config"]

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "name": "internimage_t",     # registered timm name, or 'internimage' /
                                     # 'flash_internimage' (the bare class, kwargs only)
        "kwargs": {},                # extra constructor arguments (free-form)
        "checkpoint": None,          # initial weights: original .pth or .safetensors
        "num_classes": None,         # None: the number of classes in the data
        "drop_path_rate": 0.1,
        "grad_checkpointing": False,
    },
    "data": {
        "dir": None,                 # ImageFolder root with train/ and val/; None: digits
        "img_size": None,            # None: the model's pretrained input size
        "batch_size": 128,           # per process
        "num_workers": 4,
        "val_fraction": 0.2,         # embedded digits: share held out for validation
        "train_limit": None,         # use only the first N training samples (smoke runs)
        "val_limit": None,
        "check_images": True,        # open every image before training starts
        "max_shift": 0,              # embedded digits: random shift in pixels
        "hflip": 0.5,
        "scale": [0.08, 1.0],
        "auto_augment": "rand-m9-mstd0.5-inc1",
        "color_jitter": 0.4,
        "re_prob": 0.25,
        "interpolation": None,       # None: the model's (bicubic for InternImage)
        "crop_pct": None,
        "mean": None,
        "std": None,
    },
    "aug": {
        "mixup": 0.8,
        "cutmix": 1.0,
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,
        "label_smoothing": 0.1,
    },
    "optim": {
        "opt": "adamw",
        "lr": 5.0e-4,
        "lr_base_batch": 512,        # lr, warmup_lr, min_lr per this many images; None: absolute
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "eps": 1.0e-8,
        "layer_decay": None,         # e.g. 0.9: lr * decay**depth through model.group_matcher
        "dcn_lr_mul": None,          # e.g. 0.1: lr multiplier for DCN offset parameters
        "clip_grad": 5.0,            # max gradient norm; None: off
    },
    "sched": {
        "name": "cosine",
        "epochs": 300,
        "warmup_epochs": 20,
        "warmup_lr": 5.0e-7,
        "min_lr": 5.0e-6,
    },
    "ema": {
        "enabled": True,
        "decay": 0.9999,
        "warmup": False,             # ModelEmaV3 decay warm-up (for short runs)
    },
    "train": {
        "amp": "none",               # none, bf16 or fp16
        "seed": 0,
        "deterministic": False,      # torch.use_deterministic_algorithms(True)
        "device": "auto",
        "threads": None,             # CPU threads per process; None: torch's default
        "parallel": "ddp",           # ddp (replicas) or fsdp (sharded: FSDP2 fully_shard)
        "fsdp_reshard_after_forward": True,  # fsdp: True ZeRO-3, False ZeRO-2 (keeps the
                                             # gathered blocks from forward to backward)
    },
}



class ConfigError(ValueError):
    """A bad recipe, key or value; ``key`` is the config key at fault (or None)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


_FREE_FORM = {("model", "kwargs")}
_CHOICES = {
    ("train", "amp"): ("none", "bf16", "fp16"),
    ("sched", "name"): ("cosine", "tanh", "poly"),
    ("train", "parallel"): ("ddp", "fsdp"),
}


def config_dir() -> Path:
    """The recipes shipped inside the package (``internimage/configs/``, package data, so
    installed wheels have them too)."""
    return Path(__file__).resolve().parent / "configs"


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe path from a name in :func:`config_dir` (with or without '.yaml') or a file
    path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    directory = config_dir()
    candidate = directory / (name_or_path if path.suffix in (".yaml", ".yml")
                             else f"{name_or_path}.yaml")
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in directory.glob("*.yaml")) if directory.is_dir() else []
    raise FileNotFoundError(
        f"no recipe {name_or_path!r} (not a file, not in {directory}); known recipes: "
        f"{', '.join(known) or 'none'}"
    )


_EXPONENT_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _numbers(value: Any) -> Any:
    """Floats written without a dot ('1e-3'), which YAML 1.1 (PyYAML) reads as strings."""
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def _known(section: str) -> str:
    return ", ".join(sorted(DEFAULTS[section]))


def _unknown_key(key: str, where: str | None) -> ConfigError:
    prefix = f"{where}: " if where else ""
    parts = key.split(".")
    section = parts[0]
    if section not in DEFAULTS:
        hint = difflib.get_close_matches(section, DEFAULTS, n=1)
        return ConfigError(
            f"{prefix}unknown config key {key!r}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + f"; sections are {', '.join(DEFAULTS)}", key
        )
    name = parts[1] if len(parts) > 1 else ""
    hint = [f"{section}.{h}" for h in difflib.get_close_matches(name, DEFAULTS[section], n=1)]
    if not hint:  # the key may live in another section ('train.epochs' is 'sched.epochs')
        hint = [f"{other}.{name}" for other in DEFAULTS if name in DEFAULTS[other]][:1]
    return ConfigError(
        f"{prefix}unknown config key {key!r}"
        + (f" (did you mean '{hint[0]}'?)" if hint else "")
        + f"; keys of '{section}' are {_known(section)}", key
    )


def _merge(cfg: dict[str, Any], update: Mapping[str, Any], where: str) -> None:
    if not isinstance(update, Mapping):
        raise ConfigError(f"{where}: a recipe must be a mapping of sections, got "
                          f"{type(update).__name__}")
    for section, values in update.items():
        if section not in DEFAULTS:
            raise _unknown_key(str(section), where)
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, got "
                              f"{type(values).__name__} {values!r}", str(section))
        for key, value in values.items():
            if key not in DEFAULTS[section]:
                raise _unknown_key(f"{section}.{key}", where)
            if (section, key) in _FREE_FORM:
                if value is not None and not isinstance(value, Mapping):
                    raise ConfigError(f"{where}: {section}.{key} must be a mapping, got "
                                      f"{value!r}", f"{section}.{key}")
                cfg[section][key] = dict(value or {})
            else:
                cfg[section][key] = _numbers(copy.deepcopy(value))


def load_recipe(path: str | Path, _depth: int = 0) -> dict[str, Any]:
    """The defaults overridden by the recipe at ``path`` (and its ``base:`` chain)."""
    path = Path(path)
    if _depth > 8:
        raise ConfigError(f"'base:' chain too deep at '{path}'")
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: '{path}'")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        message = " ".join(str(error).split())
        raise ConfigError(f"cannot read '{path}' as a YAML recipe: {message}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"'{path}' must hold a mapping, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is not None:
        base_path = path.parent / base
        cfg = load_recipe(base_path if base_path.is_file() else resolve_recipe(str(base)),
                          _depth + 1)
    else:
        cfg = copy.deepcopy(DEFAULTS)
    _merge(cfg, raw, f"'{path}'")
    return cfg


def get_key(cfg: Mapping[str, Any], key: str) -> Any:
    """``cfg['a']['b']`` for ``key='a.b'``."""
    section, _, name = key.partition(".")
    return cfg[section][name]


def set_key(cfg: dict[str, Any], key: str, value: Any, where: str | None = None) -> None:
    """Sets ``section.key`` (or ``model.kwargs.NAME``) after checking it exists."""
    parts = key.split(".")
    if len(parts) == 3 and tuple(parts[:2]) in _FREE_FORM:
        cfg[parts[0]][parts[1]][parts[2]] = value
        return
    if len(parts) != 2 or parts[0] not in DEFAULTS or parts[1] not in DEFAULTS[parts[0]]:
        raise _unknown_key(key, where)
    if tuple(parts) in _FREE_FORM and value is not None and not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}", key)
    cfg[parts[0]][parts[1]] = value


def apply_override(cfg: dict[str, Any], text: str) -> str:
    """Applies one ``key=value`` override (value parsed as YAML); returns the key."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"expected KEY=VALUE (e.g. optim.lr=1e-3), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        message = " ".join(str(error).split())
        raise ConfigError(f"{key}: cannot parse value {raw!r} as YAML ({message})",
                          key) from error
    set_key(cfg, key, _numbers(value))
    return key


def _type_error(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {expected}, got {value!r}", key)


def validate_config(cfg: dict[str, Any]) -> None:
    """Type and range checks; raises :class:`ConfigError` naming key, expectation, value."""
    for section, defaults in DEFAULTS.items():
        for key, default in defaults.items():
            value = cfg[section][key]
            full = f"{section}.{key}"
            if value is None or (section, key) in _FREE_FORM:
                continue
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise _type_error(full, "true or false", value)
            elif isinstance(default, int) and default is not None:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise _type_error(full, "an integer", value)
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise _type_error(full, "a number", value)
                cfg[section][key] = float(value)
            elif isinstance(default, str):
                if not isinstance(value, str):
                    raise _type_error(full, "a string", value)
            elif isinstance(default, list):
                if not isinstance(value, list) or len(value) != len(default):
                    raise _type_error(full, f"a list of {len(default)} numbers", value)
    for key, choices in _CHOICES.items():
        value = cfg[key[0]][key[1]]
        if value not in choices:
            raise _type_error(".".join(key), f"one of {', '.join(choices)}", value)
    positive_ints = ["data.batch_size", "sched.epochs"]
    for key in positive_ints:
        value = get_key(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _type_error(key, "an integer >= 1", value)
    for key in ("data.num_workers", "sched.warmup_epochs", "data.max_shift"):
        value = get_key(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _type_error(key, "an integer >= 0", value)
    for key in ("data.img_size", "data.train_limit", "data.val_limit", "model.num_classes",
                "train.threads"):
        value = get_key(cfg, key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise _type_error(key, "an integer >= 1 or null", value)
    if cfg["data"]["img_size"] is not None and cfg["data"]["img_size"] < 16:
        raise _type_error("data.img_size", "an integer >= 16 or null", cfg["data"]["img_size"])
    if not 0.0 < cfg["data"]["val_fraction"] < 1.0:
        raise _type_error("data.val_fraction", "a number between 0 and 1",
                          cfg["data"]["val_fraction"])
    if cfg["optim"]["lr"] is None or not math.isfinite(cfg["optim"]["lr"]) \
            or cfg["optim"]["lr"] <= 0:
        raise _type_error("optim.lr", "a finite number > 0", cfg["optim"]["lr"])
    for key in ("optim.layer_decay", "optim.dcn_lr_mul"):
        value = get_key(cfg, key)
        if value is not None and not (isinstance(value, int | float) and 0 < value <= 1):
            raise _type_error(key, "a number in (0, 1] or null", value)
    for key in ("ema.decay",):
        value = get_key(cfg, key)
        if not 0 < value < 1:
            raise _type_error(key, "a number between 0 and 1", value)
    for key in ("aug.mixup", "aug.cutmix", "aug.label_smoothing", "model.drop_path_rate",
                "data.re_prob", "data.hflip"):
        value = get_key(cfg, key)
        if value is None or value < 0:
            raise _type_error(key, "a number >= 0", value)
    if cfg["aug"]["label_smoothing"] >= 1:
        raise _type_error("aug.label_smoothing", "a number in [0, 1)",
                          cfg["aug"]["label_smoothing"])
    if cfg["train"]["parallel"] == "fsdp" and cfg["train"]["amp"] == "fp16":
        raise ConfigError("train.amp: fp16 (with its loss scaler) is not supported with "
                          "train.parallel=fsdp; use bf16", "train.amp")
    if not isinstance(cfg["model"]["name"], str) or not cfg["model"]["name"]:
        raise _type_error("model.name", "a model name", cfg["model"]["name"])


def dump_config(cfg: Mapping[str, Any]) -> str:
    """The config as YAML, sections in schema order."""
    ordered = {section: {key: cfg[section][key] for key in DEFAULTS[section]}
               for section in DEFAULTS}
    return yaml.safe_dump(ordered, sort_keys=False, default_flow_style=None)
