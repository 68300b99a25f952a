"""Benchmarks (scripts, not tests): measured wall-clock of the sparse executor against the
plain dense network with the same weights."""
from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

import models
from models import native
from dynviz import data, engine, settings, zoo
from models.lcnet import GatedResNet, SparsePlan
from models.macs import linear_macs
from models.resnet import FrozenBlock, InferenceConv, ResNet

log = logging.getLogger(__name__)


@torch.no_grad()
def set_gate_pattern(model: GatedResNet, x: torch.Tensor, blocks_off: float,
                     channels_off: float, seed: int = 0, same_channels: bool = False) -> None:
    """Rewrite every gate so that, on the images ``x``, each block is skipped by a fraction
    ``blocks_off`` of them and each channel is off for ``channels_off`` of them, in random
    per-image patterns (``same_channels``: one random set of channels per block, shared by
    every image, is off instead).

    Each gate output's pre-activation becomes ``k·(u − t)``: ``u`` a random projection of the
    pooled block input (different for every image), ``t`` the midpoint between the order
    statistics of ``u`` over ``x`` that leaves exactly the requested share below it; the
    large ``k`` saturates scores to 0 or 1.
    """
    g = torch.Generator().manual_seed(seed)
    k = 50.0
    h = model.forward_stem(x)
    for block in model.blocks:
        pooled = h.mean((2, 3))                                   # (B, C_in)
        for gate, p_off in ((block.block_gate, blocks_off), (block.channel_gate, channels_off)):
            fc = gate.fc
            w = torch.randn(fc.weight.shape, generator=g).to(fc.weight)
            u = pooled @ w.T                                      # (B, out)
            scale = u.std(0).clamp_min(1e-12)
            cut = _cut(u, p_off)                                  # (out,)
            fc.weight.copy_(k * w / scale[:, None])
            fc.bias.copy_(-k * cut / scale)
        if same_channels:
            fc = block.channel_gate.fc
            n_off = round(channels_off * fc.out_features)
            off = torch.randperm(fc.out_features, generator=g)[:n_off]
            fc.weight.zero_()
            fc.bias.fill_(k).index_fill_(0, off, -k)
        h, _ = block(h)


def _cut(u: torch.Tensor, p_off: float) -> torch.Tensor:
    """Per column of ``u`` (B, out), a value with round(p_off·B) entries below it and the
    rest above: the midpoint of the two order statistics around it; none or all below:
    one standard deviation beyond the extreme (a margin no rounding difference crosses)."""
    n = u.shape[0]
    n_off = min(max(round(p_off * n), 0), n)
    ordered = u.sort(0).values
    spread = u.std(0).clamp_min(1e-12) if n > 1 else torch.ones_like(ordered[0])
    if n_off == 0:
        return ordered[0] - spread
    if n_off == n:
        return ordered[-1] + spread
    return (ordered[n_off - 1] + ordered[n_off]) / 2


class _Gathered(NamedTuple):
    """Parallel placement: conv1 computes every output (beside the gates); keep ``channels``."""
    conv: InferenceConv
    channels: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)[:, self.channels]


class _Skipped(NamedTuple):
    """A skipped block: the shortcut, as the sparse path returns it."""
    downsample: InferenceConv | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x).relu_()


def static_cut(model: GatedResNet, scores: list[torch.Tensor]) -> Callable[[torch.Tensor],
                                                                         torch.Tensor]:
    """The plain network that one gate pattern leaves of ``model`` (BN folded, frozen):
    skipped blocks removed, off channels cut out of the weights, S_C and S_L folded into the
    convs that read them, each block run as a plain network's ``FrozenBlock``. ``scores``: a
    trace's per-block (1, 1 + C_mid) scores of one image (or of a batch whose rows are all
    equal).

    It computes what the gated model computes for that pattern, with no gates, no decisions
    and no slicing at run time: a floor under the time any executor of the pattern can take
    with the same dense kernels.
    """
    blocks = []
    for block, s in zip(model.blocks, scores):
        ops = block.inference_block()
        s_l, s_c = float(s[0, 0]), s[0, 1:]
        if s_l == 0:
            blocks.append(_Skipped(ops.downsample))
            continue
        on = s_c.nonzero().squeeze(1)
        if on.numel() == 0:          # keep one channel, scaled to 0: conv2 still adds its bias
            on = s_c.new_zeros(1, dtype=torch.long)
        if ops.sequential:
            conv1 = ops.conv1.restrict(out_ch=on)
        else:
            conv1 = _Gathered(ops.conv1, on) if on.numel() < ops.mid_channels else ops.conv1
        conv2, conv3 = ops.conv2.restrict(in_ch=on, scale=s_c[on]), ops.conv3
        if conv3 is None:            # S_L scales the branch's last conv
            conv2 = conv2.restrict(scale=s_l)
        else:
            conv3 = conv3.restrict(scale=s_l)
        blocks.append(FrozenBlock(conv1, conv2, conv3, ops.downsample))
    module = model.__dict__.get("_native_module")
    runner = None if module is None else native.blocks(module, map(_native_spec, blocks))

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = model.forward_stem(x)
        if runner is not None and native.accepts(x):    # as the gated model runs
            x = runner.plain(x, 0, len(blocks))
        else:
            for block in blocks:
                x = block(x)
        return model.forward_head(x)
    return forward


def _native_spec(block: FrozenBlock | _Skipped):
    if isinstance(block, _Skipped):
        return native.block_spec(None, None, None, block.downsample)
    conv1, gather = block.conv1, None
    if isinstance(conv1, _Gathered):
        conv1, gather = conv1.conv, conv1.channels
    return native.block_spec(conv1, block.conv2, block.conv3, block.downsample, gather=gather)


@dataclass
class GatedBenchRow:
    model: str
    placement: str
    batch: int
    blocks_off: float         # measured on the timed images: blocks with S_L = 0
    channels_off: float       # channels with S_C = 0, over the blocks that ran
    same_channels: bool
    runner: str               # native: frozen blocks run from C++ (both networks); python
    macs_dense: int
    macs_sparse: float        # mean traced MACs per image
    mac_reduction: float      # 1 - sparse / dense
    ms_dense: float           # plain ResNet, per batch (BN folded, like the gated model)
    ms_masked: float          # gated model, masked path
    ms_sparse: float          # gated model, sparse path with the calibrated plan
    time_reduction: float     # 1 - 1 / speedup
    speedup: float            # dense / sparse: median over rounds of the paired ratio
    efficiency: float         # time_reduction / mac_reduction
    ms_static: float          # each image's static_cut (nan: a batch's images differ)
    speedup_static: float     # dense / static: the ceiling for these patterns


def _inputs(model: GatedResNet, n: int, seed: int) -> torch.Tensor:
    """Images whose pooled features differ per image: noise plus a per-image colour shift."""
    g = torch.Generator().manual_seed(seed)
    size = model.cfg.input_size
    return torch.randn(n, 3, size, size, generator=g) + torch.randn(n, 3, 1, 1, generator=g)


def _validation_images(n: int, size: int) -> torch.Tensor | None:
    """The first ``n`` validation images as the models see them; None without the data or
    when the model takes another input size."""
    try:
        images = data.get_split("val").images()
    except data.DatasetNotFoundError:
        return None
    if images.shape[1] != size:
        return None
    return data.to_tensor(np.ascontiguousarray(images[:n]))


def bench_gated(name: str = "lcnet_resnet56", *, placement: str = "sequential",
                blocks_off: float = 0.5, channels_off: float = 0.0,
                batch_sizes: tuple[int, ...] = (1, 256), repeats: int = 10,
                checkpoint: str | None = None, calibrate: bool = True,
                same_channels: bool = False, seed: int = 0,
                use_native: bool | None = None) -> list[GatedBenchRow]:
    """Time dense vs masked vs sparse for a gated model with a chosen gate sparsity.

    Batch 1 is timed over 32 different images (each its own pattern), larger batches over
    one batch; both as medians of ``repeats`` after warm-up. ``checkpoint`` loads trained
    weights and keeps their gates (``blocks_off``/``channels_off`` are then ignored); the
    images are then CIFAR-10 validation images, as trained gates decide on real inputs.
    ``use_native``: both networks' frozen blocks, and the sparse path, run from C++
    (``engine.fold_batchnorm``; None: when the runner can be built).
    """
    device = settings.device()
    with torch.random.fork_rng(devices=[]):   # the same random weights, hence patterns,
        torch.manual_seed(seed)              # in either placement
        gated = models.create(name, placement=placement).eval()
    if checkpoint:
        state = torch.load(settings.checkpoint_dir() / f"{checkpoint}.pt", map_location="cpu",
                           weights_only=True)
        gated.load_state_dict(state)
    plain = models.create(name.removeprefix("lcnet_")).eval()
    plain.load_state_dict(gated.state_dict(), strict=False)
    n_images = max(max(batch_sizes), 256)
    pool = _validation_images(n_images, gated.cfg.input_size) if checkpoint else None
    if pool is None:
        if checkpoint:
            log.warning("no CIFAR-10 validation images: timing trained gates on noise")
        pool = _inputs(gated, n_images, seed)
    pool = pool.to(device).contiguous(memory_format=torch.channels_last)
    if not checkpoint:
        set_gate_pattern(gated, pool[:256], blocks_off, channels_off, seed, same_channels)
    gated = engine.fold_batchnorm(gated, use_native=use_native).to(
        device, memory_format=torch.channels_last)
    plain = engine.fold_batchnorm(plain, use_native=use_native).to(
        device, memory_format=torch.channels_last)
    runner = "native" if "_native" in gated.__dict__ else "python"

    rows = []
    for batch in batch_sizes:
        plan = engine.calibrate(gated, batch) if calibrate else SparsePlan(1.0)
        chunks = [pool[i:i + 1] for i in range(32)] if batch == 1 else [pool[:batch]]
        with torch.no_grad():
            traces = [gated(c)[1] for c in chunks]
            macs = torch.cat([t.macs for t in traces]).double().mean().item()
            off_blocks, off_channels = _measured_sparsity(traces)

            fns = {"dense": lambda: [plain(c) for c in chunks],
                   "masked": lambda: [gated(c) for c in chunks],
                   "sparse": lambda: [gated(c, plan) for c in chunks]}
            patterns = [_one_pattern(t) for t in traces]
            if all(p is not None for p in patterns):
                cuts = [static_cut(gated, p) for p in patterns]
                fns["static"] = lambda: [cut(c) for cut, c in zip(cuts, chunks)]
            times = engine.round_robin_times(fns, repeats=repeats, device=device)
        ms = {k: statistics.median(t) * 1e3 / len(chunks) for k, t in times.items()}
        speedup = engine.paired_ratio(times["dense"], times["sparse"])
        static = engine.paired_ratio(times["dense"], times["static"]) if "static" in times \
            else float("nan")
        dense_macs = plain.macs()
        mac_red = 1 - macs / dense_macs
        time_red = 1 - 1 / speedup
        rows.append(GatedBenchRow(
            name, placement, batch, off_blocks, off_channels, same_channels, runner, dense_macs,
            round(macs),
            round(mac_red, 4), round(ms["dense"], 3), round(ms["masked"], 3),
            round(ms["sparse"], 3), round(time_red, 4), round(speedup, 3),
            round(time_red / mac_red, 3) if mac_red > 0 else float("nan"),
            round(ms.get("static", float("nan")), 3), round(static, 3)))
        log.info("%s", rows[-1])
    return rows


def _one_pattern(trace) -> list[torch.Tensor] | None:
    """The first image's scores if every image of the trace has the same (one static cut
    computes them all), else None."""
    if all(torch.equal(s, s[:1].expand_as(s)) for s in trace.scores):
        return [s[:1] for s in trace.scores]
    return None


def _measured_sparsity(traces: list) -> tuple[float, float]:
    """Fractions of blocks off, and of channels off inside the blocks that ran."""
    s_l = torch.cat([t.block_scores for t in traces])                       # (N, blocks)
    s_c = [torch.cat([t.channel_scores[i] for t in traces]) for i in range(s_l.shape[1])]
    ran = s_l > 0
    off = sum(float(((c == 0).float().mean(1) * ran[:, i]).sum()) for i, c in enumerate(s_c))
    return (round(float((~ran).float().mean()), 3),
            round(off / max(float(ran.sum()), 1.0), 3))


def format_rows(rows: list) -> str:
    """A Markdown table of dataclass rows."""
    dicts = [asdict(r) for r in rows]
    head = list(dicts[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in dicts:
        lines.append("| " + " | ".join(_fmt(d[k]) for k in head) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, np.integer)) and value > 10**6:
        return f"{value / 1e6:.1f}M"
    return str(value)


@dataclass
class PolicyBenchRow:
    task: str
    n_images: int
    n_stages: int
    ms_median: float


def _synthetic_outputs(n: int, k: int, seed: int = 0):
    """Stages of growing accuracy and cost, confidence tracking correctness."""
    from dynviz.policy import StageOutputs

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    difficulty = rng.random(n)
    logits = rng.normal(0, 1, (n, k, 10))
    for stage in range(k):
        knows = difficulty < 0.45 + 0.5 * (stage + 1) / k
        logits[np.arange(n), stage, labels] += np.where(knows, 3.0 + 2 * rng.random(n), 0.0)
    costs = np.tile(2.0 ** np.arange(k), (n, 1))
    return StageOutputs(logits.astype(np.float32), labels, costs, costs[:, -1].copy())


def bench_policy(n: int = 2500, k: int = 3, repeats: int = 20,
                 outputs=None) -> list[PolicyBenchRow]:
    """Refit and sweep times of the policy learner (features precomputed, as in the app)."""
    from dynviz import learn

    out = outputs if outputs is not None else _synthetic_outputs(n, k)
    _ = out.features, out.correct, out.cumulative_costs      # cached once, like the app
    tasks = {
        "fit threshold": lambda: learn.fit(out, 0.3, "threshold"),
        "fit linear": lambda: learn.fit(out, 0.3, "linear"),
        "fit threshold, jump topology": lambda: learn.fit(out, 0.3, "threshold",
                                                          topology="jump"),
        "target_budget threshold (bisection)": lambda: learn.target_budget(out, 0.25),
        "sweep 50 points threshold": lambda: learn.sweep(out, 50),
        "sweep 50 points linear": lambda: learn.sweep(out, 50, "linear"),
    }
    return [PolicyBenchRow(name, len(out), out.n_stages,
                           round(engine.median_time(fn, repeats=repeats) * 1e3, 2))
            for name, fn in tasks.items()]


# ---------------------------------------------------------------------------- staged systems
@dataclass
class StagedBenchRow:
    system: str
    leaves_at: str         # the stage whose answer the images take ("+jump": sent there)
    images: int
    mac_ratio: float       # mean MACs spent / the dense network's
    ms_dense: float        # per image, the dense network (BN folded)
    ms_stages: float       # per image, the stages it ran back to back: the network work
    ms_dynamic: float      # per image, the system under its policy (decisions, trace)
    ms_deciding: float     # per image, dynamic - stages: what deciding costs
    speedup: float         # dense / dynamic


def _replay(system: nn.Module, x: torch.Tensor, decisions: np.ndarray, jumped: bool) -> None:
    """The stages one image ran under its policy, without deciding anything."""
    from dynviz.adaptive import NOT_REACHED

    state = system.begin(x)
    for k in np.flatnonzero(decisions != NOT_REACHED):
        _, state, _ = system.run_stage(int(k), state)
    if jumped:
        system.run_stage(system.n_stages - 1, state)


@torch.no_grad()
def bench_staged(name: str = "exits_resnet56", *, loss: float = 0.005, n_images: int = 64,
                 repeats: int = 9) -> list[StagedBenchRow]:
    """Where a staged system's batch-1 time goes, by the stage its images leave at: the dense
    network, the stages the images ran (network work only) and the system under its shipped
    ``loss`` operating point, on the first ``n_images`` check images one at a time.

    Every group's three contenders run in one round-robin, so round ``r`` of every group is
    one pass over all the images; ``ms_*`` are medians over rounds, ``ms_deciding`` and
    ``speedup`` medians of the per-round difference and ratio (``engine.paired_ratio``), and
    the ``all`` row does the same with each round's totals over the groups.
    """
    from dynviz import inspect, operating_points

    staged = zoo.staged(list(zoo.SYSTEMS))
    if name not in staged:
        raise ValueError(f"{name} is not a staged system; choose from {', '.join(staged)}")
    policy = operating_points.load_policy(name, loss)
    if policy is None:
        raise FileNotFoundError(f"no shipped ≤{loss * 100:g}% policy for {name}; run "
                                "`python -m dynviz policies`")
    runner = inspect.build_runner(name, policy)
    system = runner.model
    images = data.get_split("check").images()[:n_images]
    xs = [data.to_tensor(np.ascontiguousarray(images[i:i + 1]), runner.device)
          for i in range(len(images))]
    traces = [runner.forward(x)[1] for x in xs]
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(traces):
        label = t.stage_names[t.exit_stage[0]] + ("+jump" if t.jumped[0] else "")
        groups.setdefault(label, []).append(i)
    order = sorted(groups, key=lambda g: (int(traces[groups[g][0]].exit_stage[0]), g))
    fns = {}
    for label in order:
        members = groups[label]
        fns[label, "dense"] = lambda m=members: [runner.dense(xs[i]) for i in m]
        fns[label, "stages"] = lambda m=members: [
            _replay(system, xs[i], traces[i].decisions[0], bool(traces[i].jumped[0])) for i in m]
        fns[label, "dynamic"] = lambda m=members: [runner.forward(xs[i]) for i in m]
    times = engine.round_robin_times(fns, repeats=repeats, device=runner.device)
    dense_macs = runner.dense.macs()
    rows = []
    for label, labels in [(g, [g]) for g in order] + [("all", order)]:
        members = [i for g in labels for i in groups[g]]
        rounds = {part: np.sum([times[g, part] for g in labels], 0)
                  for part in ("dense", "stages", "dynamic")}
        macs = float(np.mean([traces[i].macs[0] for i in members]))
        n = len(members)
        ms = {part: statistics.median(t) * 1e3 / n for part, t in rounds.items()}
        rows.append(StagedBenchRow(
            name, label, n, round(macs / dense_macs, 3), round(ms["dense"], 3),
            round(ms["stages"], 3), round(ms["dynamic"], 3),
            round(statistics.median(rounds["dynamic"] - rounds["stages"]) * 1e3 / n, 3),
            round(engine.paired_ratio(list(rounds["dense"]), list(rounds["dynamic"])), 3)))
    return rows


# ---------------------------------------------------------------------------- stages
@dataclass
class StageBenchRow:
    model: str
    batch: int
    part: str
    macs: int
    mac_share: float
    ms: float              # median per batch
    time_share: float
    time_per_mac: float    # time share / MAC share: > 1 costs more time than its MACs say


def network_parts(model: nn.Module) -> list[tuple[str, int, Callable]]:
    """A plain ResNet cut into stem, its stages and head: (name, MACs per image, function
    from the previous part's output to this part's)."""
    if not isinstance(model, ResNet) or isinstance(model, GatedResNet):
        raise TypeError(f"bench stages needs a plain ResNet, not {type(model).__name__}")
    stem, _ = model.stem_cost()
    tables = model.block_costs()
    parts = [("stem", sum(stem.values()), model.forward_stem)]
    start = 0
    for name in model.stage_names:
        stop = start + len(getattr(model, name))
        parts.append((name, sum(sum(t.values()) for t in tables[start:stop]),
                      lambda x, a=start, b=stop: model.forward_blocks(x, a, b)))
        start = stop
    parts.append(("head", linear_macs(model.fc), model.forward_head))
    return parts


@torch.no_grad()
def bench_stages(name: str = "resnet56", *, batch_sizes: tuple[int, ...] = (1, 256),
                 repeats: int = 10) -> list[StageBenchRow]:
    """Where the time of a plain ResNet goes, stage by stage, against where its MACs go
    (random weights, BN folded, channels_last: timing does not depend on the weights)."""
    device = settings.device()
    model = engine.fold_batchnorm(models.create(name).eval()).to(
        device, memory_format=torch.channels_last)
    parts = network_parts(model)
    total_macs = sum(macs for _, macs, _ in parts)
    size = model.cfg.input_size
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, 3, size, size, device=device).contiguous(
            memory_format=torch.channels_last)
        inputs = [x]
        for _, _, fn in parts[:-1]:
            inputs.append(fn(inputs[-1]))
        fns = {part: (lambda fn=fn, h=h: fn(h)) for (part, _, fn), h in zip(parts, inputs)}
        times = engine.compare_times(fns, repeats=repeats, device=device)
        total_time = sum(times.values())
        for part, macs, _ in parts:
            mac_share, time_share = macs / total_macs, times[part] / total_time
            rows.append(StageBenchRow(name, batch, part, macs, round(mac_share, 4),
                                      round(times[part] * 1e3, 3), round(time_share, 4),
                                      round(time_share / mac_share, 2)))
    return rows
