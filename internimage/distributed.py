"""Data parallelism for ``internimage train``: the process group, DDP or FSDP2 sharding, the
sharded resume state, the consolidated weights and the per-process memory plan.

* ``ddp``: every process holds the whole model, its gradients (plus DDP's gradient buckets),
  the optimizer state and the EMA; gradients are all-reduced (averaged).
* ``fsdp`` (ZeRO-3): :func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` to every
  block of every stage (``model.stages[i].blocks[j]``, both families) and then to the root
  (stem, downsamples, norms, head) on a 1-D device mesh over the world. Parameters, gradients,
  optimizer state and the EMA copy are sharded along dim 0 (each process holds about 1/world
  of them); a block's parameters are all-gathered for its forward and backward.
  ``reshard_after_forward=False`` keeps them gathered between forward and backward (ZeRO-2
  memory, less communication). Gradients are reduced with a sum followed by a division by the
  world size (``set_force_sum_reduction_for_comms``), never with a backend's ``AVG``, whose
  support differs between backends.
* Resume state under ``fsdp``: :func:`save_sharded_state` writes a
  ``torch.distributed.checkpoint`` folder (every process writes its own part);
  :func:`load_sharded_state` reads it back on any number of processes (DCP reshards).
* :func:`full_state_dict`: the whole model's state on rank 0 (on the CPU), for the
  consolidated ``model.safetensors``.
* :func:`memory_plan`: per-process bytes of parameters, gradients, optimizer state and EMA for a
  strategy and world size, counted from a model built on the meta device.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["PARALLEL_STRATEGIES", "DistContext", "sharded_units", "shard_model", "model_ema",
           "full_state_dict", "save_sharded_state", "load_sharded_state", "training_state",
           "load_training_state", "memory_plan", "memory_report",
           "format_memory_plan"]

PARALLEL_STRATEGIES = ("ddp", "fsdp")


class DistContext:
    """Rank / world size from torchrun's environment, and the few collectives the trainer
    needs (no-ops when single). ``process_group=True`` also creates a one-process group when
    the world is 1 (FSDP and torch.distributed.checkpoint need one)."""

    def __init__(self, device: torch.device, process_group: bool = False) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.created = False
        self.device = device
        if (self.world > 1 or process_group) and not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if self.world > 1:
                dist.init_process_group(backend=backend)
            else:
                dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0,
                                        world_size=1)
            self.created = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _tensor(self, values: list[float]) -> Tensor:
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        return torch.tensor(values, dtype=torch.float64, device=device)

    def all_ok(self, ok: bool) -> bool:
        if self.world == 1:
            return ok
        flag = self._tensor([1.0 if ok else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0.5)

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        tensor = self._tensor(values)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def close(self) -> None:
        if self.created and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# FSDP2


def sharded_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units before the root: every block of every stage
    (``model.stages[i].blocks``), for InternImage and FlashInternImage alike."""
    stages = getattr(model, "stages", None)
    if stages is None or not all(hasattr(stage, "blocks") for stage in stages):
        raise ValueError(f"train.parallel: fsdp shards the blocks of model.stages[*].blocks; "
                         f"{type(model).__name__} has no such layout")
    return [block for stage in stages for block in stage.blocks]


def shard_model(model: nn.Module, device: torch.device, *, param_dtype: torch.dtype | None,
                reshard_after_forward: bool) -> nn.Module:
    """Applies ``fully_shard`` to every block (:func:`sharded_units`), then to the root, on a
    1-D mesh over the world (the process group must exist). ``param_dtype`` (bf16 under
    ``train.amp: bf16``) is the parameters' dtype in compute (BatchNorm layers stay float32,
    in units of their own); gradients are reduced in float32. Returns ``model``, sharded in
    place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if param_dtype is not None:
        # BatchNorm (the T-XL head) keeps float32 parameters, like its float32 running
        # statistics, as under plain autocast: units of their own without the cast
        batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
        for module in [m for m in model.modules() if isinstance(m, batch_norms)]:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward,
                        mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32))
    for unit in sharded_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward)
    # the root's parameters are needed again right at the start of backward (the head)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # sum, then divide by the world size: no reliance on the backend's ReduceOp.AVG
            module.set_force_sum_reduction_for_comms(True)
    return model


def model_ema(model: nn.Module, decay: float, warmup: bool, sharded: bool) -> Any:
    """timm's ``ModelEmaV3`` of ``model`` (built before sharding; shard its ``module`` like the
    model's). With ``sharded``, the foreach update runs on the sharded parameters (DTensors)
    and the replicated buffers separately: one foreach call cannot mix the two."""
    from timm.utils import ModelEmaV3

    class ShardedModelEma(ModelEmaV3):
        def _foreach_lerp_(self, ema_values: list[Tensor], model_values: list[Tensor],
                           weight: float) -> None:
            from torch.distributed.tensor import DTensor

            for kind in (True, False):
                pairs = [(e, m) for e, m in zip(ema_values, model_values)
                         if isinstance(e, DTensor) is kind]
                if pairs:
                    super()._foreach_lerp_([e for e, _ in pairs], [m for _, m in pairs],
                                           weight)

    if sharded and not hasattr(ModelEmaV3, "_foreach_lerp_"):  # another timm: one at a time
        return ModelEmaV3(model, decay=decay, use_warmup=warmup, foreach=False)
    return (ShardedModelEma if sharded else ModelEmaV3)(model, decay=decay, use_warmup=warmup)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's state dict on rank 0, on the CPU (a collective: every rank calls it;
    the other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def _sharded_state(model: nn.Module, optimizer: Any, ema_module: nn.Module | None
                   ) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    state = {"model": get_model_state_dict(model),
             "optimizer": get_optimizer_state_dict(model, optimizer)}
    if ema_module is not None:
        state["ema"] = get_model_state_dict(ema_module)
    return state


def save_sharded_state(folder: Path, model: nn.Module, optimizer: Any,
                       ema_module: nn.Module | None) -> None:
    """Writes the model, optimizer and EMA state as a ``torch.distributed.checkpoint`` folder
    (a collective: every rank writes its own shards, rank 0 the metadata)."""
    import shutil

    import torch.distributed.checkpoint as dcp

    if dist.get_rank() == 0 and folder.exists():  # left by an interrupted save
        shutil.rmtree(folder)
    dist.barrier()
    dcp.save(_sharded_state(model, optimizer, ema_module), checkpoint_id=str(folder))


def load_sharded_state(folder: Path, model: nn.Module, optimizer: Any,
                       ema_module: nn.Module | None) -> None:
    """Loads what :func:`save_sharded_state` wrote, on any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if not (folder / ".metadata").is_file():
        raise FileNotFoundError(f"resume: the sharded state '{folder}' is missing or "
                                "incomplete (no .metadata)")
    state = _sharded_state(model, optimizer, ema_module)
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if ema_module is not None:
        set_model_state_dict(ema_module, state["ema"])


def training_state(folder: Path, epoch: int, model: nn.Module, optimizer: Any, ema: Any, *,
                   sharded: bool) -> tuple[dict[str, Tensor], dict[str, Tensor] | None,
                                           dict[str, Any]]:
    """``(weights, EMA weights or None, resume entries)`` of a run after ``epoch``.

    The resume entries are what ``state.pt`` holds of the model, the optimizer and ``ema``
    (timm's ``ModelEmaV3`` or None): their state dicts; with ``sharded`` (FSDP), None for each
    and ``sharded``: the name of the ``torch.distributed.checkpoint`` folder this writes to
    ``folder``. With ``sharded`` this is a collective, and only rank 0 gets the whole weights
    (the others get empty dicts)."""
    ema_module = ema.module if ema is not None else None
    if sharded:
        name = f"state-epoch{epoch:04d}.dcp"
        save_sharded_state(folder / name, model, optimizer, ema_module)
        return (full_state_dict(model),
                full_state_dict(ema_module) if ema_module is not None else None,
                {"model": None, "optimizer": None, "ema": None, "sharded": name})
    weights = model.state_dict()
    return (weights, ema_module.state_dict() if ema_module is not None else None,
            {"model": weights, "optimizer": optimizer.state_dict(),
             "ema": ema.state_dict() if ema is not None else None})


def load_training_state(folder: Path, state: dict[str, Any], model: nn.Module, optimizer: Any,
                        ema: Any) -> None:
    """Loads the resume entries of :func:`training_state` (``state``, read from ``folder``'s
    ``state.pt``) into the model, optimizer and EMA; a sharded state on any number of
    processes."""
    if state.get("sharded"):
        load_sharded_state(folder / state["sharded"], model, optimizer,
                           ema.module if ema is not None else None)
        return
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and state["ema"] is not None:
        ema.load_state_dict(state["ema"])


# ---------------------------------------------------------------------------------------------
# Memory plan


def _shard_numel(shape: torch.Size, world: int) -> int:
    """Elements one process holds of a parameter sharded on dim 0 (FSDP2 pads dim 0 to a
    multiple of the world size)."""
    if len(shape) == 0:
        return 1
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def memory_plan(model: nn.Module, optimizer: Any, *, strategy: str, world: int, ema: bool,
                param_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Per-process bytes of ``model`` (built on the meta device) trained by ``optimizer`` (a
    fresh optimizer over its parameters, stepped here once on meta tensors to create its
    state) under ``strategy`` ('ddp' or 'fsdp') with ``world`` processes. Keys: ``params``,
    ``grads`` (with DDP's gradient buckets, a second copy, under ddp), ``optimizer``, ``ema``,
    ``gathered`` (fsdp: the root's parameters and twice the largest block's, prefetching,
    all-gathered in the compute dtype; 0 under ddp) and ``total``. Activations are not counted."""
    if strategy not in PARALLEL_STRATEGIES:
        raise ValueError(f"train.parallel: expected one of {', '.join(PARALLEL_STRATEGIES)}, "
                         f"got {strategy!r}")
    params = [p for p in model.parameters()]
    if any(p.device.type != "meta" for p in params):
        raise ValueError("model: memory_plan expects a model built on the meta device")
    for p in params:
        if p.requires_grad:
            p.grad = torch.empty_like(p)
    optimizer.step()
    shard = world if strategy == "fsdp" else 1

    def held(shape: torch.Size) -> int:
        return _shard_numel(shape, shard)

    trainable = [p for p in params if p.requires_grad]
    plan = {
        "params": sum(held(p.shape) * p.element_size() for p in params),
        "grads": sum(held(p.shape) * p.element_size() for p in trainable)
        * (2 if strategy == "ddp" and world > 1 else 1),
        "optimizer": 0,
        "ema": 0,
        "gathered": 0,
    }
    for p in trainable:
        for value in optimizer.state.get(p, {}).values():
            if torch.is_tensor(value):
                numel = held(value.shape) if value.shape == p.shape else value.numel()
                plan["optimizer"] += numel * value.element_size()
    if ema:
        plan["ema"] = sum(held(p.shape) * p.element_size() for p in params) + sum(
            b.numel() * b.element_size() for b in model.buffers())
    if strategy == "fsdp":
        size = torch.tensor([], dtype=param_dtype).element_size() if param_dtype else None

        def gathered(tensors: list[Tensor]) -> int:
            return sum(p.numel() * (size or p.element_size()) for p in tensors)

        units = [list(unit.parameters()) for unit in sharded_units(model)]
        in_units = {id(p) for unit in units for p in unit}
        root = [p for p in params if id(p) not in in_units]
        # the root stays gathered from forward to backward; two blocks with prefetching
        plan["gathered"] = gathered(root) + 2 * max(gathered(unit) for unit in units)
    for p in params:
        p.grad = None
    plan["total"] = sum(plan.values())
    return plan


def format_memory_plan(plans: dict[str, dict[str, int]], world: int) -> str:
    """A table of :func:`memory_plan` results (one column per strategy), in GB (1e9 bytes)."""
    rows = [("parameters", "params"), ("gradients", "grads"), ("optimizer state", "optimizer"),
            ("EMA", "ema"), ("all-gathered (fsdp)", "gathered"), ("total", "total")]
    names = list(plans)
    header = f"{'per process, ' + str(world) + ' process(es)':<30}" + "".join(
        f"{name:>13}" for name in names)
    lines = [header]
    for label, key in rows:
        lines.append(f"{label:<30}" + "".join(f"{plans[n][key] / 1e9:>10.2f} GB"
                                               for n in names))
    return "\n".join(lines)


def memory_report(cfg: dict[str, Any], world: int) -> str:
    """:func:`memory_plan` of a training config for ``world`` processes, under both
    strategies (``train.parallel`` first), as text: the model built on the meta device (the
    class count from ``model.num_classes``, the digits' 10, or ``data.dir``'s class folders)
    with the config's optimizer and parameter groups."""
    from timm.optim import create_optimizer_v2

    from internimage.data import class_folder_names
    from internimage.factory import build_model
    from internimage.train import build_param_groups

    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world: expected an integer >= 1, got {world!r}")
    mcfg, ocfg, dcfg = cfg["model"], cfg["optim"], cfg["data"]
    num_classes = mcfg["num_classes"]
    if num_classes is None and dcfg["dir"] is None:
        num_classes = 10  # the embedded digits
    elif num_classes is None and (Path(dcfg["dir"]) / "train").is_dir():
        num_classes = len(class_folder_names(Path(dcfg["dir"]) / "train"))
    kwargs = dict(mcfg["kwargs"])
    if mcfg["drop_path_rate"] is not None:
        kwargs.setdefault("drop_path_rate", mcfg["drop_path_rate"])
    with torch.device("meta"):
        model = build_model(mcfg["name"], num_classes=num_classes, kwargs=kwargs)
    optimizer = create_optimizer_v2(
        model, opt=ocfg["opt"], lr=ocfg["lr"], weight_decay=ocfg["weight_decay"],
        param_group_fn=lambda m: build_param_groups(
            m, ocfg["weight_decay"], ocfg["layer_decay"], ocfg["dcn_lr_mul"]))
    tcfg = cfg["train"]
    plans = {name: memory_plan(model, optimizer, strategy=name, world=world,
                               ema=cfg["ema"]["enabled"],
                               param_dtype=torch.bfloat16 if tcfg["amp"] == "bf16" else None)
             for name in sorted(PARALLEL_STRATEGIES, key=lambda n: n != tcfg["parallel"])}
    params = sum(p.numel() for p in model.parameters())
    return (f"{mcfg['name']}: {params / 1e6:.1f}M parameters, {ocfg['opt']}, "
            f"{'EMA' if cfg['ema']['enabled'] else 'no EMA'}, amp {tcfg['amp']}; "
            f"train.parallel: {tcfg['parallel']}; activations not counted\n"
            + format_memory_plan(plans, world))
