"""``internimage train``: the options, the run's config (recipe, shorthands, ``--set``) and
one-line errors that name the option; the run is :class:`internimage.train.Trainer`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from internimage.cli.errors import CommandError, one_line

__all__ = ["add_parser", "run", "resolve_config"]

#: Shorthand options and the config keys they set (in the order they are applied).
SHORTHANDS = [
    ("--data", "data", "data.dir"), ("--checkpoint", "checkpoint", "model.checkpoint"),
    ("--num-classes", "num_classes", "model.num_classes"), ("--epochs", "epochs", "sched.epochs"),
    ("--batch-size", "batch_size", "data.batch_size"), ("--lr", "lr", "optim.lr"),
    ("--img-size", "img_size", "data.img_size"),
]
#: Trainer arguments that are not config keys, as named at the start of its messages.
_ARGUMENTS = {"output": "--output", "resume": "--resume", "stop_after": "--stop-after"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="fine-tune / train on an image folder or the embedded digits data",
        description="Trains or fine-tunes a model from a YAML recipe (internimage/configs/). "
                    "Without --data it trains a small InternImage on scikit-learn's bundled "
                    "digits. Runs under torchrun for multi-process (DDP) training.")
    p.add_argument("--config", default=None,
                   help="recipe name in internimage/configs/ or a YAML path (default: "
                        "digits_tiny without --data, else <model>_ft)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="ImageFolder root with train/ and val/ (data.dir)")
    p.add_argument("--model", default=None,
                   help="model name (model.name; also clears model.kwargs)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="initial weights: original .pth or .safetensors (model.checkpoint)")
    p.add_argument("--num-classes", type=int, default=None, help="model.num_classes")
    p.add_argument("--epochs", type=int, default=None, help="sched.epochs")
    p.add_argument("--batch-size", type=int, default=None, help="data.batch_size (per process)")
    p.add_argument("--lr", type=float, default=None, help="optim.lr")
    p.add_argument("--img-size", type=int, default=None, help="data.img_size")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="output folder (default: runs/<recipe>-<time>); must not exist")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR exactly where it stopped")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override any config key, e.g. --set optim.layer_decay=0.9 "
                        "(value parsed as YAML; repeatable)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N epochs of this invocation (resume later with --resume)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve the recipe and build the model on the meta device, print the "
                        "per-process bytes of parameters, gradients, optimizer state and EMA "
                        "under ddp and fsdp (train.parallel first), and exit")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="with --dry-run: the number of processes (default: $WORLD_SIZE or 1)")


def resolve_config(args: argparse.Namespace) -> tuple[dict[str, Any], str, Path | None]:
    """The run's config from the recipe, the shorthand options and ``--set`` overrides.

    Returns ``(config, recipe name, resume folder or None)``.
    """
    from internimage.cli.common import check_model_name
    from internimage.train import RESUMABLE_KEYS
    from internimage.train_config import (
        ConfigError,
        apply_override,
        load_recipe,
        resolve_recipe,
        set_key,
        validate_config,
    )

    given = [(option, key, getattr(args, dest)) for option, dest, key in SHORTHANDS
             if getattr(args, dest) is not None]
    if args.resume is not None:
        resume = Path(args.resume)
        for option, value in (("--output", args.output), ("--config", args.config)):
            if value is not None:
                raise CommandError(f"{option}: not allowed with --resume (the run continues in "
                                   f"'{resume}' with its own config.yaml)")
        if not (resume / "config.yaml").is_file():
            raise CommandError(f"--resume: '{resume}' is not a training output folder "
                               "(no config.yaml)")
        try:
            cfg = load_recipe(resume / "config.yaml")
        except (ConfigError, FileNotFoundError) as error:
            raise CommandError(f"--resume: {one_line(error)}") from error
        changed = [key for _, key, _ in given]
        if args.model is not None:
            changed.append("model.name")
        changed += [text.partition("=")[0].strip() for text in args.overrides]
        fixed = [key for key in changed if key not in RESUMABLE_KEYS]
        if fixed:
            raise CommandError(
                f"--resume: {', '.join(fixed)} cannot change when resuming (the run would no "
                f"longer be the one that was interrupted; only {', '.join(sorted(RESUMABLE_KEYS))}"
                f" can); start a new run with --checkpoint {resume / 'model.safetensors'} instead"
            )
        recipe = str(resume / "config.yaml")
    else:
        try:
            if args.config is not None:
                path = resolve_recipe(args.config)
            elif args.data is None:
                path = resolve_recipe("digits_tiny")
            else:
                try:
                    path = resolve_recipe(f"{args.model or 'internimage_t'}_ft")
                except FileNotFoundError:
                    path = resolve_recipe("finetune")
            cfg = load_recipe(path)
        except (ConfigError, FileNotFoundError) as error:
            raise CommandError(f"--config: {one_line(error)}") from error
        recipe = path.stem
        resume = None
    if args.model is not None:
        check_model_name(args.model)
        set_key(cfg, "model.name", args.model)
        set_key(cfg, "model.kwargs", {})
    for _, key, value in given:
        set_key(cfg, key, value)
    set_by: dict[str, str] = {key: option for option, key, _ in given}
    for text in args.overrides:
        try:
            key = apply_override(cfg, text)
        except ConfigError as error:
            raise CommandError(f"--set: {one_line(error)}") from error
        set_by[key] = f"--set {text}"
    try:
        validate_config(cfg)
    except ConfigError as error:
        raise CommandError(_with_option(one_line(error), set_by)) from error
    return cfg, recipe, resume


def _with_option(message: str, set_by: dict[str, str]) -> str:
    """Names the option that set KEY in a library message that starts with 'KEY: '."""
    key, sep, rest = message.partition(": ")
    if not sep:
        return message
    if key in _ARGUMENTS:
        return f"{_ARGUMENTS[key]}: {rest}"
    option = set_by.get(key)
    if option is None:  # from the recipe
        return message
    return f"{option}: {rest}" if option.startswith("--set ") else f"{option} ({key}): {rest}"


def _resume_hint(trainer: Any) -> None:
    """After Ctrl-C: where the run stands and how to continue it (rank 0 only)."""
    import sys

    import torch

    ctx, out = getattr(trainer, "ctx", None), getattr(trainer, "out", None)
    if ctx is None or not ctx.main or out is None:
        return
    state = Path(out) / "state.pt"
    if not state.is_file():
        print("note: interrupted before the first epoch finished (no epoch finished, nothing "
              "to resume)", file=sys.stderr)
        return
    try:
        epoch = torch.load(state, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    except Exception:  # interrupted while it was written: the previous one was replaced
        epoch = "the last"
    print(f"note: interrupted; '{out}' holds the run after epoch {epoch}; continue it with: "
          f"internimage train --resume {out}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Resolves the config, then trains (or prints the config with --print-config)."""
    from internimage.train import SETUP_ERRORS, Trainer
    from internimage.train_config import dump_config

    cfg, recipe, resume = resolve_config(args)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.dry_run:
        from internimage.distributed import memory_report

        world = args.world_size if args.world_size is not None else \
            int(os.environ.get("WORLD_SIZE", "1"))
        if world < 1:
            raise CommandError(f"--world-size: expected an integer >= 1, got {world}")
        try:
            print(memory_report(cfg, world))
        except (ValueError, TypeError, KeyError, AssertionError) as error:
            raise CommandError(f"--dry-run: {one_line(error)}") from error
        return 0
    if args.world_size is not None:
        raise CommandError("--world-size: only with --dry-run (torchrun sets the world size)")
    set_by = {key: option for option, dest, key in SHORTHANDS
              if getattr(args, dest) is not None}
    set_by.update({text.partition("=")[0].strip(): f"--set {text}" for text in args.overrides})
    trainer = None
    try:
        trainer = Trainer(cfg, recipe, resume, output=args.output, stop_after=args.stop_after,
                          quiet=args.quiet)
        return trainer.run()
    except KeyboardInterrupt:
        if trainer is not None:
            _resume_hint(trainer)
        raise
    except CommandError:
        raise
    except SETUP_ERRORS as error:
        raise CommandError(_with_option(one_line(error), set_by)) from error
