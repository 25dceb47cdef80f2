"""Options and model loading shared by ``predict``, ``convert``, ``export`` (and later
``validate``): ``--model`` / ``--model-arg`` / ``--checkpoint`` / ``--pretrained``."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch import nn

from internimage.checkpoint import checkpoint_num_classes
from internimage.cli.errors import CommandError, one_line
from internimage.cli_common import (
    build_model,
    check_model_name,
    hub_reachable,
    load_state_dict_file,
    load_weights,
    read_safetensors_metadata,
)

__all__ = ["add_model_arg", "add_weights_args", "parse_model_args", "model_from_checkpoint"]


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   dest="model_args",
                   help="extra model constructor argument (value parsed as YAML, repeatable), "
                        "e.g. --model-arg depths=[1,1,2,1] for a non-standard architecture")


def add_weights_args(p: argparse.ArgumentParser, required_model: bool = False) -> None:
    p.add_argument("--model", default=None, required=required_model,
                   help="model name, e.g. internimage_t (optional when a checkpoint written "
                        "by 'internimage train' or 'convert' records it)")
    add_model_arg(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--checkpoint", default=None, metavar="FILE",
                       help="weights: original .pth, converted .safetensors or a "
                            "model.safetensors from 'internimage train'")
    group.add_argument("--pretrained", action="store_true",
                       help="the model tag's released weights (local Hugging Face cache or "
                            "the hub)")


def parse_model_args(items: list[str] | None) -> dict[str, Any]:
    """``['depths=[1,1,2,1]', 'channels=16']`` -> ``{'depths': [1, 1, 2, 1], 'channels': 16}``
    (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"--model-arg: expected KEY=VALUE (e.g. channels=16), got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise CommandError(f"--model-arg {key}: cannot parse {raw!r} as YAML") from error
    return out


def model_from_checkpoint(
    model_name: str | None,
    checkpoint: str | None,
    pretrained: bool,
    device: torch.device,
    model_args: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Builds the model for ``predict`` / ``export``.

    ``checkpoint``: an original ``.pth``, a converted ``.safetensors`` or the
    ``model.safetensors`` written by ``internimage train`` (whose metadata names the
    architecture, the class names and the data config, so ``model_name`` may be omitted).
    ``pretrained``: the registered tag's weights from the local Hugging Face cache or the hub.
    ``model_args`` are extra constructor arguments (they win over recorded ones).
    Returns ``(model in eval mode, info)`` where info may hold ``class_names``.
    """
    info: dict[str, Any] = {}
    model_args = dict(model_args or {})
    if checkpoint is not None:
        meta = read_safetensors_metadata(checkpoint)
        state_dict = load_state_dict_file(checkpoint)
        name = model_name or meta.get("model_name")
        if name is None:
            raise CommandError(
                f"--model: required, '{checkpoint}' does not record its model (pass e.g. "
                "--model internimage_t)"
            )
        check_model_name(name)
        kwargs = json.loads(meta["model_kwargs"]) if "model_kwargs" in meta and (
            model_name is None or model_name == meta.get("model_name")) else {}
        kwargs.update(model_args)
        num_classes = checkpoint_num_classes(state_dict)
        model = build_model(name, num_classes=num_classes, kwargs=kwargs)
        if "data_config" in meta:
            model.pretrained_cfg = dict(model.pretrained_cfg, **json.loads(meta["data_config"]))
        load_weights(model, state_dict, source=f"--checkpoint '{checkpoint}'")
        if "class_names" in meta:
            info["class_names"] = json.loads(meta["class_names"])
    elif pretrained:
        if model_name is None:
            raise CommandError("--model: required with --pretrained (e.g. --model internimage_t)")
        model = pretrained_model(model_name, model_args)
    else:
        raise CommandError(
            "no weights: pass --checkpoint FILE (an original .pth, a converted .safetensors "
            "or a model.safetensors from 'internimage train') or --pretrained"
        )
    return model.to(device).eval(), info


def pretrained_model(name: str, model_args: dict[str, Any]) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``, failing in seconds (one line) when the
    weights are neither cached nor reachable."""
    import timm

    check_model_name(name)
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as error:
        raise CommandError(f"--model: {one_line(error)}") from error
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise CommandError(f"--pretrained: {name!r} has no pretrained weights registered")
    where = f"{cfg.hf_hub_id}/{cfg.hf_hub_filename}" if cfg.hf_hub_id else cfg.url
    local_hint = (f"download {cfg.hf_hub_filename or 'the weights'} on a machine with network "
                  f"access and pass --checkpoint /path/to/{cfg.hf_hub_filename or 'weights.pth'}")
    cached = None
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(cfg.hf_hub_id, cfg.hf_hub_filename)
            cached = found if isinstance(found, str) else None
        except ImportError:
            cached = None
    if cached is None:
        ok, why = hub_reachable()
        if not ok:
            raise CommandError(
                f"--pretrained: the weights of {name} ({where}) are not in the local cache and "
                f"the hub cannot be reached ({why}); {local_hint}"
            )
    try:
        return timm.create_model(name, pretrained=True, **model_args)
    except Exception as error:  # download, unpickling or key errors from timm / the hub
        raise CommandError(
            f"--pretrained: loading {name} from {where} failed ({one_line(error)[:300]}); "
            f"{local_hint}"
        ) from error
