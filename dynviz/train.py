"""The training loop of a recipe (``dynviz.recipes``) on a workspace's dataset: one-cycle SGD,
label smoothing, channels_last, a checkpoint every epoch, ``resume``, and data-parallel runs
under ``torchrun`` (gloo on CPU, NCCL on GPU).

Gated models add LC-Net's sparsity penalty ``α·mean|S_L| + β·mean|S_C|`` and train their gates
at their own learning rate.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import models
from dynviz import data, files, settings, zoo
from dynviz.losses import classification_loss, sparsity_penalty
from dynviz.recipes import Recipe
from dynviz.workspace import Workspace

log = logging.getLogger(__name__)

GATE_MARK = "_gate."     # in the parameter names of LC-Net's L-Net and C-Net


# ---------------------------------------------------------------------------- helpers
def _saved_recipe(saved: dict) -> dict:
    """A checkpoint's recipe, with fields added to ``Recipe`` since it was written at their
    defaults, so adding a field does not orphan runs in progress."""
    defaults = {f.name: f.default for f in dataclasses.fields(Recipe)
                if f.default is not dataclasses.MISSING}
    return {**defaults, **saved}


def _resumable(saved: dict, done: int, recipe: Recipe) -> bool:
    """Whether a run of ``saved`` recipe, ``done`` epochs in, can go on under ``recipe``: the
    same recipe, or one that adds whole cycles of the same length to a run that finished
    its own (its schedule is a prefix of the new one)."""
    new = dataclasses.asdict(recipe)
    if saved == new:
        return True
    same_but_length = {k: v for k, v in saved.items() if k not in ("epochs", "cycles")} == \
        {k: v for k, v in new.items() if k not in ("epochs", "cycles")}
    saved_cycle = saved["epochs"] // saved["cycles"]
    return (same_but_length and done == saved["epochs"] and saved_cycle == recipe.cycle_epochs
            and recipe.cycles > saved["cycles"])


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict]:
    groups = {"decay": [], "no_decay": [], "gates": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if GATE_MARK in name:
            groups["gates"].append(p)
        elif p.ndim <= 1:
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    lr, gate_lr = recipe.peak_lr, recipe.gate_lr or recipe.peak_lr
    return [g for g in (
        {"params": groups["decay"], "weight_decay": recipe.weight_decay, "lr": lr},
        {"params": groups["no_decay"], "weight_decay": 0.0, "lr": lr},
        {"params": groups["gates"], "weight_decay": 0.0, "lr": gate_lr},
    ) if g["params"]]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=settings.PROJECT_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray,
                      spec: data.DataSpec, device: torch.device, batch_size: int = 500):
    """(accuracy, mean MACs per image) of ``model`` in eval mode on the masked path, on
    ``images`` of ``spec``; for staged models the accuracy of every stage (a list) and the
    MACs of running them all."""
    model.eval()
    correct, macs = 0, 0.0
    for x, y in data.batches(images, labels, batch_size, spec, device=device):
        out = model(x)
        hits = out.stage_logits.argmax(-1) == y[:, None]          # (B, K)
        correct = correct + hits.sum(0).cpu().numpy()
        macs += out.macs.sum().item()
    accuracy = correct / len(labels)
    return (accuracy.tolist() if len(accuracy) > 1 else float(accuracy[0])), macs / len(labels)


# ---------------------------------------------------------------------------- loop
@dataclass
class TrainState:
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0


def run_dir(ws: Workspace, name: str) -> Path:
    """Where a run of ``name`` keeps its resume state (and, in the built-in workspace, its
    final files by default)."""
    return ws.cache / "runs" / name


def default_out_dir(ws: Workspace, name: str) -> Path:
    """Where ``train`` writes by default: a workspace of one's own trains into its
    checkpoints (its systems load them there); the built-in one into ``run_dir``, away from
    the checkpoints the repository ships."""
    return run_dir(ws, name) if ws.builtin else ws.checkpoints


def train(ws: Workspace, name: str, recipe: Recipe, *, resume: bool = False,
          epochs: int | None = None, limit_batches: int | None = None,
          out_dir: Path | None = None, replace: bool = False, progress: bool = True) -> dict:
    """Train ``recipe`` on ``ws``'s dataset and write ``<out_dir>/<name>.pt`` (weights) and
    ``<name>.json`` (the manifest).

    Args:
        resume: continue from ``run_dir(ws, name) / "last.pt"`` if it exists.
        epochs: override ``recipe.epochs`` (the LR schedule follows it).
        limit_batches: stop every epoch after this many batches (smoke runs and tests).
        out_dir: where the final files go (default ``default_out_dir(ws, name)``).
        replace: allow writing over a checkpoint the app loads (in ``ws.checkpoints`` or
            the repository's models/checkpoints); without it such a run fails before it
            trains.

    Returns the manifest on rank 0, ``{}`` on the other ranks of a data-parallel run.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(ws, name)
    weights = out_dir / f"{name}.pt"
    zoo_dirs = {ws.checkpoints.resolve(), settings.BUILTIN_CHECKPOINTS.resolve()}
    if weights.exists() and out_dir.resolve() in zoo_dirs and not replace:
        elsewhere = (f"leave out --out-dir to train into {run_dir(ws, name)}" if ws.builtin
                     else "train it under another --name")
        raise ValueError(f"{weights} exists and the app loads it: add --replace to overwrite "
                         f"it, or {elsewhere}")
    run = fit(ws, name, recipe, resume=resume, epochs=epochs, limit_batches=limit_batches,
              progress=progress)
    if _rank_world()[0] != 0:
        return {}
    return _finish(ws, name, run, out_dir)


@dataclass
class FitResult:
    model: nn.Module       # unwrapped (not the DDP wrapper), on ``device``
    recipe: Recipe         # with the ``epochs`` override applied
    state: TrainState
    dataset: data.Dataset
    device: torch.device


def fit(ws: Workspace, name: str, recipe: Recipe, *, resume: bool = False,
        epochs: int | None = None, limit_batches: int | None = None,
        progress: bool = True) -> FitResult:
    """The training loop of ``train`` (every rank runs it): the model for ``ws``'s classes
    and image size, its ``init_from`` and ``teacher`` read from ``ws.checkpoints``;
    checkpoints every epoch to ``run_dir(ws, name) / "last.pt"`` from rank 0; writes no
    final files."""
    from tqdm import tqdm

    if epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=epochs)
    rank, world = _rank_world()
    device = settings.device()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(recipe.seed)
    last = run_dir(ws, name) / "last.pt"
    if not resume and last.exists():
        _keep_unfinished(last)
    elif resume and not last.exists():
        log.warning("nothing to resume at %s: %s starts at epoch 1", last, name)

    dataset = ws.dataset()
    train_split, val_split = ws.split("train", dataset), ws.split("val", dataset)
    train_images, val_images = train_split.images(), val_split.images()

    model = recipe.build(ws.data)
    init_sha = None
    if recipe.init_from:
        target = model.get_submodule(recipe.init_into) if recipe.init_into else model
        init_path = zoo.checkpoint_path(ws, recipe.init_from)
        if not init_path.exists():
            raise FileNotFoundError(f"{init_path} (the recipe starts from it) is missing: train "
                                    f"{recipe.init_from} first, or save its state dict there")
        zoo.load_weights(target, init_path, strict=bool(recipe.init_into))
        init_sha = files.sha256_file(init_path)
    for pname, p in model.named_parameters():
        frozen = recipe.freeze_gates and GATE_MARK in pname
        p.requires_grad_(pname.startswith(recipe.trainable) and not frozen)
    model = model.to(device, memory_format=torch.channels_last)
    teacher = _teacher(ws, recipe, device)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(param_groups(model, recipe), momentum=recipe.momentum,
                                nesterov=True)
    steps_per_epoch = len(train_split) // recipe.batch_size // world
    if not steps_per_epoch:
        raise ValueError(f"{len(train_split)} training images make no batch of "
                         f"{recipe.batch_size} on each of {world} process(es): lower "
                         f"batch_size (a [recipes.NAME] table of the workspace's dynviz.toml)")
    if limit_batches:
        steps_per_epoch = min(steps_per_epoch, limit_batches)
    peaks = [g["lr"] for g in optimizer.param_groups]

    def one_cycle() -> torch.optim.lr_scheduler.OneCycleLR:
        """A fresh cycle: the LR rises from peak/10 to the peak and anneals to peak/1000."""
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=peaks, total_steps=recipe.cycle_epochs * steps_per_epoch,
            pct_start=recipe.warmup, div_factor=10.0, final_div_factor=100.0)

    scheduler = one_cycle()
    generator = torch.Generator().manual_seed(recipe.seed)
    state = TrainState()
    if resume and last.exists():
        ckpt = _read_resume_state(last)
        saved = _saved_recipe(ckpt["recipe"])
        if not _resumable(saved, ckpt["epoch"], recipe):
            changed = ", ".join(f"{k} = {saved.get(k)!r} there, {v!r} now"
                                for k, v in dataclasses.asdict(recipe).items()
                                if saved.get(k) != v)
            raise ValueError(f"{last} is a run of another recipe ({changed}): give the same "
                             f"recipe and options to continue it, or delete it to start over")
        if init_sha and "init_sha256" not in ckpt:
            log.warning("%s predates starting-checkpoint digests: cannot tell whether it "
                        "started from the current %s.pt", last, recipe.init_from)
        elif ckpt.get("init_sha256") != init_sha:
            raise ValueError(f"{last} started from another {recipe.init_from}.pt (retrained "
                             f"since); delete it or drop --resume")
        if teacher and ckpt.get("teacher_sha256") != teacher[1]:
            raise ValueError(f"{last} learned from another {recipe.teacher}.pt (retrained "
                             f"since); delete it or drop --resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["epoch"] % recipe.cycle_epochs:        # else a new cycle starts below
            scheduler.load_state_dict(ckpt["scheduler"])
        generator.set_state(ckpt["generator"])
        state = TrainState(ckpt["epoch"], ckpt["history"], ckpt["wall_seconds"])
        log.info("resumed %s at epoch %d", name, state.epoch)

    for epoch in range(state.epoch, recipe.epochs):
        if epoch % recipe.cycle_epochs == 0 and epoch > 0:
            scheduler = one_cycle()                    # warm restart
        started = time.perf_counter()
        net.train()
        if recipe.trainable:  # frozen parts keep their BatchNorm statistics
            for mname, module in model.named_modules():
                if isinstance(module, nn.BatchNorm2d) and not mname.startswith(recipe.trainable):
                    module.eval()
        loss_sum, seen = 0.0, 0
        batches = data.batches(train_images, train_split.labels, recipe.batch_size, ws.data,
                               generator=generator, train=True, device=device,
                               shard=(rank, world))
        bar = tqdm(batches, total=steps_per_epoch, desc=f"{name} {epoch + 1}/{recipe.epochs}",
                   disable=not progress or rank != 0, leave=False, mininterval=2.0)
        for step, (x, y) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.bf16):
                target = None
                if teacher:
                    with torch.no_grad():
                        target = teacher[0](x).logits
                out = net(x)
                loss = classification_loss(out.stage_logits, y, recipe.label_smoothing,
                                            recipe.distill, recipe.distill_temperature, target)
                if recipe.l1_block or recipe.l1_channel or recipe.mac_weight or recipe.neg_l1:
                    loss = loss + sparsity_penalty(
                        out.trace, recipe, recipe.pull(epoch + step / steps_per_epoch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", refresh=False)
        if world > 1:
            _average_buffers(model, world)
        accuracy, macs = evaluate_accuracy(model, val_images, val_split.labels, ws.data,
                                           device)
        state.wall_seconds += time.perf_counter() - started
        state.epoch = epoch + 1
        state.history.append({"epoch": epoch + 1, "train_loss": round(loss_sum / max(seen, 1), 4),
                              "val_accuracy": _rounded(accuracy), "val_macs": round(macs),
                              "seconds": round(time.perf_counter() - started, 1)})
        log.info("%s epoch %d: %s", name, epoch + 1, state.history[-1])
        if rank == 0:
            last.parent.mkdir(parents=True, exist_ok=True)
            # tensors and plain data only: --resume reads it back with weights_only=True
            _atomic_save({"recipe": dataclasses.asdict(recipe), "model": model.state_dict(),
                          "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(),
                          "generator": generator.get_state(), "epoch": state.epoch,
                          "init_sha256": init_sha, "teacher_sha256": teacher and teacher[1],
                          "history": state.history, "wall_seconds": state.wall_seconds}, last)

    return FitResult(model, recipe, state, dataset, device)


RESUME_KEYS = ("recipe", "model", "optimizer", "scheduler", "generator", "epoch", "history",
               "wall_seconds")


def _keep_unfinished(last: Path) -> None:
    """Refuses to start a run over ``last`` when it holds a run that has epochs to go.

    Raises:
        ValueError: naming it, how far it got and the two ways on.
    """
    ckpt = _read_resume_state(last, fix="delete it to start the run over")
    planned = _saved_recipe(ckpt["recipe"])["epochs"]
    if ckpt["epoch"] < planned:
        raise ValueError(f"{last} holds {ckpt['epoch']} of {planned} epochs of an unfinished "
                         f"run: add --resume to continue it, or delete it to start over")


def _read_resume_state(last: Path,
                       fix: str = "delete it to start the run over, or drop --resume") -> dict:
    """The resume state at ``last``: tensors and plain data only (``weights_only``).

    Raises:
        zoo.CheckpointError: it cannot be read, or is not a resume state; the message ends
            with ``fix``.
    """
    ckpt = zoo.read_checkpoint(last, fix)
    absent = [key for key in RESUME_KEYS if key not in ckpt]
    if absent:
        raise zoo.CheckpointError(f"{last} is not a resume state (no {', '.join(absent)}); "
                                  f"{fix}")
    return ckpt


def _teacher(ws: Workspace, recipe: Recipe,
             device: torch.device) -> tuple[nn.Module, str] | None:
    """The recipe's frozen teacher (in ``ws.checkpoints``) in eval mode, and the digest of its
    checkpoint. The model is the one named in the checkpoint's manifest (else the
    checkpoint's name), for the workspace's classes and image size."""
    if not recipe.teacher:
        return None
    path = zoo.checkpoint_path(ws, recipe.teacher)
    if not path.exists():
        raise FileNotFoundError(f"{path} (the teacher) is missing: train {recipe.teacher} first")
    manifest = path.with_suffix(".json")
    model = models.create(json.loads(manifest.read_text())["model"] if manifest.exists()
                          else recipe.teacher, num_classes=ws.data.n_classes,
                          input_size=ws.data.image_size)
    zoo.load_weights(model, path)
    model.requires_grad_(False)
    return model.to(device, memory_format=torch.channels_last).eval(), files.sha256_file(path)


@torch.no_grad()
def _average_buffers(model: nn.Module, world: int) -> None:
    """BatchNorm running statistics are updated by each rank on its own shard (DDP only
    broadcasts them before a forward): average them so every rank holds the same model."""
    for buffer in model.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= world


def _rounded(accuracy: float | list[float]) -> float | list[float]:
    """One accuracy, or one per exit of a staged model."""
    return [round(a, 4) for a in accuracy] if isinstance(accuracy, list) else round(accuracy, 4)


def _atomic_save(obj, path: Path) -> None:
    with files.atomic_write(path) as f:
        torch.save(obj, f)


def _finish(ws: Workspace, name: str, run: FitResult, out_dir: Path) -> dict:
    """Write the weights and a manifest with fit/check accuracy and MACs, and the classes and
    image size the model was built for."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.pt"
    _atomic_save({k: v.cpu() for k, v in run.model.state_dict().items()}, weights)
    metrics = {}
    for half in ("fit", "check"):
        split = ws.split(half, run.dataset)
        acc, macs = evaluate_accuracy(run.model, split.images(), split.labels, ws.data,
                                      run.device)
        metrics[half] = {"accuracy": _rounded(acc), "macs_mean": round(macs)}
    manifest = {
        "name": name, "model": run.recipe.model, "recipe": dataclasses.asdict(run.recipe),
        "metrics": metrics, "history": run.state.history,
        "macs_dense": run.model.macs(),
        "classes": list(ws.data.classes), "image_size": ws.data.image_size,
        "data_fingerprint": run.dataset.fingerprint, "sha256": files.sha256_file(weights),
        "git_commit": git_commit(), "wall_seconds": round(run.state.wall_seconds),
        "device": str(run.device),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    files.atomic_write_text(out_dir / f"{name}.json", json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %s: check accuracy %s", weights, metrics["check"]["accuracy"])
    return manifest


def init_distributed() -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
