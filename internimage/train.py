"""``internimage train``: fine-tuning / training from a YAML recipe, single- or multi-process.

* Data: an ImageFolder tree (``data.dir`` with ``train/`` and ``val/``) with timm's transforms
  from the model's data config, or the embedded digits (see :mod:`internimage.data`).
* Optimisation (timm public APIs): ``create_optimizer_v2`` with a parameter-group function
  that applies weight decay rules, layer-wise LR decay through the model's ``group_matcher``
  (``param_groups_layer_decay``) and the original's reduced LR for the DCN offset parameters
  (``optim.dcn_lr_mul``); ``create_scheduler_v2`` stepped every iteration; ``Mixup`` /
  CutMix; label smoothing; ``ModelEmaV3``; gradient clipping; AMP (bf16 / fp16 with a
  ``GradScaler``); drop path and gradient checkpointing.
* Outputs (rank 0 only; every file written to a temporary name then ``os.replace``-d):
  ``config.yaml``, ``model.safetensors`` (+ ``model_ema.safetensors``), ``state.pt`` (resume
  state: model, optimizer, scheduler, EMA, scaler, epoch, per-rank RNG states, history),
  ``metrics.csv``, ``metrics.json`` and ``curves.png``.
* ``--resume DIR`` continues exactly: with ``train.deterministic`` and ``data.num_workers: 0``
  on the CPU, an interrupted and resumed run ends with bit-identical weights and metrics.
* Multi-process: ``torchrun --nproc_per_node N -m internimage train ...`` (gloo on the CPU,
  nccl on GPUs); ``DistributedSampler`` shards the training set (``set_epoch`` every epoch),
  validation is sharded without padding and reduced exactly. ``train.parallel`` is ``ddp``
  or ``fsdp`` (sharded model, optimizer and EMA; :mod:`internimage.distributed`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from internimage.checkpoint import load_weights, save_safetensors
from internimage.data import ImageDecodeError
from internimage.distributed import DistContext as _Dist
from internimage.distributed import load_training_state, model_ema, shard_model, training_state
from internimage.factory import (
    CUSTOM_MODELS,
    available_cores,
    build_model,
    load_state_dict_file,
    resolve_device,
)
from internimage.files import atomic_path, atomic_write_text
from internimage.train_config import dump_config

__all__ = ["Trainer", "train_one_epoch", "validate", "batches", "build_param_groups",
           "STATE_FORMAT", "RESUMABLE_KEYS", "SETUP_ERRORS"]

STATE_FORMAT = "internimage-train-state/1"
#: A peak LR below this barely moves the weights in a run of a few epochs: a warning says so.
LR_FLOOR = 1e-6
#: Keys that may change when resuming: they do not change the computation (data.batch_size
#: does not when the total batch stays: resuming on another number of processes).
RESUMABLE_KEYS = {"data.dir", "data.num_workers", "data.check_images", "train.device",
                  "train.threads", "data.batch_size"}
#: What a setup step raises for bad input (a config value, the data, a checkpoint); the command
#: line prints these on one line.
SETUP_ERRORS = (ValueError, FileNotFoundError, TypeError, ImportError, FloatingPointError)
_METRIC_FIELDS = ["epoch", "lr", "train_loss", "train_acc1", "val_loss", "val_acc1", "val_acc5",
                  "ema_val_loss", "ema_val_acc1", "ema_val_acc5", "train_time_s", "val_time_s",
                  "train_images_per_s"]


def build_param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None,
                       dcn_lr_mul: float | None) -> list[dict[str, Any]]:
    """Parameter groups: no weight decay for 1-D parameters, biases and the model's
    ``no_weight_decay()`` patterns; ``lr_scale`` = ``layer_decay ** depth`` from the model's
    ``group_matcher`` (timm ``param_groups_layer_decay``) when ``layer_decay`` is set; and
    ``lr_scale *= dcn_lr_mul`` for the DCN offset / centre-feature-scale parameters (the
    original's ``DCN_LR_MUL``) when set. timm's schedulers multiply each group's LR by its
    ``lr_scale``."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    no_wd = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay=weight_decay,
                                          no_weight_decay_list=no_wd, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay,
                                           no_weight_decay_list=no_wd)
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    if dcn_lr_mul is None or dcn_lr_mul == 1.0:
        return groups
    dcn_names = set(model.dcn_offset_param_names()) if hasattr(model, "dcn_offset_param_names") \
        else {n for n, _ in model.named_parameters()
              if "offset" in n or "center_feature_scale_proj" in n}
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in groups:
        dcn = [p for p in group["params"] if names.get(id(p)) in dcn_names]
        rest = [p for p in group["params"] if names.get(id(p)) not in dcn_names]
        if rest:
            out.append(dict(group, params=rest))
        if dcn:
            out.append(dict(group, params=dcn, lr_scale=group["lr_scale"] * dcn_lr_mul))
    return out


# ---------------------------------------------------------------------------------------------
# Distributed helpers


def _setup_phase(ctx: _Dist, fn: Any) -> Any:
    """Runs ``fn`` on every rank; if any rank fails, every rank stops (the failing one with
    its own message)."""
    error: Exception | None = None
    result = None
    try:
        result = fn()
    except SETUP_ERRORS as exc:
        error = exc
    if not ctx.all_ok(error is None):
        raise error or ValueError("setup failed on another process (see its message)")
    return result


# ---------------------------------------------------------------------------------------------
# RNG state


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class _ValShard(torch.utils.data.Sampler):
    """Indices ``rank, rank + world, ...``: every validation image exactly once overall."""

    def __init__(self, length: int, rank: int, world: int) -> None:
        self.indices = list(range(rank, length, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ---------------------------------------------------------------------------------------------
# One epoch of training, one pass of validation


def batches(loader: DataLoader) -> Iterator[Any]:
    """Iterates ``loader``; an image that cannot be decoded (also in a worker process) is one
    :class:`~internimage.data.ImageDecodeError` whose message starts with ``data.dir``."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except ImageDecodeError as error:
            text = str(error)
            if "Original Traceback" in text:  # re-raised from a DataLoader worker
                text = text.strip().splitlines()[-1].split(": ", 1)[-1]
            raise ImageDecodeError(f"data.dir: {text}") from error
        yield batch


def train_one_epoch(
    model: nn.Module, loader: DataLoader, optimizer: Any, loss_fn: nn.Module, *,
    device: torch.device, scheduler: Any, scaler: Any, global_step: int,
    autocast: Any = nullcontext, ema: Any = None, mixup: Any = None,
    clip_grad: float | None = None, world: int = 1, epoch: int | None = None,
    desc: str | None = None,
) -> tuple[list[float], int]:
    """One epoch: forward (under ``autocast``), loss, backward through ``scaler``, optional
    gradient clipping, optimizer step, per-step ``scheduler.step_update`` and EMA update.

    ``model`` may be wrapped in ``DistributedDataParallel`` (clipping and the EMA use the
    module inside) or sharded with FSDP (clipping takes the norm of the sharded gradients).
    A non-finite loss raises ``FloatingPointError`` (naming ``epoch``, 0-based, if given).
    ``desc`` shows a progress bar. Returns ``([loss * n, correct top-1 (without
    mixup), n] summed over this process's batches, global_step after the epoch)``.
    The progress display is :func:`internimage.progress.progress` (a bar on a terminal, a line
    every few seconds in a log).
    """
    from internimage.progress import progress

    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    model.train()
    started = time.perf_counter()
    sums = torch.zeros(3, dtype=torch.float64)  # loss * n, correct, n
    seen = 0
    with progress(len(loader), desc, unit="batch", enabled=desc is not None) as bar:
        for step, (images, targets) in enumerate(batches(loader)):
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            hard_targets = targets
            if mixup is not None:
                images, targets = mixup(images, targets)
            with autocast():
                logits = model(images)
                loss = loss_fn(logits.float(), targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training diverged: the loss is {loss.item()} at "
                    + (f"epoch {epoch + 1}, " if epoch is not None else "")
                    + f"step {step + 1} (lr {optimizer.param_groups[0]['lr']:.3g}); lower "
                    "optim.lr or set optim.clip_grad"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(module.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
            global_step += 1
            scheduler.step_update(num_updates=global_step)
            if ema is not None:
                ema.update(module, step=global_step)
            n = images.shape[0]
            seen += n
            sums[0] += loss.detach().double().item() * n
            if mixup is None:
                sums[1] += (logits.argmax(-1) == hard_targets).sum().item()
            sums[2] += n
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{sums[0].item() / sums[2].item():.4f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{seen * world / max(elapsed, 1e-9):.1f}", refresh=False)
            bar.update(1)
    return sums.tolist(), global_step


@torch.no_grad()
def validate(
    model: nn.Module, loader: DataLoader, device: torch.device, autocast: Any = nullcontext,
    reduce: Any = None, desc: str | None = None, steps: int | None = None,
) -> dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) of ``model`` in eval mode over ``loader``.

    ``reduce`` sums the per-process ``[loss * n, top-1, top-5, n]`` across processes (exact
    for sharded validation); ``desc`` shows a progress bar; ``steps`` (FSDP, where every rank
    runs as many forwards as the others) adds forwards of the first image, counted nowhere,
    up to that many. The model's train/eval mode is restored. Returns ``{'loss', 'acc1',
    'acc5', 'count'}``.
    """
    from internimage.progress import progress

    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss * n, top-1, top-5, n
    with progress(len(loader), desc, unit="batch", enabled=desc is not None) as bar:
        for images, targets in batches(loader):
            images, targets = images.to(device), targets.to(device)
            with autocast():
                logits = model(images).float()
            sums[0] += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            sums[1] += (top[:, 0] == targets).sum().item()
            sums[2] += (top == targets[:, None]).any(-1).sum().item()
            sums[3] += images.shape[0]
            bar.update(1)
    for _ in range(len(loader), steps or 0):
        with autocast():
            model(loader.dataset[0][0][None].to(device))
    model.train(was_training)
    loss, top1, top5, count = reduce(sums) if reduce is not None else sums
    total = max(count, 1)
    return {"loss": loss / total, "acc1": top1 / total * 100, "acc5": top5 / total * 100,
            "count": int(count)}


# ---------------------------------------------------------------------------------------------
# The run


class Trainer:
    """One training run (see the module docstring) from a validated config.

    ``recipe`` names the run (default output ``runs/<recipe>-<time>``); ``resume`` is the
    folder of an interrupted run to continue; ``output`` the folder to write (must not exist
    or be empty); ``stop_after`` ends this invocation after that many epochs. Bad input
    raises ``ValueError`` / ``FileNotFoundError`` / ``ImportError`` whose message starts with
    the config key (or ``output``, ``resume``, ``stop_after``) at fault.
    """

    def __init__(self, cfg: dict[str, Any], recipe: str, resume: Path | None = None, *,
                 output: str | os.PathLike | None = None, stop_after: int | None = None,
                 quiet: bool = False) -> None:
        self.cfg = cfg
        self.recipe = recipe
        self.resume = resume
        self.output = output
        self.quiet = quiet
        self.stop_after = stop_after
        if stop_after is not None and (isinstance(stop_after, bool)
                                       or not isinstance(stop_after, int) or stop_after < 1):
            raise ValueError(f"stop_after: expected an integer >= 1, got {stop_after!r}")

    # -- logging ---------------------------------------------------------------------------

    def log(self, text: str) -> None:
        if self.ctx.main:
            print(text, flush=True)

    def note(self, text: str) -> None:
        if self.ctx.main:
            print(f"note: {text}", file=sys.stderr, flush=True)

    def warn(self, text: str) -> None:
        """A one-line warning on stderr: the run goes on, but its numbers would mislead."""
        if self.ctx.main:
            print(f"WARNING: {text}", file=sys.stderr, flush=True)

    # -- setup -----------------------------------------------------------------------------

    def _device(self) -> torch.device:
        device = resolve_device(self.cfg["train"]["device"], "train.device")
        if device.type == "cuda" and device.index is None and int(os.environ.get(
                "WORLD_SIZE", "1")) > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return device

    def _data_source(self) -> dict[str, Any]:
        """Lists the data (validating it); no model needed yet."""
        from internimage.data import check_images, digits_split, scan_image_folder

        data = self.cfg["data"]
        if data["dir"] is None:
            try:
                tr_x, tr_y, va_x, va_y, classes = digits_split(data["val_fraction"], seed=0)
            except ImportError as error:
                raise ImportError(f"data.dir: no image folder is set and {error}") from error
            source = {"kind": "digits", "classes": classes, "train": (tr_x, tr_y),
                      "val": (va_x, va_y)}
            if data["train_limit"]:
                source["train"] = (tr_x[:data["train_limit"]], tr_y[:data["train_limit"]])
            if data["val_limit"]:
                source["val"] = (va_x[:data["val_limit"]], va_y[:data["val_limit"]])
            return source
        try:
            scanned = scan_image_folder(data["dir"])
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"data.dir: {error}") from error
        train = scanned["train"][:data["train_limit"]] if data["train_limit"] \
            else scanned["train"]
        val = scanned["val"][:data["val_limit"]] if data["val_limit"] else scanned["val"]
        if data["check_images"] and self.ctx.main:
            from tqdm import tqdm

            paths = [p for p, _ in train] + [p for p, _ in val]
            with tqdm(total=len(paths), desc="checking images", unit="img", file=sys.stderr,
                      disable=self.quiet or len(paths) < 2000, leave=False) as bar:
                try:
                    check_images(paths, progress=lambda i: bar.update(1))
                except ValueError as error:
                    raise ValueError(f"data.dir: {error}") from error
        return {"kind": "folder", "classes": scanned["classes"], "train": train, "val": val}

    def _model(self, num_classes: int) -> tuple[nn.Module, list[str]]:
        mcfg = self.cfg["model"]
        kwargs = dict(mcfg["kwargs"])
        if mcfg["drop_path_rate"] is not None:
            kwargs.setdefault("drop_path_rate", mcfg["drop_path_rate"])
        model = build_model(mcfg["name"], num_classes=num_classes, kwargs=kwargs)
        notes: list[str] = []
        if mcfg["checkpoint"] is not None:
            state_dict = load_state_dict_file(mcfg["checkpoint"], option="model.checkpoint")
            notes += load_weights(model, state_dict, f"model.checkpoint '{mcfg['checkpoint']}'",
                                  allow_head_reset=True)
        elif self.resume is None:
            notes.append(f"no model.checkpoint (--checkpoint): {mcfg['name']} starts from "
                         "random initialisation")
        if mcfg["grad_checkpointing"]:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(f"model.grad_checkpointing: {mcfg['name']} does not support "
                                 "gradient checkpointing")
            model.set_grad_checkpointing(True)
        return model, notes

    def _data_config(self, model: nn.Module, kind: str) -> dict[str, Any]:
        from timm.data import resolve_data_config

        from internimage.data import DIGITS_MEAN, DIGITS_STD

        data = self.cfg["data"]
        if kind == "digits":
            size = data["img_size"] or 32
            config = dict(input_size=(3, size, size), interpolation="bilinear", crop_pct=1.0,
                          crop_mode="center", mean=DIGITS_MEAN, std=DIGITS_STD)
        else:
            config = dict(resolve_data_config(model=model))
            if data["img_size"]:
                config["input_size"] = (3, data["img_size"], data["img_size"])
        for key in ("interpolation", "crop_pct", "mean", "std"):
            if data[key] is not None:
                config[key] = tuple(data[key]) if isinstance(data[key], list) else data[key]
        return config

    def _datasets(self, source: dict[str, Any], data_config: dict[str, Any]) -> tuple[Any, Any]:
        from internimage.data import DigitsDataset, ImageFolderData, eval_transform

        data = self.cfg["data"]
        size = data_config["input_size"][-1]
        if source["kind"] == "digits":
            return (DigitsDataset(*source["train"], size, train=True,
                                  max_shift=data["max_shift"]),
                    DigitsDataset(*source["val"], size, train=False))
        from timm.data import create_transform

        auto_augment = data["auto_augment"]
        if isinstance(auto_augment, str) and auto_augment.lower() in ("", "none", "off"):
            auto_augment = None
        try:
            train_tf = create_transform(
                data_config["input_size"], is_training=True, scale=tuple(data["scale"]),
                hflip=data["hflip"], color_jitter=data["color_jitter"],
                auto_augment=auto_augment, interpolation=data_config["interpolation"],
                mean=data_config["mean"], std=data_config["std"], re_prob=data["re_prob"],
                re_mode="pixel",
            )
        except (ValueError, AssertionError, KeyError) as error:
            raise ValueError(f"data.auto_augment: the augmentation settings are not valid "
                             f"({_one_line(error)})") from error
        if _cap_posterize(train_tf):
            self.note("data.auto_augment: this Pillow rejects posterize with 0 bits, which "
                      "timm's increasing-severity RandAugment ('inc1') asks for at magnitude 10; "
                      "the posterize op's magnitude is capped at 9.99 (1 bit kept)")
        return (ImageFolderData(source["train"], train_tf),
                ImageFolderData(source["val"], eval_transform(data_config)))

    def _output_dir(self) -> Path:
        if self.resume is not None:
            return self.resume
        if self.output is not None:
            out = Path(self.output)
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            out = Path("runs") / f"{self.recipe}-{stamp}"
        out = Path(self.ctx.broadcast(str(out)))
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"output: '{out}' already exists and is not empty; choose a new "
                             "folder, or resume the run in it")
        return out

    # -- main ------------------------------------------------------------------------------

    def run(self) -> int:
        saved_threads = torch.get_num_threads()
        saved_deterministic = torch.are_deterministic_algorithms_enabled()
        device = self._device()
        self.ctx = _Dist(device, process_group=self.cfg["train"]["parallel"] == "fsdp")
        self.out: Path | None = None
        created_out = False
        try:
            tcfg = self.cfg["train"]
            if tcfg["threads"]:
                torch.set_num_threads(tcfg["threads"])
            if tcfg["deterministic"]:
                if device.type == "cuda":
                    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True)
            _seed_all(tcfg["seed"])

            source = _setup_phase(self.ctx, self._data_source)
            classes = source["classes"]
            num_classes = self.cfg["model"]["num_classes"] or len(classes)
            if num_classes < len(classes):
                raise ValueError(f"model.num_classes: the data has {len(classes)} classes, got "
                                 f"{num_classes}")
            model, notes = _setup_phase(self.ctx, lambda: self._model(num_classes))
            data_config = self._data_config(model, source["kind"])
            if self.cfg["model"]["name"] in CUSTOM_MODELS or source["kind"] == "digits":
                model.pretrained_cfg = dict(model.pretrained_cfg, **data_config,
                                            num_classes=num_classes)
            train_ds, val_ds = _setup_phase(self.ctx,
                                            lambda: self._datasets(source, data_config))
            self.out = _setup_phase(self.ctx, self._output_dir)
            sched = self.cfg["sched"]
            for text in notes:
                self.note(text)
            if sched["warmup_epochs"] >= sched["epochs"]:
                self.warn(f"sched.warmup_epochs ({sched['warmup_epochs']}) >= sched.epochs "
                          f"({sched['epochs']}): the whole run is LR warm-up and never trains "
                          f"at optim.lr; train more than {sched['warmup_epochs']} epochs "
                          "(--epochs) or lower sched.warmup_epochs")

            error: ValueError | None = None
            if self.ctx.main and self.resume is None:
                try:
                    created_out = not self.out.exists()
                    self.out.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(self.out / "config.yaml", dump_config(self.cfg))
                except OSError as exc:
                    error = ValueError(f"output: cannot write to '{self.out}' ({exc})")
            # barrier: the folder exists before anyone goes on
            if not self.ctx.all_ok(error is None):
                raise error or ValueError("output: rank 0 could not create the output folder")
            return self._train(model, train_ds, val_ds, classes, num_classes, data_config,
                               device)
        except BaseException:
            if self.out is not None and self.ctx.main and self.resume is None \
                    and not (self.out / "state.pt").exists():
                # no epoch finished: nothing useful was written
                if created_out:
                    shutil.rmtree(self.out, ignore_errors=True)
                elif self.out.is_dir():  # the user's (empty) folder: only remove our config
                    (self.out / "config.yaml").unlink(missing_ok=True)
            raise
        finally:
            torch.set_num_threads(saved_threads)
            torch.use_deterministic_algorithms(saved_deterministic)
            self.ctx.close()

    def _setup_training(self, model: nn.Module, train_ds: Any, val_ds: Any, num_classes: int,
                        device: torch.device) -> SimpleNamespace:
        """Loaders, optimizer, scheduler, EMA, grad scaler, mixup, loss and the DDP wrapper."""
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        cfg, ctx = self.cfg, self.ctx
        dcfg, ocfg, scfg, acfg, tcfg = (cfg["data"], cfg["optim"], cfg["sched"], cfg["aug"],
                                        cfg["train"])
        # Channels-last conv weights, like the activations: the gradients of 1x1 and depthwise
        # kernels come out channels-last, and DDP's buckets follow the parameters' strides
        # (else every rank warns "Grad strides do not match bucket view strides"). FSDP shards
        # contiguous parameters only.
        fsdp = tcfg["parallel"] == "fsdp"
        model.to(device, memory_format=torch.contiguous_format if fsdp else torch.channels_last)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tcfg["amp"])
        ema = model_ema(model, cfg["ema"]["decay"], cfg["ema"]["warmup"], fsdp) \
            if cfg["ema"]["enabled"] else None
        for module in ([model] + ([ema.module] if ema is not None else [])) if fsdp else []:
            shard_model(module, device, param_dtype=amp_dtype,
                        reshard_after_forward=tcfg["fsdp_reshard_after_forward"])
        mixup_active = acfg["mixup"] > 0 or acfg["cutmix"] > 0
        train_sampler = DistributedSampler(train_ds, num_replicas=ctx.world, rank=ctx.rank,
                                           shuffle=True, seed=tcfg["seed"], drop_last=False)
        workers, cores = dcfg["num_workers"], available_cores()
        if workers > cores:  # more would only compete for the cores (and torch warns per loader)
            self.note(f"data.num_workers {workers} is more than the {cores} CPU core(s) this "
                      f"process may use: using {cores}")
            workers = cores
        loader_kwargs = dict(num_workers=workers, pin_memory=device.type == "cuda",
                             worker_init_fn=_seed_worker)
        train_loader = DataLoader(train_ds, batch_size=dcfg["batch_size"], sampler=train_sampler,
                                  drop_last=mixup_active, **loader_kwargs)
        val_loader = DataLoader(val_ds, batch_size=dcfg["batch_size"],
                                sampler=_ValShard(len(val_ds), ctx.rank, ctx.world),
                                **loader_kwargs)
        if len(train_loader) == 0:
            raise ValueError(
                f"data.batch_size: {dcfg['batch_size']} is more than the "
                f"{len(train_sampler)} training images per process (mixup/cutmix drop "
                "incomplete batches); lower it"
            )

        total_batch = dcfg["batch_size"] * ctx.world
        scale = total_batch / ocfg["lr_base_batch"] if ocfg["lr_base_batch"] else 1.0
        lr, warmup_lr, min_lr = (ocfg["lr"] * scale, scfg["warmup_lr"] * scale,
                                 scfg["min_lr"] * scale)
        opt_kwargs: dict[str, Any] = {}
        if "adam" in ocfg["opt"].lower() or ocfg["opt"].lower() in ("lamb", "lambw", "adan"):
            opt_kwargs = dict(betas=tuple(ocfg["betas"]), eps=ocfg["eps"])
        try:
            optimizer = create_optimizer_v2(
                model, opt=ocfg["opt"], lr=lr, weight_decay=ocfg["weight_decay"],
                param_group_fn=lambda m: build_param_groups(
                    m, ocfg["weight_decay"], ocfg["layer_decay"], ocfg["dcn_lr_mul"]),
                **opt_kwargs,
            )
        except (ValueError, AssertionError, KeyError, TypeError) as error:
            raise ValueError(f"optim.opt: cannot create optimizer {ocfg['opt']!r} "
                             f"({_one_line(error)})") from error
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=scfg["name"], num_epochs=scfg["epochs"],
            warmup_epochs=scfg["warmup_epochs"], warmup_lr=warmup_lr, min_lr=min_lr,
            step_on_epochs=False, updates_per_epoch=len(train_loader),
        )
        ddp_model: nn.Module = model
        if ctx.world > 1 and not fsdp:
            ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        return SimpleNamespace(
            train_loader=train_loader, train_sampler=train_sampler, val_loader=val_loader,
            lr=lr, lr_scale=scale, optimizer=optimizer, scheduler=scheduler,
            ema=ema, fsdp=fsdp,
            scaler=torch.amp.GradScaler(device.type, enabled=tcfg["amp"] == "fp16"),
            mixup=Mixup(mixup_alpha=acfg["mixup"], cutmix_alpha=acfg["cutmix"],
                        prob=acfg["mixup_prob"], switch_prob=acfg["mixup_switch_prob"],
                        label_smoothing=acfg["label_smoothing"], num_classes=num_classes)
            if mixup_active else None,
            loss_fn=SoftTargetCrossEntropy() if mixup_active else
            nn.CrossEntropyLoss(label_smoothing=acfg["label_smoothing"]),
            ddp_model=ddp_model,
            autocast=(lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype
            else nullcontext,
        )

    def _train(self, model: nn.Module, train_ds: Any, val_ds: Any, classes: list[str],
               num_classes: int, data_config: dict[str, Any], device: torch.device) -> int:
        """The epoch loop: :func:`train_one_epoch`, :func:`validate` (model and EMA), save."""
        cfg, ctx = self.cfg, self.ctx
        dcfg, tcfg = cfg["data"], cfg["train"]
        run = self._setup_training(model, train_ds, val_ds, num_classes, device)
        start_epoch, global_step, history = 0, 0, []
        if self.resume is not None:
            state = self._load_state(model, run, device)
            start_epoch, global_step, history = (state["epoch"], state["global_step"],
                                                 state["history"])
        else:
            _seed_all(tcfg["seed"] + ctx.rank)  # per-rank augmentation / drop-path streams

        epochs = cfg["sched"]["epochs"]
        from internimage.flops import count_params

        if cfg["optim"]["lr_base_batch"]:
            base = cfg["optim"]["lr_base_batch"]
            scaling = (f"optim.lr {cfg['optim']['lr']:.3g} is per {base} images "
                       f"(optim.lr_base_batch): the total batch of "
                       f"{dcfg['batch_size'] * ctx.world} ({dcfg['batch_size']} x {ctx.world} "
                       f"process(es)) scales it by {run.lr_scale:.3g} to {run.lr:.3g}")
            if run.lr < LR_FLOOR:
                self.warn(f"{scaling}, below {LR_FLOOR:g}: the weights will barely move; raise "
                          "--batch-size or --lr, or set optim.lr_base_batch=null to use "
                          "optim.lr as it is")
            else:
                self.note(f"{scaling} (warmup_lr and min_lr too); set optim.lr_base_batch=null "
                          "to use optim.lr as it is")
        self.log(
            f"internimage train: {cfg['model']['name']} ({count_params(model) / 1e6:.2f}M "
            f"params, {num_classes} classes) on "
            f"{'digits (embedded)' if dcfg['dir'] is None else dcfg['dir']}: "
            f"{len(train_ds)} train / {len(val_ds)} val images at "
            f"{data_config['input_size'][-1]}px; {ctx.world} process(es) on {device}"
            + (f" ({torch.get_num_threads()} threads each)" if device.type == "cpu" else "")
            + f"; batch {dcfg['batch_size']}x{ctx.world}, lr {run.lr:.3g}, {epochs} epochs; "
            f"output {self.out}"
        )
        if start_epoch >= epochs:
            self.log(f"'{self.out}' already finished its {epochs} epochs; nothing to do")
            return 0
        if start_epoch:
            self.log(f"resuming after epoch {start_epoch} (step {global_step})")

        progress = not self.quiet and ctx.main  # a bar on a terminal, else periodic lines
        # FSDP: every rank runs as many validation forwards as rank 0, which has the most images
        val_steps = -(-len(run.val_loader.sampler) // dcfg["batch_size"]) if ctx.main else 0
        val_steps = ctx.broadcast(val_steps) if run.fsdp else None
        run_started = time.perf_counter()
        epochs_this_run = 0
        for epoch in range(start_epoch, epochs):
            run.train_sampler.set_epoch(epoch)
            started = time.perf_counter()
            sums, global_step = train_one_epoch(
                run.ddp_model, run.train_loader, run.optimizer, run.loss_fn, device=device,
                scheduler=run.scheduler, scaler=run.scaler, global_step=global_step,
                autocast=run.autocast, ema=run.ema, mixup=run.mixup,
                clip_grad=cfg["optim"]["clip_grad"], world=ctx.world, epoch=epoch,
                desc=f"epoch {epoch + 1}/{epochs} train" if progress else None,
            )
            train_time = time.perf_counter() - started
            loss_sum, correct, count = ctx.sum(sums)

            val_started = time.perf_counter()
            val = validate(model, run.val_loader, device, run.autocast, reduce=ctx.sum,
                           desc=f"epoch {epoch + 1} val" if progress else None, steps=val_steps)
            ema_val = validate(run.ema.module, run.val_loader, device, run.autocast,
                               reduce=ctx.sum, steps=val_steps,
                               desc=f"epoch {epoch + 1} val (EMA)" if progress else None) \
                if run.ema is not None else {}
            val_time = time.perf_counter() - val_started
            group = run.optimizer.param_groups[0]
            record = {
                "epoch": epoch + 1,
                "lr": group["lr"] / group.get("lr_scale", 1.0),
                "train_loss": loss_sum / count,
                "train_acc1": (correct / count * 100) if run.mixup is None else None,
                "val_loss": val["loss"], "val_acc1": val["acc1"], "val_acc5": val["acc5"],
                "ema_val_loss": ema_val.get("loss"), "ema_val_acc1": ema_val.get("acc1"),
                "ema_val_acc5": ema_val.get("acc5"),
                "train_time_s": round(train_time, 3), "val_time_s": round(val_time, 3),
                "train_images_per_s": round(count / train_time, 2),
            }
            history.append(record)
            rng = ctx.gather(_rng_state(device))
            self._save(model, run, epoch + 1, global_step, history, rng, classes, num_classes,
                       data_config)
            self.log(
                f"epoch {epoch + 1}/{epochs}: train loss {record['train_loss']:.4f}"
                + (f", train acc {record['train_acc1']:.2f}%" if run.mixup is None else "")
                + f", val loss {val['loss']:.4f}, val acc {val['acc1']:.2f}%"
                + (f" (EMA {ema_val['acc1']:.2f}%)" if run.ema is not None else "")
                + f", lr {record['lr']:.3g}, {train_time + val_time:.1f} s "
                f"({record['train_images_per_s']:.1f} img/s)"
            )
            epochs_this_run += 1
            if self.stop_after is not None and epochs_this_run >= self.stop_after \
                    and epoch + 1 < epochs:
                self.log(f"stopped after {epochs_this_run} epoch(s) as asked (--stop-after); "
                         f"continue with: internimage train --resume {self.out}")
                return 0

        wall = time.perf_counter() - run_started
        best = max(history, key=lambda r: r["val_acc1"])
        last = history[-1]
        self.log(
            f"done: {epochs_this_run} epoch(s) in {wall:.1f} s "
            f"({wall / max(epochs_this_run, 1):.1f} s/epoch); final val acc {last['val_acc1']:.2f}%"
            + (f" (EMA {last['ema_val_acc1']:.2f}%)" if last.get("ema_val_acc1") is not None
               else "")
            + f", best {best['val_acc1']:.2f}% at epoch {best['epoch']}; outputs in {self.out}"
        )
        return 0

    # -- persistence -----------------------------------------------------------------------

    def _metadata(self, classes: list[str], num_classes: int, data_config: dict[str, Any],
                  epoch: int) -> dict[str, Any]:
        import internimage

        return {
            "format": "pt",
            "model_name": self.cfg["model"]["name"],
            "model_kwargs": {k: v for k, v in self.cfg["model"]["kwargs"].items()
                             if k not in ("drop_path_rate", "with_cp")},
            "num_classes": str(num_classes),
            "class_names": list(classes) + [str(i) for i in range(len(classes), num_classes)],
            "data_config": {k: list(v) if isinstance(v, tuple) else v
                            for k, v in data_config.items()},
            "epoch": str(epoch),
            "producer": f"internimage {internimage.__version__} train",
        }

    def _save(self, model: nn.Module, run: SimpleNamespace, epoch: int, global_step: int,
              history: list[dict[str, Any]], rng: list[Any], classes: list[str],
              num_classes: int, data_config: dict[str, Any]) -> None:
        """Writes the outputs (rank 0); under FSDP every rank takes part (sharded state and
        the consolidated weights are collectives)."""
        out = self.out
        assert out is not None
        weights, ema_weights, resumable = training_state(out, epoch, model, run.optimizer,
                                                         run.ema, sharded=run.fsdp)
        if not self.ctx.main:
            return
        atomic_write_text(out / "metrics.json", json.dumps(history, indent=2) + "\n")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=_METRIC_FIELDS, lineterminator="\n")
        writer.writeheader()
        for record in history:
            writer.writerow({k: "" if record.get(k) is None else record[k]
                             for k in _METRIC_FIELDS})
        atomic_write_text(out / "metrics.csv", buffer.getvalue())
        _plot(history, out / "curves.png")
        meta = self._metadata(classes, num_classes, data_config, epoch)
        save_safetensors(out / "model.safetensors", weights, meta)
        if ema_weights is not None:
            save_safetensors(out / "model_ema.safetensors", ema_weights, dict(meta, weights="ema"))
        state = {
            "format": STATE_FORMAT,
            "epoch": epoch,
            "global_step": global_step,
            **resumable,
            "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(),
            "rng": rng,
            "world_size": self.ctx.world,
            "history": history,
            "config": dump_config(self.cfg),
        }
        with atomic_path(out / "state.pt") as tmp:
            torch.save(state, tmp)
        for old in out.glob("state-epoch*.dcp"):  # superseded sharded states
            if old.name != resumable.get("sharded"):
                shutil.rmtree(old, ignore_errors=True)

    def _load_state(self, model: nn.Module, run: SimpleNamespace,
                    device: torch.device) -> dict[str, Any]:
        assert self.resume is not None
        path = self.resume / "state.pt"
        if not path.is_file():
            raise FileNotFoundError(f"resume: '{self.resume}' has no state.pt (no epoch "
                                    "finished)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"resume: cannot read '{path}' ({_one_line(error)[:200]})") \
                from error
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"resume: '{path}' is not a {STATE_FORMAT} file")
        load_training_state(self.resume, state, model, run.optimizer, run.ema)
        run.scheduler.load_state_dict(state["scheduler"])
        run.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        if state["world_size"] == self.ctx.world and len(rng) == self.ctx.world:
            _set_rng_state(rng[self.ctx.rank], device)
        else:
            self.note(f"the run was saved with {state['world_size']} process(es), resuming with "
                      f"{self.ctx.world}: random streams are re-seeded (not bit-exact)")
            _seed_all(self.cfg["train"]["seed"] + 7919 * state["epoch"] + self.ctx.rank)
        saved = state["world_size"] * int(yaml.safe_load(state["config"])["data"]["batch_size"])
        if saved != self.ctx.world * self.cfg["data"]["batch_size"]:
            self.note(f"data.batch_size: the total batch changes from {saved} to "
                      f"{self.ctx.world * self.cfg['data']['batch_size']} (the LR schedule goes "
                      f"on as saved); {saved} / processes per process keeps the run's total")
        return state


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _cap_posterize(transform: Any) -> bool:
    """Caps the magnitude of timm's ``PosterizeIncreasing`` RandAugment op at 9.99 when
    Pillow refuses ``posterize(img, 0)`` (Pillow 13 raises; older versions returned a black
    image), so magnitude-noise draws of 10 keep 1 bit instead of crashing a worker.
    Returns whether anything was changed."""
    from PIL import Image, ImageOps

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        return False
    except ValueError:
        pass
    changed = False
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if getattr(op, "name", "") == "PosterizeIncreasing" and \
                    (op.magnitude_max is None or op.magnitude_max >= 10):
                op.magnitude_max = 9.99
                changed = True
    return changed


def _plot(history: list[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy curves (matplotlib's Agg canvas; no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    loss_ax, acc_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], marker="o", label="val")
    if history[0].get("ema_val_loss") is not None:
        loss_ax.plot(epochs, [r["ema_val_loss"] for r in history], marker=".", label="val (EMA)")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    if history[0].get("train_acc1") is not None:
        acc_ax.plot(epochs, [r["train_acc1"] for r in history], marker="o", label="train")
    acc_ax.plot(epochs, [r["val_acc1"] for r in history], marker="o", label="val")
    if history[0].get("ema_val_acc1") is not None:
        acc_ax.plot(epochs, [r["ema_val_acc1"] for r in history], marker=".", label="val (EMA)")
    acc_ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
        if len(epochs) > 1:
            ax.set_xlim(min(epochs), max(epochs))
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png")
