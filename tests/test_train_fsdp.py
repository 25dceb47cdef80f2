"""`internimage train` with `train.parallel: fsdp` on the CPU (gloo): the weights equal those of
a one-process run and of a DDP run, the sharded resume state loads on another number of
processes (2 -> 1 and 1 -> 2, the latter through the documented multi-node command), each
process holds about half of the state, `--dry-run` and the config checks.

The runs are shared (one module fixture) because process start-ups are their cost."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import interrupt_training_in_epoch
from safetensors import safe_open
from safetensors.torch import load_file

import internimage  # noqa: F401  (registers the models)
from internimage.cli import main

REPO = Path(__file__).resolve().parents[1]

# Deterministic: no augmentation (digits without shifts), no mixup, no drop path. SGD, whose
# update is proportional to the gradient (unlike Adam's), so averaged and summed gradients
# give different weights; clip_grad 15 clips some steps (norms 8 to 21) and not others;
# layer decay, the DCN LR multiplier, EMA and gradient checkpointing on. The clip head (H/G's)
# has no BatchNorm, whose statistics would depend on the per-process batch. 33 validation
# images: 2 batches of 16 on rank 0, 1 on rank 1 (which runs an uncounted forward to match).
RUN = [
    "train", "--quiet", "--epochs", "3", "--set", "sched.warmup_epochs=1",
    "--set", "data.train_limit=128", "--set", "data.val_limit=33", "--set", "data.max_shift=0",
    "--set", "model.kwargs.channels=16", "--set", "model.kwargs.groups=[1,2,4,8]",
    "--set", "model.kwargs.use_clip_projector=true", "--set", "model.drop_path_rate=0",
    "--set", "model.grad_checkpointing=true", "--set", "aug.mixup=0", "--set", "aug.cutmix=0",
    "--set", "optim.opt=sgd", "--set", "optim.lr=0.01", "--set", "optim.clip_grad=15",
    "--set", "optim.layer_decay=0.8", "--set", "optim.dcn_lr_mul=0.1",
    "--set", "ema.warmup=true",
]
FSDP = ["--set", "train.parallel=fsdp"]
# float32, same arithmetic up to the order of sums: ~2e-7 apart. Summed gradients: 3.6e-3.
ATOL = 2e-5


def run_here(args: list[str]) -> None:
    """One process, in this interpreter."""
    code = main(args)
    assert code == 0, args


def torchrun_command(launcher: list[str], args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "internimage",
            *args]


def check(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def torchrun(args: list[str], cwd: Path) -> str:
    cmd = torchrun_command(["--standalone", "--nproc-per-node", "2"], args)
    return check(subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=cwd,
                                timeout=300))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def documented_multinode_launcher() -> list[str]:
    """The torchrun options of docs/training.md's multi-node command, for two nodes of one
    process on 127.0.0.1 (only the process count, the endpoint and the id are replaced)."""
    text = (REPO / "docs" / "training.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("torchrun --nnodes"))
    words = shlex.split(line.replace('"$HEAD:29500"', f"127.0.0.1:{free_port()}")
                        .replace('"$JOB_ID"', "fsdp-test"))
    assert words[:3] == ["torchrun", "--nnodes", "2"] and "--rdzv-backend" in words, words
    launcher = words[1:words.index("-m")]
    launcher[launcher.index("--nproc-per-node") + 1] = "1"
    return launcher


def multinode(args: list[str], cwd: Path) -> str:
    """The two 'nodes' at once; their outputs (rank 0 logs on one of them)."""
    cmd = torchrun_command(documented_multinode_launcher(), args)
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env(), cwd=cwd) for _ in range(2)]
    out = ""
    try:
        for node in nodes:
            stdout, stderr = node.communicate(timeout=300)
            assert node.returncode == 0, stdout + stderr
            out += stdout
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three epochs of 4 steps, every step with a total batch of 32:

    * single: one process (no sharding), 1 x 32; ``single-2`` is it after epoch 2.
    * ddp: 2 processes x 16.
    * fsdp: epoch 1 on one fsdp process x 32 (``fsdp-1`` keeps it); epoch 2 resumed on two
      nodes of 1 x 16 with the documented multi-node command (1 -> 2; ``fsdp-2`` keeps it);
      epoch 3 resumed on 1 x 32 (2 -> 1).
    """
    root = tmp_path_factory.mktemp("fsdp")
    d = {name: root / name for name in ("single", "single-2", "ddp", "fsdp", "fsdp-1",
                                         "fsdp-2")}
    d["logs"] = root / "logs.txt"
    run_here(RUN + ["--batch-size", "32", "--stop-after", "2", "--output", str(d["single"])])
    shutil.copytree(d["single"], d["single-2"])
    run_here(["train", "--quiet", "--resume", str(d["single"])])
    logs = [torchrun(RUN + ["--batch-size", "16", "--output", str(d["ddp"])], root)]
    run_here(RUN + FSDP + ["--batch-size", "32", "--stop-after", "1", "--output",
                           str(d["fsdp"])])
    shutil.copytree(d["fsdp"], d["fsdp-1"])
    logs.append(multinode(["train", "--quiet", "--resume", str(d["fsdp"]), "--batch-size", "16",
                           "--stop-after", "1"], root))
    shutil.copytree(d["fsdp"], d["fsdp-2"])
    run_here(["train", "--quiet", "--resume", str(d["fsdp"]), "--batch-size", "32"])
    d["logs"].write_text("\n".join(logs))
    return d


def max_diff(a: Path, b: Path) -> dict[str, float]:
    """Largest absolute difference per weights file (model, EMA) of two run folders."""
    out = {}
    for name in ("model.safetensors", "model_ema.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys(), name
        out[name] = max((x[k].double() - y[k].double()).abs().max().item() for k in x
                        if x[k].is_floating_point())
    return out


def assert_close_runs(a: Path, b: Path) -> None:
    diffs = max_diff(a, b)
    print(f"{a.name} vs {b.name}: {diffs}")
    assert all(d <= ATOL for d in diffs.values()), (a.name, b.name, diffs)


def test_fsdp_equals_one_process_and_ddp(runs: dict[str, Path]) -> None:
    # after 8 steps, 4 of them sharded over 2 processes: the one-process run's weights
    assert_close_runs(runs["single-2"], runs["fsdp-2"])
    # after 12 steps: ddp on 2 processes and fsdp (1, then 2, then 1 process)
    assert_close_runs(runs["single"], runs["ddp"])
    assert_close_runs(runs["single"], runs["fsdp"])
    # the steps move the weights far beyond the tolerance
    assert min(max_diff(runs["single-2"], runs["single"]).values()) > 100 * ATOL
    logs = runs["logs"].read_text()
    assert "2 process(es)" in logs and "batch 16x2" in logs


def test_sharded_resume_on_another_number_of_processes(runs: dict[str, Path]) -> None:
    for name, epoch, world in (("fsdp-1", 1, 1), ("fsdp-2", 2, 2), ("fsdp", 3, 1)):
        folder = runs[name]
        state = torch.load(folder / "state.pt", weights_only=True)
        assert (state["epoch"], state["world_size"]) == (epoch, world)
        assert state["model"] is None and state["optimizer"] is None and state["ema"] is None
        # only the latest sharded state is kept
        assert [p.name for p in folder.glob("*.dcp")] == [f"state-epoch000{epoch}.dcp"]
        assert state["sharded"] == f"state-epoch000{epoch}.dcp"
    logs = runs["logs"].read_text()
    assert "resuming after epoch 1" in logs  # on the two nodes (rank 0's log)


def test_consolidated_weights_load_like_a_ddp_run(runs: dict[str, Path]) -> None:
    from internimage.cli.common import model_from_checkpoint

    def metadata(folder: Path) -> dict[str, str]:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            return {k: v for k, v in handle.metadata().items() if k != "producer"}

    assert metadata(runs["fsdp"]) == metadata(runs["ddp"])
    model, info = model_from_checkpoint(None, str(runs["fsdp"] / "model.safetensors"),
                                        False, torch.device("cpu"))
    assert type(model).__name__ == "InternImage" and len(info["class_names"]) == 10


def test_each_process_holds_half_the_state_and_one_file_can_be_made(
        runs: dict[str, Path], tmp_path: Path) -> None:
    """Every process writes the parameters, optimizer state and EMA it holds: on 2 processes
    each file is about half of the one-process file."""
    one = runs["fsdp-1"] / "state-epoch0001.dcp"
    two = runs["fsdp-2"] / "state-epoch0002.dcp"
    whole = (one / "__0_0.distcp").stat().st_size
    for rank in (0, 1):
        share = (two / f"__{rank}_0.distcp").stat().st_size / whole
        assert 0.45 < share < 0.55, (rank, share)
    # docs/training.md's conversion to one file holds the epoch's consolidated weights
    text = (REPO / "docs" / "training.md").read_text()
    line = next(line for line in text.splitlines()
                if line.startswith("python -m torch.distributed.checkpoint.format_utils "))
    words = shlex.split(line)
    words[-2:] = [str(two), str(tmp_path / "one.pt")]
    check(subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True,
                         env=env(), timeout=120))
    state = torch.load(tmp_path / "one.pt", weights_only=True)
    weights = load_file(str(runs["fsdp-2"] / "model.safetensors"))
    assert state["model"].keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(state["model"][key], value), key
    assert set(state) == {"model", "optimizer", "ema"}


@pytest.mark.parametrize("amp, atol", [("none", ATOL), ("bf16", 1e-3)])
def test_flash_internimage_shards_like_it_trains_alone(amp: str, atol: float,
                                                       tmp_path: Path) -> None:
    """FlashInternImage (DCNv4 blocks, BatchNorm in the head): one fsdp process equals one
    plain process, in float32 and in bf16 (a MixedPrecisionPolicy against plain autocast:
    the same bf16 matmuls, LayerNorm weights rounded to bf16; ~2e-4 apart, while training
    moves the weights by ~7e-3)."""
    args = ["train", "--quiet", "--epochs", "1", "--batch-size", "32",
            "--set", "data.train_limit=64", "--set", "data.val_limit=16",
            "--set", "data.max_shift=0", "--set", "model.name=flash_internimage",
            "--set", "model.kwargs.channels=16", "--set", "model.kwargs.groups=[1,2,4,8]",
            "--set", "model.kwargs.depths=[1,1,1,1]", "--set", "model.drop_path_rate=0",
            "--set", "optim.opt=sgd", "--set", "optim.lr=0.05", "--set", f"train.amp={amp}"]
    run_here(args + ["--output", str(tmp_path / "plain")])
    run_here(args + FSDP + ["--output", str(tmp_path / "fsdp")])
    diffs = max_diff(tmp_path / "plain", tmp_path / "fsdp")
    assert all(d <= atol for d in diffs.values()), diffs
    weights = load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float32}


def test_ctrl_c_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted in epoch 2, an fsdp run (ZeRO-2 here) keeps epoch 1's sharded state and
    resumes."""
    real = interrupt_training_in_epoch(monkeypatch, 2)
    out = tmp_path / "run"
    args = ["train", "--quiet", "--epochs", "2", "--batch-size", "32",
            "--set", "data.train_limit=32", "--set", "data.val_limit=8",
            "--set", "model.kwargs.channels=16", "--set", "model.kwargs.groups=[1,2,4,8]",
            "--set", "model.kwargs.depths=[1,1,1,1]", *FSDP,
            "--set", "train.fsdp_reshard_after_forward=false", "--output", str(out)]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert f"internimage train --resume {out}" in err and "epoch 1" in err, err
    assert (out / "state-epoch0001.dcp" / ".metadata").is_file()
    monkeypatch.setattr("internimage.train.train_one_epoch", real)
    assert main(["train", "--quiet", "--resume", str(out)]) == 0
    assert "resuming after epoch 1" in capsys.readouterr().out
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 2


def test_memory_plan_counts_each_process_share() -> None:
    import timm
    from timm.optim import create_optimizer_v2

    from internimage.distributed import memory_plan

    with torch.device("meta"):
        model = timm.create_model("internimage_t")
    numel = sum(p.numel() for p in model.parameters())
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3)
    ddp = memory_plan(model, optimizer, strategy="ddp", world=8, ema=True)
    fsdp = memory_plan(model, optimizer, strategy="fsdp", world=8, ema=True)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert ddp["params"] == 4 * numel and ddp["grads"] == 2 * 4 * numel  # + DDP's buckets
    assert ddp["ema"] == 4 * numel + buffers and ddp["gathered"] == 0
    assert 8 * numel <= ddp["optimizer"] <= 8 * numel + 8 * len(list(model.parameters()))
    # dim 0 padded to a multiple of 8: a little more than an eighth
    for key in ("params", "grads", "optimizer"):
        share = fsdp[key] / (ddp[key] / (2 if key == "grads" else 1))
        assert 1 / 8 <= share < 1 / 8 * 1.02, (key, share)
    assert 0 < fsdp["gathered"] < ddp["params"] / 2
    assert ddp["total"] == sum(v for k, v in ddp.items() if k != "total")


def test_dry_run_prints_the_table(capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--model", "internimage_t", "--num-classes", "1000", "--dry-run",
                 "--world-size", "8", "--set", "train.parallel=fsdp"]) == 0
    out = capsys.readouterr().out
    assert "internimage_t: 29.9M parameters, adamw, EMA" in out and "8 process(es)" in out
    header, *rows = out.splitlines()[1:]
    assert header.split()[-2:] == ["fsdp", "ddp"]  # the configured strategy first
    table = {line[:30].strip(): [float(v) for v in re.findall(r"([\d.]+) GB", line)]
             for line in rows}
    assert list(table) == ["parameters", "gradients", "optimizer state", "EMA",
                           "all-gathered (fsdp)", "total"]
    assert table["parameters"] == [0.01, 0.12] and table["total"] == [0.11, 0.72]


@pytest.mark.parametrize("args, needle", [
    (["--set", "train.parallel=zero3"], "--set train.parallel=zero3: expected one of ddp, fsdp"),
    (["--set", "train.parallel=fsdp", "--set", "train.amp=fp16"],
     "--set train.amp=fp16: fp16 (with its loss scaler) is not supported with "
     "train.parallel=fsdp"),
    (["--world-size", "2"], "--world-size: only with --dry-run"),
    (["--dry-run", "--world-size", "0"], "--world-size: expected an integer >= 1, got 0"),
])
def test_bad_parallel_settings_are_one_line_errors(args: list[str], needle: str,
                                                   capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--epochs", "1", *args])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and needle in err.strip().splitlines()[-1]
