"""Where LC-Net's accuracy goes (issue 29): what the gates of the shipped LC-Net do, how its
BatchNorm statistics compare with what its BNs see under hard gates, why re-estimating them
costs five points, accuracy against epochs, and the static frontier it is judged against.

    python scripts/lcnet_analysis.py                      # every section
    python scripts/lcnet_analysis.py gates bn             # some of them
    python scripts/lcnet_analysis.py bn --bn-images 5000

Sections (Markdown tables on stdout, progress on stderr):
- ``gates``: per-block and per-stage skip rates (S_L = 0) and channel-on rates (S_C > 0) on
  the *fit* half, the MACs by stage, accuracy by how many blocks ran, and the MACs spent on
  the images resnet56 or LC-Net get right and wrong.
- ``bn``: per block, the running statistics stored in bn1/bn2 against the moments of what
  those BNs see on *fit* under hard gates (all images; bn1: conv1's output on images whose
  block ran, in channels that are on; bn2: conv2's output on images whose block ran) and on
  augmented train images under the training-time leaky gates; then BatchNorm re-estimated
  on ``--bn-images`` train images, as they are and augmented as in training, several ways
  (PyTorch's train-mode pass; exact moments, layer by layer, from all images or only from
  the images and channels that run), each judged on *fit*, and resnet56 re-estimated the
  same way as a control.
- ``soft``: the gates in their training form (leaky) against their inference form on *fit*:
  accuracy, and the leaky scores of the blocks the hard gates skip.
- ``epochs``: validation accuracy and MACs per epoch of the shipped run and of the earlier
  LC-Net runs whose manifests are in git history.
- ``frontier``: resnet8/20/56 and LC-Net on fit and check from the shipped caches, the
  static log-MAC interpolation at LC-Net's MACs and the paired standard error of the gap.
  ``--checkpoint PT`` judges a training run's LC-Net instead of the shipped one:

    python scripts/lcnet_analysis.py frontier --checkpoint .cache/runs/NAME/NAME.pt

Nothing is written: re-estimated statistics live in copies of the model.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dynviz import cache, data, operating_points, workspace, zoo  # noqa: E402
from dynviz.workspace import Workspace  # noqa: E402

SECTIONS = ("gates", "bn", "soft", "epochs", "frontier")
HINGE_EPS = 0.03     # the recipes' mac_eps
# the LC-Net docs/lcnet.md's sections 1-4 measure: kd16, served as lcnet_resnet56_seq until
# trial 4 replaced it (--checkpoint runs another checkpoint in its place)
SYSTEM = "lcnet_resnet56_blocks"
CHECKPOINT = "lcnet_resnet56_kd16"
ALWAYS, NEVER = 0.99, 0.01   # runs on ≥ 99% (≤ 1%) of fit images: an always- (never-) run block

# Earlier LC-Net runs on resnet56 whose manifests are in git history: (label, commit, name).
# The runs kd32, kd16_more and budget were trials kept out of the zoo; their figures are in
# docs/results.md only.
GIT_RUNS = (
    ("lcnet_resnet56 (1-cycle backbone)", "ed197a7", "lcnet_resnet56"),
    ("_blocks (1-cycle)", "605ec1d", "lcnet_resnet56_blocks"),
    ("_blocks (2-cycle)", "7415249", "lcnet_resnet56_blocks"),
    ("_blocks (3-cycle)", "7da31da", "lcnet_resnet56_blocks"),
    ("_kd (3-cycle)", "2321927", "lcnet_resnet56_kd"),
    ("_kd (4-cycle)", "5c50c64", "lcnet_resnet56_kd"),
)
# The trials not in git: (label, epochs, pull, fit accuracy, fit MACs), from docs/results.md.
DOC_RUNS = (
    ("_kd16_more (from kd16)", 16, "α 1.0, β 0.3, KD", 0.8824, 54.4e6),
    ("_kd32", 32, "α 1.0, β 0.3, KD", 0.8820, 51.6e6),
    ("_budget", 16, "α 2.0, β 0.3 above 48 M MACs only, KD", 0.7864, 48.1e6),
)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}%"


def mega(x: float) -> str:
    return f"{x / 1e6:.1f}"


# ---------------------------------------------------------------------------- gates
@dataclass
class GatePass:
    """One forward of a network over N images (``ran`` is empty for a static one)."""
    correct: np.ndarray          # (N,) bool
    macs: np.ndarray             # (N,) MACs
    ran: np.ndarray              # (N, n_blocks) bool: S_L > 0
    channels_on: list[np.ndarray]  # per block (N, C_mid) bool: S_C > 0

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


def set_leaky(model: nn.Module, leaky: bool) -> None:
    """Gates in their training-time form (leaky ReLU-1) or their inference form (clamp)."""
    for block in model.blocks:
        block.block_gate.train(leaky)
        block.channel_gate.train(leaky)


@torch.no_grad()
def gate_pass(model: nn.Module, images: np.ndarray, labels: np.ndarray, spec: data.DataSpec,
              batch_size: int, desc: str) -> GatePass:
    """The model's own forward (BN in eval mode) over ``images``, with its trace if any."""
    correct, macs, ran, channels = [], [], [], []
    n_batches = -(-len(labels) // batch_size)
    for x, y in tqdm(data.batches(images, labels, batch_size, spec), total=n_batches, desc=desc,
                     leave=False):
        out = model(x)
        correct.append((out.logits.argmax(1) == y).numpy())
        macs.append(out.macs.numpy())
        if out.trace is not None:             # a gated network; a static one has no trace
            ran.append(out.trace.blocks_executed.numpy())
            channels.append([(s > 0).numpy() for s in out.trace.channel_scores])
    return GatePass(np.concatenate(correct), np.concatenate(macs),
                    np.concatenate(ran) if ran else np.zeros((0, 0), bool),
                    [np.concatenate(c) for c in zip(*channels)])


def block_kind(rate: float) -> str:
    return "always" if rate >= ALWAYS else "never" if rate <= NEVER else "image-dependent"


def gates_section(model, fit: data.Split, reference: dict[str, np.ndarray],
                  batch_size: int) -> GatePass:
    p = gate_pass(model, fit.images(), fit.labels, fit.spec, batch_size, "gates on fit")
    cost = model.cost
    names = model.block_names()
    dense = model.cost_table()
    rate = p.ran.mean(0)
    rows, spent = [], np.zeros((len(p.correct), len(names)))
    for i, name in enumerate(names):
        b = cost.blocks[i]
        active = p.channels_on[i].sum(1)
        spent[:, i] = b.always + p.ran[:, i] * (b.branch + b.per_channel * active)
        on_when_run = (p.channels_on[i][p.ran[:, i]].mean() if p.ran[:, i].any() else float("nan"))
        plain = sum(v for k, v in dense.items()
                    if k.startswith(name + ".") and "_gate." not in k)
        rows.append([name, pct(rate[i], 1), block_kind(rate[i]),
                     "—" if math.isnan(on_when_run) else pct(on_when_run, 1),
                     f"{spent[:, i].mean() / 1e6:.2f}", f"{plain / 1e6:.2f}"])
    print(f"### Blocks (fit half, {len(p.correct)} images; accuracy {pct(p.accuracy)}, "
          f"{mega(p.macs.mean())} M MACs)\n")
    print(table(["block", "runs (S_L > 0)", "kind", "channels on when it runs (S_C > 0)",
                 "MACs spent (M, mean)", "MACs dense (M)"], rows))

    print("\n### Stages\n")
    fixed = cost.fixed
    rows = []
    for stage in model.layer_names:
        idx = [i for i, n in enumerate(names) if n.startswith(stage + ".")]
        kinds = [block_kind(rate[i]) for i in idx]
        plain = sum(v for k, v in dense.items() if k.startswith(stage + ".") and "_gate." not in k)
        stage_macs = spent[:, idx].sum(1)
        rows.append([stage, len(idx), kinds.count("always"), kinds.count("image-dependent"),
                     kinds.count("never"), f"{p.ran[:, idx].sum(1).mean():.2f}",
                     mega(stage_macs.mean()), mega(plain),
                     pct(stage_macs.mean() / p.macs.mean(), 0)])
    rows.append(["stem + classifier", "—", "—", "—", "—", "—", mega(fixed), mega(fixed),
                 pct(fixed / p.macs.mean(), 0)])
    print(table(["stage", "blocks", "always", "image-dependent", "never", "blocks run (mean)",
                 "MACs (M, mean)", "MACs dense (M)", "share of LC-Net's MACs"], rows))

    print("\n### Accuracy by how many blocks ran (fit half; resnet56 and resnet20 on the same "
          "images)\n")
    n_run = p.ran.sum(1)
    edges = np.unique(np.quantile(n_run, [0, 0.2, 0.4, 0.6, 0.8, 1.0]).round())
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        last = hi == edges[-1]
        sel = (n_run >= lo) & ((n_run <= hi) if last else (n_run < hi))
        if not sel.any():
            continue
        label = f"{int(lo)}–{int(hi if last else hi - 1)}" if (hi - (0 if last else 1)) > lo \
            else f"{int(lo)}"
        rows.append([label, int(sel.sum()), mega(p.macs[sel].mean()), pct(p.correct[sel].mean(), 1),
                     pct(reference["resnet56"][sel].mean(), 1),
                     pct(reference["resnet20"][sel].mean(), 1)])
    print(table(["blocks run", "images", "LC-Net MACs (M)", "LC-Net", "resnet56", "resnet20"],
                rows))

    print("\n### Where the MACs go: by which network gets the image right (fit half)\n")
    rows = []
    for label, sel in (("all", np.ones_like(p.correct)),
                       ("resnet56 right", reference["resnet56"]),
                       ("resnet56 wrong", ~reference["resnet56"]),
                       ("LC-Net right", p.correct), ("LC-Net wrong", ~p.correct),
                       ("resnet56 right, LC-Net wrong", reference["resnet56"] & ~p.correct),
                       ("resnet56 wrong, LC-Net right", ~reference["resnet56"] & p.correct)):
        lo, hi = np.percentile(p.macs[sel], [10, 90])
        rows.append([label, int(sel.sum()), mega(p.macs[sel].mean()),
                     f"{p.ran[sel].sum(1).mean():.2f}", f"{mega(lo)}–{mega(hi)}"])
    print(table(["images", "n", "LC-Net MACs (M, mean)", "blocks run (mean)",
                 "MACs, 10th–90th percentile (M)"], rows))
    return p


# ---------------------------------------------------------------------------- BatchNorm
class Moments:
    """Per-channel pixel count, Σh and Σh² of a BN's input over a masked set of images."""

    def __init__(self, channels: int):
        self.n = torch.zeros(channels, dtype=torch.float64)
        self.s1 = torch.zeros(channels, dtype=torch.float64)
        self.s2 = torch.zeros(channels, dtype=torch.float64)

    def add(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """``h`` (B, C, H, W); ``mask`` (B,) or (B, C) bool: which images (channels) count."""
        b, c, hh, ww = h.shape
        w = torch.ones(b, c, dtype=torch.float64) if mask is None else \
            mask.to(torch.float64).expand(b, c) if mask.ndim == 2 else \
            mask.to(torch.float64)[:, None].expand(b, c)
        h = h.double()
        self.n += w.sum(0) * hh * ww
        self.s1 += (w * h.sum((2, 3))).sum(0)
        self.s2 += (w * h.square().sum((2, 3))).sum(0)

    @property
    def valid(self) -> torch.Tensor:
        return self.n > 1

    @property
    def mean(self) -> torch.Tensor:
        return self.s1 / self.n.clamp(min=1)

    @property
    def var(self) -> torch.Tensor:
        """Unbiased, as ``BatchNorm2d.running_var`` keeps it."""
        n = self.n.clamp(min=2)
        return (self.s2 / n - self.mean.square()).clamp(min=0) * n / (n - 1)

    def load_into(self, bn: nn.BatchNorm2d) -> None:
        """Replace ``bn``'s running statistics where this saw at least two values."""
        ok = self.valid
        bn.running_mean[ok] = self.mean[ok].float()
        bn.running_var[ok] = self.var[ok].float()


@dataclass(frozen=True)
class Reestimate:
    """Which activations set each BatchNorm's statistics: ``"all"`` images, the images whose
    block ran (``"ran"``), for bn1 also only the channels that are on (``"on"``); None keeps
    the stored statistics. ``other`` is the stem's BN and the downsample BNs (every image runs
    them)."""
    label: str
    bn1: str | None
    bn2: str | None
    other: str | None = "all"


ALL = Reestimate("all images and channels", "all", "all")
STEM_DOWNSAMPLE = Reestimate("the stem's and the downsample BNs only", None, None, "all")
RAN = Reestimate("images whose block ran (bn1, bn2)", "ran", "ran")
MASKED = Reestimate("images whose block ran, channels that are on (bn1); images whose block "
                    "ran (bn2)", "on", "ran")


# per block: {"bn1": {"all", "ran", "on": Moments}, "bn2": {"all", "ran": Moments}, "ran": share}
BlockMoments = dict


@torch.no_grad()
def walk(model: nn.Module, images: np.ndarray, spec: data.DataSpec, batch_size: int, *,
         update: Reestimate | None = None,
         desc: str = "walk") -> tuple[list[BlockMoments], torch.Tensor]:
    """The masked path of ``GatedBlockMixin.forward``, one layer at a time over every image.

    Returns, per block, the ``Moments`` of bn1's input (conv1's output) over ``"all"``
    images, the images whose block ran (``"ran"``) and those in channels that are on
    (``"on"``), and of bn2's input (conv2's output) over ``"all"`` and ``"ran"``; and the
    logits (N, classes). With ``update``, each BN's running statistics are replaced by the
    moments ``update`` names before any later layer runs (exact population statistics,
    every earlier layer already re-estimated).
    """
    chunks = [spec.to_tensor(np.ascontiguousarray(images[i:i + batch_size]))
              for i in range(0, len(images), batch_size)]
    h = [model.conv1(x) for x in chunks]
    if update is not None and update.other:
        stem = Moments(model.bn1.num_features)
        for t in h:
            stem.add(t)
        stem.load_into(model.bn1)
    xs = [model.maxpool(model.relu(model.bn1(t))) for t in h]
    stats = []
    for block in tqdm(model.blocks, desc=desc, leave=False):
        gates = []
        for x in xs:
            pooled = x.mean((2, 3))                               # (B, C_in)
            gates.append((block.block_gate(pooled), block.channel_gate(pooled)))
        ran = [s_l > 0 for s_l, _ in gates]                       # (B,)
        on = [r[:, None] & (s_c > 0) for r, (_, s_c) in zip(ran, gates)]  # (B, C_mid)
        bn1 = {k: Moments(block.bn1.num_features) for k in ("all", "ran", "on")}
        h1 = [block.conv1(x) for x in xs]
        for t, r, o in zip(h1, ran, on):
            bn1["all"].add(t)
            bn1["ran"].add(t, r)
            bn1["on"].add(t, o)
        if update is not None and update.bn1:
            bn1[update.bn1].load_into(block.bn1)
        identity = xs
        if block.downsample is not None:
            d = [block.downsample[0](x) for x in xs]
            if update is not None and update.other:
                m = Moments(block.downsample[1].num_features)
                for t in d:
                    m.add(t)
                m.load_into(block.downsample[1])
            identity = [block.downsample[1](t) for t in d]
        h2 = [block.conv2(block.relu(block.bn1(t)) * s_c[:, :, None, None])
              for t, (_, s_c) in zip(h1, gates)]
        del h1
        bn2 = {k: Moments(block.bn2.num_features) for k in ("all", "ran")}
        for t, r in zip(h2, ran):
            bn2["all"].add(t)
            bn2["ran"].add(t, r)
        if update is not None and update.bn2:
            bn2[update.bn2].load_into(block.bn2)
        xs = [block.relu(i + s_l[:, None, None, None] * block.residual_tail(block.bn2(t)))
              for i, t, (s_l, _) in zip(identity, h2, gates)]
        stats.append({"bn1": bn1, "bn2": bn2, "ran": float(torch.cat(ran).float().mean())})
    logits = torch.cat([model.forward_head(x) for x in xs])
    return stats, logits


def mismatch(bn: nn.BatchNorm2d, m: Moments) -> str:
    """"|Δmean|/σ / variance ratio" of what ``m`` saw against ``bn``'s stored statistics: the
    mean over channels of |Δmean| / stored std, and the geometric mean over channels of the
    variance seen ÷ stored, over the channels ``m`` saw."""
    ok = m.valid
    if not ok.any():
        return "—"
    var = bn.running_var.double() + bn.eps
    dmean = ((m.mean - bn.running_mean.double()).abs() / var.sqrt())[ok].mean()
    ratio = ((m.var + bn.eps) / var)[ok].log().mean().exp()
    return f"{float(dmean):.2f} / {float(ratio):.3g}"


def reestimate_train_mode(model: nn.Module, images: np.ndarray, labels: np.ndarray,
                          spec: data.DataSpec, batch_size: int) -> nn.Module:
    """PyTorch's recipe on a copy: running statistics reset, every BN in train mode with
    momentum None (a cumulative average over batches), one pass over ``images``; gates stay
    in their inference form (hard)."""
    m = copy.deepcopy(model).eval()
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
    n_batches = -(-len(labels) // batch_size)
    with torch.no_grad():
        for x, _ in tqdm(data.batches(images, labels, batch_size, spec), total=n_batches,
                         desc="train-mode BN pass", leave=False):
            m(x)
    return m.eval()


def reestimate_exact(model: nn.Module, images: np.ndarray, how: Reestimate,
                     spec: data.DataSpec, batch_size: int) -> nn.Module:
    """A copy of ``model`` whose BN statistics ``walk`` replaced as ``how`` says."""
    m = copy.deepcopy(model)
    walk(m, images, spec, batch_size, update=how, desc="exact re-estimate")
    return m.eval()


@dataclass(frozen=True)
class BNImages:
    """Images BatchNorm statistics are estimated on."""
    label: str
    images: np.ndarray     # (N, H, W, 3) uint8
    labels: np.ndarray


def bn_image_sets(dataset: data.Dataset, n: int, seed: int) -> dict[str, BNImages]:
    """``n`` train images drawn at random, as they are (``plain``) and augmented as training
    augments them (``augmented``: random 4-pixel-padded crop, random flip), and the fit half;
    each in a random order. (Split order is class-major: batches of it hold one or two
    classes, and the average of per-batch variances in a train-mode pass then falls short
    of the population's.)"""
    rng = np.random.default_rng(seed)
    train = data.get_split(dataset.spec, "train", dataset)
    fit = data.get_split(dataset.spec, "fit", dataset)
    idx = rng.choice(len(train), min(n, len(train)), replace=False)   # random order
    plain = np.ascontiguousarray(train.images()[idx])
    augmented = data.augment(torch.from_numpy(plain), torch.Generator().manual_seed(seed))
    order = rng.permutation(len(fit))
    return {"plain": BNImages(f"{len(idx)} train images", plain, train.labels[idx]),
            "augmented": BNImages(f"{len(idx)} train images, augmented", augmented.numpy(),
                                  train.labels[idx]),
            "fit": BNImages(f"the {len(fit)} fit images", np.ascontiguousarray(
                fit.images()[order]), fit.labels[order])}


def bn_section(model, resnet56, fit: data.Split, shipped: GatePass, sets: dict[str, BNImages],
               batch_size: int) -> None:
    names = model.block_names()
    fit_images, spec = fit.images(), fit.spec
    stats, logits = walk(model, fit_images, spec, batch_size,
                         desc="moments on fit (hard gates)")
    with torch.no_grad():
        reference = torch.cat([model(x).logits for x, _ in data.batches(fit_images, fit.labels,
                                                                        batch_size, spec)])
    err = float((logits - reference).abs().max() / reference.abs().max())
    if err > 1e-4:
        raise RuntimeError(f"the layer-by-layer walk disagrees with the model (rel. err {err:.1e})")
    augmented = sets["augmented"].images
    hard, _ = walk(model, augmented, spec, batch_size,
                   desc="moments on augmented train (hard gates)")
    set_leaky(model, True)
    replica, _ = walk(model, augmented, spec, batch_size,
                      desc="moments on augmented train (leaky gates)")
    set_leaky(model, False)

    print("Each cell: the mean over channels of |Δmean| / stored σ, then the variance seen ÷ "
          "stored (geometric mean over channels); *runs*: the share of fit images whose block "
          "ran.\n")
    print("### Stored statistics against what the BNs see on the fit half (hard gates)\n")
    rows = []
    for i, name in enumerate(names):
        b, s = model.blocks[i], stats[i]
        rows.append([name, pct(s["ran"], 0),
                     mismatch(b.bn1, s["bn1"]["all"]), mismatch(b.bn1, s["bn1"]["on"]),
                     mismatch(b.bn2, s["bn2"]["all"]), mismatch(b.bn2, s["bn2"]["ran"])])
    print(table(["block", "runs", "bn1: all images", "bn1: block ran, channel on",
                 "bn2: all images", "bn2: block ran"], rows))

    print(f"\n### The same on {sets['augmented'].label} (the distribution the stored "
          "statistics were accumulated on)\n")
    rows = []
    for i, name in enumerate(names):
        b, h, r = model.blocks[i], hard[i], replica[i]
        rows.append([name, pct(stats[i]["ran"], 0),
                     mismatch(b.bn1, r["bn1"]["all"]), mismatch(b.bn1, h["bn1"]["on"]),
                     mismatch(b.bn2, r["bn2"]["all"]), mismatch(b.bn2, h["bn2"]["all"]),
                     mismatch(b.bn2, h["bn2"]["ran"])])
    print(table(["block", "runs", "bn1: all images, leaky gates (training)",
                 "bn1: block ran, channel on (hard)", "bn2: all images, leaky gates (training)",
                 "bn2: all images, hard gates", "bn2: block ran (hard)"], rows))

    rows = []
    for i, name in enumerate(names):
        ran = shipped.ran[:, i]
        on = shipped.channels_on[i]
        if ran.mean() >= ALWAYS or ran.mean() <= NEVER:
            continue
        rows.append([name, pct(ran.mean(), 1), pct(on[ran].mean(), 1),
                     pct((on[ran].sum(1) == 0).mean(), 1), pct(on[~ran].mean(), 1),
                     pct((on[~ran].sum(1) == 0).mean(), 1)])
    print("\n### Channels on (S_C > 0) in image-dependent blocks, by whether the block ran "
          "(fit half)\n")
    print(table(["block", "runs", "channels on when it runs", "runs with every channel off",
                 "channels on when skipped", "skipped with every channel off"], rows))

    r56_stored = gate_pass(resnet56, fit_images, fit.labels, spec, batch_size,
                           "resnet56 on fit")

    def row(system: str, label: str, images: str, p: GatePass, stored: GatePass) -> list:
        gap = p.accuracy - stored.accuracy
        se = operating_points.paired_se(p.correct, stored.correct)
        cells = [system, label, images, pct(p.accuracy), f"{100 * gap:+.2f} ± {100 * se:.2f}"]
        if p.ran.size == 0:
            return cells + [mega(p.macs.mean()), "—", "—"]
        changed = (p.ran != shipped.ran).any(1)
        return cells + [mega(p.macs.mean()), pct(float((p.ran != shipped.ran).mean()), 1),
                        f"{changed.sum()}: {pct(p.correct[changed].mean(), 1)} "
                        f"({pct(shipped.correct[changed].mean(), 1)})" if changed.any() else "0"]

    def evaluate(m, desc="eval on fit") -> GatePass:
        return gate_pass(m, fit_images, fit.labels, spec, batch_size, desc)

    lc, r56 = "LC-Net", "resnet56"
    torch_pass = "PyTorch train-mode pass, momentum None"
    rows = [row(lc, "stored, hard gates (shipped)", "—", shipped, shipped)]
    set_leaky(model, True)
    rows.append(row(lc, "stored, leaky gates (training-time)", "—", evaluate(model), shipped))
    set_leaky(model, False)
    rows.append(row(r56, "stored", "—", r56_stored, r56_stored))
    for key in ("plain", "fit", "augmented"):
        images = sets[key]
        rows.append(row(lc, torch_pass, images.label, evaluate(
            reestimate_train_mode(model, images.images, images.labels, spec, batch_size)),
            shipped))
        if key != "fit":
            rows.append(row(r56, torch_pass, images.label, evaluate(
                reestimate_train_mode(resnet56, images.images, images.labels, spec,
                                      batch_size),
                "resnet56 on fit"), r56_stored))
    for key, hows in (("plain", (ALL, STEM_DOWNSAMPLE, MASKED)), ("augmented", (ALL, RAN, MASKED))):
        for how in hows:
            m = reestimate_exact(model, sets[key].images, how, spec, batch_size)
            rows.append(row(lc, f"exact: {how.label}", sets[key].label, evaluate(m), shipped))
    print("\n### BatchNorm re-estimated, judged on the fit half\n")
    print("Δ: against the same network's stored statistics, ± one paired standard error. "
          "Gates hard in every re-estimate. The last column: images for which some block "
          "decision differs from the shipped model's, and the accuracy on them (the shipped "
          "model's in brackets).\n")
    print(table(["network", "BN statistics", "estimated on", "fit accuracy", "Δ (points)",
                 "MACs (M)", "block decisions changed", "images with a changed decision"],
                rows))


# ---------------------------------------------------------------------------- epochs
def git_manifest(commit: str, name: str) -> dict | None:
    try:
        text = subprocess.run(["git", "show", f"{commit}:models/checkpoints/{name}.json"],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return json.loads(text)


def one_cycle_lr(epochs: int, steps_per_epoch: int, warmup: float) -> list[float]:
    """LR (÷ peak) at the end of every epoch under ``train.fit``'s one-cycle schedule."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1.0, total_steps=epochs * steps_per_epoch, pct_start=warmup,
        div_factor=10.0, final_div_factor=100.0)
    out = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            opt.step()
            sched.step()
        out.append(opt.param_groups[0]["lr"])
    return out


def epochs_section(ws: Workspace, fit_frontier, train_images: int) -> None:
    shipped = json.loads((ws.checkpoints / f"{CHECKPOINT}.json").read_text())
    recipe, history = shipped["recipe"], shipped["history"]
    steps = train_images // recipe["batch_size"]
    lrs = one_cycle_lr(recipe["epochs"], steps, recipe["warmup"])
    print(f"### {CHECKPOINT}: every epoch (validation = all 5 000 val images, hard gates)\n")
    rows = [[h["epoch"], f"{lr:.3f}", f"{h['train_loss']:.3f}", pct(h["val_accuracy"]),
             mega(h["val_macs"])] for h, lr in zip(history, lrs)]
    print(table(["epoch", "LR at its end (÷ peak)", "train loss", "val accuracy", "val MACs (M)"],
                rows))

    runs = []
    for label, commit, name in GIT_RUNS:
        manifest = git_manifest(commit, name)
        if manifest is not None:
            runs.append((label, manifest))
    runs.append(("**_kd16 (shipped)**", shipped))
    print("\n### Every LC-Net run on resnet56 with a manifest (val = all 5 000 images)\n")
    rows = []
    for label, m in runs:
        h = m["history"]
        acc = [e["val_accuracy"] for e in h]
        macs = [e["val_macs"] for e in h]
        n = len(h)
        q = max(1, n // 4)
        fit = m["metrics"]["fit"]
        gap = fit["accuracy"] - fit_frontier(fit["macs_mean"])
        r = m["recipe"]
        rows.append([label, n, f"α {r['l1_block']}, β {r['l1_channel']}"
                     + (", KD" if r.get("teacher") else ""),
                     pct(acc[n // 2 - 1], 1), pct(acc[-q - 1], 1), pct(acc[-1], 1),
                     f"{100 * (acc[-1] - acc[-q - 1]):+.2f}",
                     f"{mega(min(macs))} → {mega(macs[-1])}",
                     f"{pct(fit['accuracy'])} at {mega(fit['macs_mean'])} M",
                     f"{100 * gap:+.2f}"])
    for label, n, pull, acc, macs in DOC_RUNS:
        rows.append([label, n, pull, "—", "—", "—", "—", "—",
                     f"{pct(acc)} at {mega(macs)} M", f"{100 * (acc - fit_frontier(macs)):+.2f}"])
    print(table(["run", "epochs", "pull", "val acc at half", "val acc a quarter before the end",
                 "val acc at the end", "last quarter (points)", "val MACs: lowest → end",
                 "fit", "fit − static log-MAC interpolation (points)"], rows))


# ---------------------------------------------------------------------------- frontier
@dataclass(frozen=True)
class Half:
    correct: dict[str, np.ndarray]   # system -> (N,) bool
    macs: dict[str, float]           # system -> mean MACs


def load_lcnet(ws: Workspace, checkpoint: Path | None) -> nn.Module:
    """The shipped LC-Net, or the same system with a training run's state dict, in eval
    mode on the CPU."""
    model = zoo.load_system(ws, SYSTEM, torch.device("cpu"))
    if checkpoint is not None:
        zoo.load_weights(model, checkpoint)
    return model


def halves(ws: Workspace, candidate: nn.Module | None = None) -> dict[str, Half]:
    """Per image correct and mean MACs of the static networks and LC-Net on fit and check,
    from the shipped caches; LC-Net's by running ``candidate`` when given (``load_lcnet``
    with a training run's checkpoint)."""
    val = ws.split("val")
    out = {"fit": Half({}, {}), "check": Half({}, {})}
    for name in ("resnet8", "resnet20", "resnet56", SYSTEM):
        if name == SYSTEM and candidate is not None:
            model = candidate
            for half in out:
                split = ws.split(half, val.dataset)
                arrays = cache.compute_outputs(model, split.images(), ws.data,
                                               device=torch.device("cpu"))
                out[half].correct[name] = arrays["logits"][:, -1].argmax(-1) == split.labels
                out[half].macs[name] = float(arrays["stage_macs"].sum(1).mean())
            continue
        cached = zoo.outputs(ws, name, val)
        for half in out:
            s = cached.half(half)
            out[half].correct[name] = s.correct[:, -1]
            out[half].macs[name] = float(s.stage_costs.sum(1).mean())
    return out


def log_weight(m: float, lo: float, hi: float) -> float:
    """Where ``m`` MACs lies between ``lo`` and ``hi`` in log-MACs (0 at lo, 1 at hi)."""
    return math.log(m / lo) / math.log(hi / lo)


def frontier_fn(h: Half):
    """Static accuracy at MACs m: log-MAC interpolation between resnet20 and resnet56."""
    a20, a56 = h.correct["resnet20"].mean(), h.correct["resnet56"].mean()

    def at(m: float) -> float:
        return a20 + log_weight(m, h.macs["resnet20"], h.macs["resnet56"]) * (a56 - a20)
    return at


def frontier_section(ws: Workspace, hs: dict[str, Half], candidate: Path | None) -> None:
    shipped = json.loads((ws.results / "results.json").read_text())
    results = {r["system"]: r for r in shipped if r["operating_point"] == "trained"}
    print("### The systems (shipped caches; check figures equal assets/results.json)\n")
    if candidate is not None:
        print(f"{SYSTEM}: the candidate {candidate.name}, not the shipped checkpoint.\n")
    rows = []
    for name in ("resnet8", "resnet20", "resnet56", SYSTEM):
        fit, check = hs["fit"], hs["check"]
        same = (abs(results[name]["accuracy"] - check.correct[name].mean()) < 1e-9
                or (name == SYSTEM and candidate is not None))
        rows.append([name, pct(fit.correct[name].mean()), mega(fit.macs[name]),
                     pct(check.correct[name].mean()) + ("" if same else " (≠ results.json)"),
                     mega(check.macs[name])])
    print(table(["system", "fit", "fit MACs (M)", "check", "check MACs (M)"], rows))

    print(f"\n### {SYSTEM} against the static networks at its own MACs\n")
    rows = []
    for half, h in hs.items():
        m = h.macs[SYSTEM]
        lo, hi = h.macs["resnet20"], h.macs["resnet56"]
        c20, c56 = h.correct["resnet20"].astype(float), h.correct["resnet56"].astype(float)
        lc = h.correct[SYSTEM]
        w_log = log_weight(m, lo, hi)
        w_lin = (m - lo) / (hi - lo)
        for label, w in (("log-MAC interpolation", w_log),
                         ("linear-MAC mix (run resnet56 on a share w of images)", w_lin)):
            static = (1 - w) * c20 + w * c56                      # (N,) per image
            gap = lc.mean() - static.mean()
            se = operating_points.paired_se(lc.astype(float), static)
            rows.append([half, label, f"{w:.3f}", pct(static.mean()), pct(lc.mean()),
                         f"{100 * gap:+.2f} ± {100 * se:.2f}", f"{gap / se:+.1f}",
                         pct(static.mean() + se)])
        se20 = operating_points.paired_se(lc.astype(float), c20)
        rows.append([half, "resnet20 alone (fewer MACs)", "0", pct(c20.mean()), pct(lc.mean()),
                     f"{100 * (lc.mean() - c20.mean()):+.2f} ± {100 * se20:.2f}",
                     f"{(lc.mean() - c20.mean()) / se20:+.1f}", "—"])
    print(table(["half", "static reference", "w (share of resnet56)", "static accuracy",
                 "LC-Net", "gap ± paired SE (points)", "gap / SE",
                 "LC-Net needs (static + 1 SE)"], rows))

    # the MACs at which a static network reaches LC-Net's accuracy (log-MAC, piecewise)
    print()
    for half, h in hs.items():
        acc = h.correct[SYSTEM].mean()
        chain = [(h.macs[n], h.correct[n].mean()) for n in ("resnet8", "resnet20", "resnet56")]
        for (m0, a0), (m1, a1) in zip(chain[:-1], chain[1:]):
            if a0 <= acc <= a1:
                t = (acc - a0) / (a1 - a0)
                equal = m0 * (m1 / m0) ** t
                print(f"- {half}: the static networks reach LC-Net's {pct(acc)} at "
                      f"{mega(equal)} M MACs (log-MAC interpolation between resnet8/20/56); "
                      f"LC-Net spends {mega(h.macs[SYSTEM])} M.")
                break


# ---------------------------------------------------------------------------- soft
@torch.no_grad()
def soft_section(model: nn.Module, fit: data.Split, batch_size: int) -> None:
    """The gates in their training form (leaky ReLU-1, BN in eval mode) against their
    inference form on fit: accuracy, and what the leaky gates do where the hard ones skip."""
    hard = gate_pass(model, fit.images(), fit.labels, fit.spec, batch_size, "hard gates")
    counted = []            # what the MAC hinge counts, min(1, max(0, s)/ε), inference gates
    for x, _ in data.batches(fit.images(), fit.labels, batch_size, fit.spec):
        trace = model(x).trace
        on = lambda v: torch.clamp(v / HINGE_EPS, 0, 1)       # noqa: E731
        counted.append(trace.cost.expected_macs(
            on(trace.block_scores), [on(c) for c in trace.channel_scores]).numpy())
    print(f"MACs on fit: {mega(hard.macs.mean())} M spent; "
          f"{mega(np.concatenate(counted).mean())} M as the hinge counts them "
          f"(ε = {HINGE_EPS}).\n")
    set_leaky(model, True)
    leaky_scores, correct = [], []
    try:
        for x, y in data.batches(fit.images(), fit.labels, batch_size, fit.spec):
            out = model(x)
            correct.append((out.logits.argmax(1) == y).numpy())
            leaky_scores.append(out.trace.block_scores.numpy())
    finally:
        set_leaky(model, False)
    scores = np.concatenate(leaky_scores)                    # (N, n_blocks) S_L, leaky
    skipped = ~hard.ran
    negative = scores < 0
    print(table(["gates", "fit accuracy", "blocks skipped (image × block)",
                 "of those, leaky S_L < 0", "mean leaky S_L there"],
                [["inference (clamp to [0, 1])", pct(hard.accuracy), pct(skipped.mean(), 1),
                  "—", "—"],
                 ["training (leaky ReLU-1)", pct(float(np.concatenate(correct).mean())), "—",
                  pct(negative[skipped].mean(), 1) if skipped.any() else "—",
                  f"{scores[skipped & negative].mean():.3f}" if (skipped & negative).any()
                  else "—"]]))


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help=f"any of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--bn-images", type=int, default=5000,
                        help="train images BatchNorm statistics are re-estimated on, drawn at "
                             "random; used as they are and augmented as in training (5000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of that draw (0)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--checkpoint", type=Path, metavar="PT",
                        help=f"this {SYSTEM} state dict (a training run's .pt) in place of "
                             "the shipped checkpoint, in every section but epochs")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    sections = args.sections or list(SECTIONS)
    torch.set_num_threads(args.threads)

    ws = workspace.builtin()
    dataset = ws.dataset()
    fit = ws.split("fit", dataset)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    model = load_lcnet(ws, args.checkpoint)
    hs = None
    if {"gates", "epochs", "frontier"} & set(sections):
        hs = halves(ws, model if args.checkpoint is not None else None)
    shipped = None
    if "gates" in sections:
        print("## Gates\n")
        shipped = gates_section(model, fit, hs["fit"].correct, args.batch_size)
        print()
    if "bn" in sections:
        print("## BatchNorm\n")
        if shipped is None:
            shipped = gate_pass(model, fit.images(), fit.labels, fit.spec, args.batch_size,
                                "gates on fit")
        resnet56 = zoo.load_system(ws, "resnet56", torch.device("cpu"))
        bn_section(model, resnet56, fit, shipped, bn_image_sets(dataset, args.bn_images, args.seed),
                   args.batch_size)
        print()
    if "soft" in sections:
        print("## Training-form gates against inference-form gates\n")
        soft_section(model, fit, args.batch_size)
        print()
    if "epochs" in sections:
        print("## Accuracy against epochs\n")
        epochs_section(ws, frontier_fn(hs["fit"]), len(ws.split("train", dataset)))
        print()
    if "frontier" in sections:
        print("## The static frontier\n")
        frontier_section(ws, hs, args.checkpoint)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
