"""What the subcommands share: the ``--model`` / ``--model-arg`` / ``--checkpoint`` /
``--pretrained`` options, and the library's devices, models and weights files
(:mod:`internimage.factory`, :mod:`internimage.checkpoint`) with errors that name the option
(:class:`CommandError`).

Only argparse is imported here at start-up: ``internimage --help`` builds every subcommand's
parser, so torch, timm and the models are imported inside the functions that use them.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import TYPE_CHECKING, Any

from internimage.cli.errors import CommandError, one_line

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

__all__ = ["add_model_arg", "add_weights_args", "parse_model_args", "model_from_checkpoint",
           "resolve_device", "check_model_name", "build_model", "read_safetensors_metadata",
           "load_state_dict_file", "load_weights", "hub_reachable"]


def resolve_device(name: str | None) -> torch.device:
    """:func:`internimage.factory.resolve_device` for ``--device``."""
    from internimage.factory import resolve_device as resolve

    try:
        return resolve(name, "--device")
    except ValueError as error:
        raise CommandError(one_line(error)) from error


def check_model_name(name: str, option: str = "--model") -> str:
    """:func:`internimage.factory.check_model_name` for ``option``."""
    from internimage.factory import check_model_name as check

    try:
        return check(name, option)
    except ValueError as error:
        raise CommandError(one_line(error)) from error


def build_model(name: str, num_classes: int | None = None,
                kwargs: dict[str, Any] | None = None, option: str = "--model") -> nn.Module:
    """:func:`internimage.factory.build_model`; bad names or arguments are a
    :class:`CommandError`."""
    from internimage.factory import build_model as build

    try:
        return build(name, num_classes=num_classes, kwargs=kwargs, option=option)
    except ValueError as error:
        raise CommandError(one_line(error)) from error


def read_safetensors_metadata(path: str | os.PathLike,
                              option: str = "--checkpoint") -> dict[str, str]:
    """:func:`internimage.checkpoint.read_safetensors_metadata`; a damaged file is a
    :class:`CommandError` naming ``option``."""
    from internimage import checkpoint

    try:
        return checkpoint.read_safetensors_metadata(path)
    except ValueError as error:
        raise CommandError(f"{option}: {one_line(error)}") from error


def load_state_dict_file(path: str | os.PathLike,
                         option: str = "--checkpoint") -> dict[str, Tensor]:
    """:func:`internimage.factory.load_state_dict_file`: whatever is wrong with the file is
    one :class:`CommandError` naming ``option``."""
    from internimage.factory import load_state_dict_file as load

    try:
        return load(path, option)
    except (ValueError, FileNotFoundError) as error:
        raise CommandError(one_line(error)) from error


def load_weights(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> list[str]:
    """:func:`internimage.checkpoint.load_weights`; a mismatch is a :class:`CommandError`."""
    from internimage import checkpoint

    try:
        return checkpoint.load_weights(model, state_dict, source)
    except checkpoint.CheckpointMismatchError as error:
        raise CommandError(f"{one_line(error)} (wrong --model?)") from error


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the Hugging Face hub answers a TCP connection (a quick probe, so commands fail
    in seconds instead of retrying for half a minute when there is no network)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False, "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as error:
        return False, f"{host}:{port} unreachable: {error}"


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   dest="model_args",
                   help="extra model constructor argument (value parsed as YAML, repeatable), "
                        "e.g. --model-arg depths=[1,1,2,1] for a non-standard architecture")


def add_weights_args(p: argparse.ArgumentParser, required_model: bool = False,
                     random_weights: bool = False) -> None:
    """``--model``, ``--model-arg``, and ``--checkpoint`` or ``--pretrained`` (or, with
    ``random_weights``, ``--random-weights``: a smoke test of the command's pipeline)."""
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
    if random_weights:
        group.add_argument("--random-weights", action="store_true",
                           help="randomly initialised --model: a smoke test of the command "
                                "(its numbers are meaningless)")


def check_images(paths: list[str], option: str = "IMAGE", quiet: bool = False) -> None:
    """Opens every image (:func:`internimage.data.check_images`) before a model is built,
    with a progress display; unreadable files are one :class:`CommandError` naming
    ``option``."""
    from internimage.data import check_images as check
    from internimage.progress import progress

    with progress(len(paths), "checking images", unit="img",
                  enabled=not quiet and len(paths) > 1) as bar:
        try:
            check(paths, progress=lambda _: bar.update(1))
        except ValueError as error:
            raise CommandError(f"{option}: {one_line(error)}") from error


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
    random_weights: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Builds the model for ``predict`` / ``validate`` / ``export``, with a progress display.

    ``checkpoint``: an original ``.pth``, a converted ``.safetensors`` or the
    ``model.safetensors`` written by ``internimage train`` (whose metadata names the
    architecture, the class names and the data config, so ``model_name`` may be omitted).
    ``pretrained``: the registered tag's weights from the local Hugging Face cache or the hub.
    ``random_weights``: ``model_name`` randomly initialised (a note on stderr says so).
    ``model_args`` are extra constructor arguments (they win over recorded ones).
    Returns ``(model in eval mode, info)`` where info may hold ``class_names``.
    """
    from internimage.progress import progress

    what = model_name or (f"the model of '{checkpoint}'" if checkpoint else "the model")
    with progress(1, f"building {what}", unit="model") as bar:
        model, info = _build_with_weights(model_name, checkpoint, pretrained, model_args,
                                          random_weights)
        bar.update(1)
    return model.to(device).eval(), info


def _build_with_weights(model_name: str | None, checkpoint: str | None, pretrained: bool,
                        model_args: dict[str, Any] | None,
                        random_weights: bool) -> tuple[nn.Module, dict[str, Any]]:
    import sys

    from internimage.checkpoint import checkpoint_num_classes

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
    elif random_weights:
        if model_name is None:
            raise CommandError("--model: required without --checkpoint or --pretrained (e.g. "
                               "--model internimage_t)")
        model = build_model(model_name, kwargs=model_args)
        print(f"note: no --checkpoint or --pretrained: {model_name} has random weights (a "
              "smoke test; its outputs are meaningless)", file=sys.stderr)
    else:
        raise CommandError(
            "no weights: pass --checkpoint FILE (an original .pth, a converted .safetensors "
            "or a model.safetensors from 'internimage train'), --pretrained, or "
            "--random-weights for a smoke test"
        )
    return model, info


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
