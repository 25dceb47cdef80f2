"""The small subcommands: ``models``, ``predict``, ``convert`` and ``export``.

Each ``run_*`` function takes the parsed arguments (an ``argparse.Namespace``), prints its
result to stdout and returns the exit status; bad input raises
:class:`~internimage.cli_common.CommandError`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from internimage.cli_common import (
    CommandError,
    atomic_path,
    atomic_write_text,
    build_model,
    check_model_name,
    checkpoint_num_classes,
    hub_reachable,
    load_state_dict_file,
    load_weights,
    one_line,
    read_safetensors_metadata,
    resolve_device,
    save_safetensors,
)

__all__ = ["run_models", "run_predict", "run_convert", "run_export", "format_table",
           "model_from_checkpoint"]


def format_table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """A Markdown table with padded columns; ``align`` is one 'l'/'r' per column."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    align = align or "l" * len(headers)

    def fmt(values: list[str]) -> str:
        out = []
        for value, width, side in zip(values, widths, align):
            out.append(value.rjust(width) if side == "r" else value.ljust(width))
        return "| " + " | ".join(out) + " |"

    rule = "|" + "|".join(
        ("-" * (w + 1) + ":") if side == "r" else ("-" * (w + 2)) for w, side in zip(widths, align)
    ) + "|"
    return "\n".join([fmt(headers), rule, *(fmt(r) for r in cells)])


# ---------------------------------------------------------------------------------------------
# models


def run_models(args: argparse.Namespace) -> int:
    """``internimage models``: variants, pretrained tags, params, FLOPs, input size, channels."""
    import timm

    from internimage.flops import model_complexity

    names = timm.list_models("internimage_*", pretrained=True, include_tags=True)
    untagged = [n for n in timm.list_models("internimage_*")
                if not any(t.split(".")[0] == n for t in names)]
    entries = sorted(names + untagged, key=_variant_order)
    if args.filter:
        entries = [e for e in entries if args.filter in e]
        if not entries:
            raise CommandError(f"--filter: no InternImage model or tag contains {args.filter!r}")
    rows, records = [], []
    for entry in entries:
        arch, _, tag = entry.partition(".")
        cfg = timm.models.get_pretrained_cfg(entry)
        record = model_complexity(entry, num_classes=cfg.num_classes)
        record.update(arch=arch, tag=tag or "-", hf_hub_id=cfg.hf_hub_id,
                      hf_hub_filename=cfg.hf_hub_filename)
        records.append(record)
        rows.append([
            arch, tag or "-", f"{record['params'] / 1e6:.2f}", f"{record['macs'] / 1e9:.2f}",
            f"{record['flops'] / 1e9:.2f}", "x".join(map(str, record["input_size"][1:])),
            "-".join(map(str, record["stage_channels"])), record["num_classes"],
            cfg.hf_hub_filename or "-",
        ])
    headers = ["model", "tag", "params (M)", "GMACs", "GFLOPs", "input", "stage channels",
               "classes", "original weights file"]
    print(format_table(headers, rows, align="llrrrllrl"))
    print("\nGFLOPs: torch.utils.flop_counter (1 multiply-add = 2 FLOPs) with the DCNv3 op "
          "counted as 5 MACs per sampling point and channel; the paper's 'FLOPs' are GMACs. "
          "Counted on the meta device at each tag's input size.")
    if args.json:
        atomic_write_text(args.json, json.dumps(records, indent=2) + "\n")
    return 0


def _variant_order(name: str) -> tuple[int, str]:
    order = ["t", "s", "b", "l", "xl", "h", "g"]
    arch = name.split(".")[0]
    size = arch.removeprefix("internimage_").removesuffix("_meta")  # h_meta sorts after h
    return (order.index(size) if size in order else len(order), name)


# ---------------------------------------------------------------------------------------------
# Model from a checkpoint or the hub (predict, export)


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
        model = _pretrained_model(model_name, model_args)
    else:
        raise CommandError(
            "no weights: pass --checkpoint FILE (an original .pth, a converted .safetensors "
            "or a model.safetensors from 'internimage train') or --pretrained"
        )
    return model.to(device).eval(), info


def _pretrained_model(name: str, model_args: dict[str, Any]) -> nn.Module:
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


# ---------------------------------------------------------------------------------------------
# predict


def run_predict(args: argparse.Namespace) -> int:
    """``internimage predict``: top-k classes for each image."""
    from PIL import Image, UnidentifiedImageError
    from timm.data import ImageNetInfo, create_transform, infer_imagenet_subset, resolve_data_config

    for path in args.images:
        if not Path(path).is_file():
            raise CommandError(f"IMAGE: file not found: '{path}'")
    if args.top_k < 1:
        raise CommandError(f"--top-k: expected an integer >= 1, got {args.top_k}")
    device = resolve_device(args.device)
    model, info = model_from_checkpoint(args.model, args.checkpoint, args.pretrained, device,
                                        parse_model_args(args.model_args))
    data_config = resolve_data_config(model=model)
    if args.img_size:
        data_config["input_size"] = (3, args.img_size, args.img_size)
    transform = create_transform(**data_config, is_training=False)
    class_names = info.get("class_names")
    describe = None
    if class_names is None:
        subset = infer_imagenet_subset(model)
        if subset is not None:
            describe = ImageNetInfo(subset)
    num_classes = getattr(model, "num_classes", 0)
    top_k = min(args.top_k, num_classes) if num_classes else args.top_k

    results = []
    for path in args.images:
        try:
            with Image.open(path) as image:
                tensor = transform(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise CommandError(f"IMAGE: cannot read '{path}' as an image ({one_line(error)})") \
                from error
        with torch.inference_mode():
            probs = model(tensor.unsqueeze(0).to(device)).float().softmax(-1)[0]
        values, indices = probs.topk(top_k)
        preds = []
        for p, i in zip(values.tolist(), indices.tolist()):
            if class_names is not None:
                label = class_names[i]
            elif describe is not None:
                label = describe.index_to_description(i)
            else:
                label = str(i)
            preds.append({"index": i, "label": label, "probability": p})
        results.append({"image": str(path), "top_k": preds})
        print(path)
        for rank, pred in enumerate(preds, 1):
            print(f"  {rank}. {pred['probability'] * 100:6.2f}%  {pred['index']:>5}  "
                  f"{pred['label']}")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------
# convert


def run_convert(args: argparse.Namespace) -> int:
    """``internimage convert``: original ``.pth`` -> safetensors in this package's layout."""
    from internimage.checkpoint import UnsafeCheckpointError, convert_checkpoint

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_file():
        raise CommandError(f"SRC: file not found: '{src}'")
    if dst.suffix != ".safetensors":
        raise CommandError(f"DST: expected a path ending in '.safetensors', got '{dst}'")
    check_model_name(args.model)
    if args.model == "internimage":
        raise CommandError("--model: convert needs a registered variant (e.g. internimage_t); "
                           "describe other architectures with --model-arg")
    model_args = parse_model_args(args.model_args)
    if dst.exists() and not args.force:
        raise CommandError(f"DST: '{dst}' exists; pass --force to overwrite it")
    try:
        with atomic_path(dst, suffix=".safetensors") as tmp:
            convert_checkpoint(src, tmp, args.model, use_ema=args.use_ema, **model_args)
            if model_args:  # record the architecture so predict/export can rebuild it
                from safetensors.torch import load_file

                meta = read_safetensors_metadata(tmp)
                tensors = load_file(str(tmp))
                save_safetensors(tmp, tensors, dict(meta, model_kwargs=model_args))
    except UnsafeCheckpointError as error:
        raise CommandError(f"SRC: {error}") from error
    except (ValueError, RuntimeError, OSError, EOFError, TypeError) as error:
        detail = one_line(error)
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        raise CommandError(f"SRC: cannot convert '{src}' for {args.model} (wrong --model or "
                           f"--model-arg?): {detail}") from error
    meta = read_safetensors_metadata(dst)
    from safetensors import safe_open

    with safe_open(str(dst), framework="pt") as handle:
        count = len(list(handle.keys()))
    print(f"wrote {dst} ({count} tensors, {args.model}, num_classes "
          f"{meta.get('num_classes', '?')}); load it with: internimage predict IMAGE "
          f"--model {args.model} --checkpoint {dst}")
    return 0


# ---------------------------------------------------------------------------------------------
# export


def run_export(args: argparse.Namespace) -> int:
    """``internimage export``: ONNX through :func:`internimage.export.export_onnx`."""
    try:
        from internimage.export import export_onnx
    except ModuleNotFoundError as error:
        if error.name not in ("internimage.export", "onnx", "onnxscript"):
            raise
        raise CommandError(
            f"export: ONNX export is unavailable ({one_line(error)}); install the extra: "
            "pip install 'internimage-timm[export]'"
        ) from error
    out = Path(args.onnx)
    if out.suffix != ".onnx":
        raise CommandError(f"--onnx: expected a path ending in '.onnx', got '{out}'")
    if args.img_size is not None and args.img_size < 32:
        raise CommandError(f"--img-size: expected an integer >= 32, got {args.img_size}")
    device = torch.device("cpu")
    if args.checkpoint is None and not args.pretrained:
        if args.model is None:
            raise CommandError("--model: required without --checkpoint")
        model = build_model(args.model, kwargs=parse_model_args(args.model_args)).eval()
        print(f"note: no --checkpoint or --pretrained: exporting {args.model} with random "
              "weights", file=sys.stderr)
    else:
        model, _ = model_from_checkpoint(args.model, args.checkpoint, args.pretrained, device,
                                         parse_model_args(args.model_args))
    img_size = args.img_size or int(model.pretrained_cfg["input_size"][-1])
    existed = out.exists()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = export_onnx(model, str(out), img_size=img_size,
                             dynamic_batch=not args.static_batch, custom_op=args.custom_op)
    except Exception as error:
        if not existed and out.exists():
            out.unlink()
        raise CommandError(f"export: ONNX export failed ({one_line(error)[:400]})") from error
    size = os.path.getsize(out) if out.exists() else 0
    print(f"wrote {out} ({size / 2**20:.1f} MiB, input 1x3x{img_size}x{img_size}, "
          f"{'static' if args.static_batch else 'dynamic'} batch, "
          f"{'custom DCNv3 op' if args.custom_op else 'standard ONNX ops'})"
          + (f" -> {result}" if isinstance(result, str | Path) and str(result) != str(out)
             else ""))
    return 0
