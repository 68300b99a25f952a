"""The training loop of a recipe (``dynviz.recipes``): one-cycle SGD, label smoothing,
channels_last, a checkpoint every epoch, ``resume``, and data-parallel runs under ``torchrun``
(gloo on CPU, NCCL on GPU).

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
import torch.nn.functional as F

import models
from dynviz import data, files, settings, zoo
from dynviz.recipes import Recipe

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


def classification_loss(logits: torch.Tensor, y: torch.Tensor, smoothing: float,
                        distill: float = 0.0, temperature: float = 1.0,
                        teacher: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy; for staged models (B, K, C) the mean over images and the K exits
    (K = 1 is a single network's (B, C)).

    With ``distill`` = w > 0 a student learns from a teacher too (Hinton et al.'s
    distillation): its term is (1 − w)·CE + w·T²·KL(p_teacher ‖ p_student), p at temperature
    T. The teacher is ``teacher`` (B, C) logits of another model, for a (B, C) student;
    in a staged model without one, every exit but the last learns from the last exit.
    """
    logits = logits.float()
    if logits.ndim == 3 and logits.shape[1] == 1:
        logits = logits[:, 0]
    if logits.ndim == 2:
        ce = F.cross_entropy(logits, y, label_smoothing=smoothing, reduction="none")
        if teacher is None or not distill:
            return ce.mean()
        kd = _distillation(logits, teacher.float(), temperature)
        return ((1 - distill) * ce + distill * kd).mean()
    if teacher is not None:
        raise ValueError("staged models learn from their final exit, not from a teacher")
    b, k, _ = logits.shape
    ce = F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(k),
                         label_smoothing=smoothing, reduction="none").view(b, k)
    if not distill or k == 1:
        return ce.mean()
    kd = _distillation(logits[:, :-1], logits[:, -1:], temperature)         # (B, K-1)
    early = (1 - distill) * ce[:, :-1] + distill * kd
    return torch.cat([early, ce[:, -1:]], 1).mean()


def _distillation(student: torch.Tensor, teacher: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """T²·KL(p_teacher ‖ p_student) over the last dim; the teacher is a constant."""
    t = F.log_softmax(teacher.detach() / temperature, -1)
    s = F.log_softmax(student / temperature, -1)
    return temperature ** 2 * (t.exp() * (t - s)).sum(-1)


def sparsity_penalty(trace, recipe: Recipe) -> torch.Tensor:
    """α·mean|S_L| + β·mean|S_C| over images, blocks and channels (LC-Net's L1 terms).

    With a ``mac_budget`` the terms pull only while the batch's mean MACs exceed it, so that
    once the gates spend within the budget the rest of the run trains for accuracy alone.
    """
    if recipe.mac_budget and trace.macs.float().mean() <= recipe.mac_budget:
        return trace.block_scores.new_zeros(())
    block = trace.block_scores.abs().mean()
    channel = torch.cat([s.abs().flatten(1) for s in trace.channel_scores], 1).mean()
    return recipe.l1_block * block + recipe.l1_channel * channel


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
                      device: torch.device, batch_size: int = 500):
    """(accuracy, mean MACs per image) of ``model`` in eval mode on the masked path; for
    staged models the accuracy of every stage (a list) and the MACs of running them all."""
    model.eval()
    correct, macs = 0, 0.0
    for x, y in data.batches(images, labels, batch_size, device=device):
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


def run_dir(name: str) -> Path:
    """Where a run of ``name`` keeps its resume state, and by default its final files."""
    return settings.cache_dir() / "runs" / name


def train(name: str, recipe: Recipe, *, resume: bool = False, epochs: int | None = None,
          limit_batches: int | None = None, out_dir: Path | None = None,
          replace: bool = False, progress: bool = True) -> dict:
    """Train ``recipe`` and write ``<out_dir>/<name>.pt`` (weights) and ``<name>.json``.

    Args:
        resume: continue from ``<cache>/runs/<name>/last.pt`` if it exists.
        epochs: override ``recipe.epochs`` (the LR schedule follows it).
        limit_batches: stop every epoch after this many batches (smoke runs and tests).
        out_dir: where the final files go (default ``run_dir(name)``).
        replace: allow writing over a checkpoint the app loads (in
            ``settings.checkpoint_dir()`` or the built-in models/checkpoints); without it
            such a run fails before it trains.

    Returns the manifest on rank 0, ``{}`` on the other ranks of a data-parallel run.
    """
    out_dir = Path(out_dir) if out_dir is not None else run_dir(name)
    weights = out_dir / f"{name}.pt"
    zoo_dirs = {settings.checkpoint_dir().resolve(), settings.BUILTIN_CHECKPOINTS.resolve()}
    if weights.exists() and out_dir.resolve() in zoo_dirs and not replace:
        raise ValueError(f"{weights} exists and the app loads it: add --replace to overwrite "
                         f"it, or leave out --out-dir to train into {run_dir(name)}")
    run = fit(name, recipe, resume=resume, epochs=epochs, limit_batches=limit_batches,
              progress=progress)
    if _rank_world()[0] != 0:
        return {}
    return _finish(name, run.recipe, run.model, run.state, run.dataset, out_dir, run.device)


@dataclass
class FitResult:
    model: nn.Module       # unwrapped (not the DDP wrapper), on ``device``
    recipe: Recipe         # with the ``epochs`` override applied
    state: TrainState
    dataset: data.Dataset
    device: torch.device


def fit(name: str, recipe: Recipe, *, resume: bool = False, epochs: int | None = None,
        limit_batches: int | None = None, progress: bool = True) -> FitResult:
    """The training loop of ``train`` (every rank runs it); checkpoints every epoch to
    ``<cache>/runs/<name>/last.pt`` from rank 0; writes no final files."""
    from tqdm import tqdm

    if epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=epochs)
    rank, world = _rank_world()
    device = settings.device()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(recipe.seed)
    last = run_dir(name) / "last.pt"

    dataset = data.open_cifar10()
    train_split, val_split = data.get_split("train", dataset), data.get_split("val", dataset)
    train_images, val_images = train_split.images(), val_split.images()

    model = recipe.build()
    init_sha = None
    if recipe.init_from:
        target = model.get_submodule(recipe.init_into) if recipe.init_into else model
        init_path = settings.checkpoint_dir() / f"{recipe.init_from}.pt"
        zoo.load_weights(target, init_path, strict=bool(recipe.init_into))
        init_sha = files.sha256_file(init_path)
    for pname, p in model.named_parameters():
        frozen = recipe.freeze_gates and GATE_MARK in pname
        p.requires_grad_(pname.startswith(recipe.trainable) and not frozen)
    model = model.to(device, memory_format=torch.channels_last)
    teacher = _teacher(recipe, device)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(param_groups(model, recipe), momentum=recipe.momentum,
                                nesterov=True)
    steps_per_epoch = len(train_split) // recipe.batch_size // world
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
        if not _resumable(_saved_recipe(ckpt["recipe"]), ckpt["epoch"], recipe):
            raise ValueError(f"{last} was written by another recipe; delete it or drop --resume")
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
        batches = data.batches(train_images, train_split.labels, recipe.batch_size,
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
                if recipe.l1_block or recipe.l1_channel:
                    loss = loss + sparsity_penalty(out.trace, recipe)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", refresh=False)
        if world > 1:
            _average_buffers(model, world)
        accuracy, macs = evaluate_accuracy(model, val_images, val_split.labels, device)
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


def _read_resume_state(last: Path) -> dict:
    """The resume state at ``last``: tensors and plain data only (``weights_only``)."""
    fix = "delete it to start the run over, or drop --resume"
    ckpt = zoo.read_checkpoint(last, fix)
    absent = [key for key in RESUME_KEYS if key not in ckpt]
    if absent:
        raise zoo.CheckpointError(f"{last} is not a resume state (no {', '.join(absent)}); "
                                  f"{fix}")
    return ckpt


def _teacher(recipe: Recipe, device: torch.device) -> tuple[nn.Module, str] | None:
    """The recipe's frozen teacher in eval mode, and the digest of its checkpoint. The model
    is the one named in the checkpoint's manifest (else the checkpoint's name)."""
    if not recipe.teacher:
        return None
    path = settings.checkpoint_dir() / f"{recipe.teacher}.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} (the teacher) is missing: train {recipe.teacher} first")
    manifest = path.with_suffix(".json")
    model = models.create(json.loads(manifest.read_text())["model"] if manifest.exists()
                          else recipe.teacher)
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


def _finish(name, recipe, model, state, dataset, out_dir, device) -> dict:
    """Write the weights and a manifest with fit/check accuracy and MACs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{name}.pt"
    _atomic_save({k: v.cpu() for k, v in model.state_dict().items()}, weights)
    metrics = {}
    for half in ("fit", "check"):
        split = data.get_split(half, dataset)
        acc, macs = evaluate_accuracy(model, split.images(), split.labels, device)
        metrics[half] = {"accuracy": _rounded(acc), "macs_mean": round(macs)}
    manifest = {
        "name": name, "model": recipe.model, "recipe": dataclasses.asdict(recipe),
        "metrics": metrics, "history": state.history,
        "macs_dense": model.macs(),
        "data_fingerprint": dataset.fingerprint, "sha256": files.sha256_file(weights),
        "git_commit": git_commit(), "wall_seconds": round(state.wall_seconds),
        "device": str(device), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    files.atomic_write_text(out_dir / f"{name}.json", json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %s: check accuracy %s", weights, metrics["check"]["accuracy"])
    return manifest


def init_distributed() -> None:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
