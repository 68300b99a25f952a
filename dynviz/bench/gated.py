"""Benchmark: the gated sparse path against the plain network with the same weights, the
masked path, and the static cut of each gate pattern."""
from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

import models
from dynviz import data, runtime, settings, zoo
from dynviz.runtime import native
from dynviz.runtime.folded import FoldedBlock, FoldedConv
from dynviz.runtime.sparse import FoldedGatedResNet, SparsePlan
from dynviz.workspace import Workspace, model_kind
from models.lcnet import GatedResNet

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
            threshold = _threshold(u, p_off)                      # (out,)
            fc.weight.copy_(k * w / scale[:, None])
            fc.bias.copy_(-k * threshold / scale)
        if same_channels:
            fc = block.channel_gate.fc
            n_off = round(channels_off * fc.out_features)
            off = torch.randperm(fc.out_features, generator=g)[:n_off]
            fc.weight.zero_()
            fc.bias.fill_(k).index_fill_(0, off, -k)
        h, _ = block(h)


def _threshold(u: torch.Tensor, p_off: float) -> torch.Tensor:
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
    conv: FoldedConv
    channels: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)[:, self.channels]


class _Skipped(NamedTuple):
    """A skipped block: the shortcut, as the sparse path returns it."""
    downsample: FoldedConv | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x).relu_()


def static_cut(model: FoldedGatedResNet, scores: list[torch.Tensor]) -> Callable[[torch.Tensor],
                                                                         torch.Tensor]:
    """The plain network that one gate pattern leaves of ``model``: skipped blocks removed,
    off channels cut out of the weights, S_C and S_L folded into the convs that read them,
    each block run as a plain network's ``FoldedBlock``. ``scores``: a
    trace's per-block (1, 1 + C_mid) scores of one image (or of a batch whose rows are all
    equal).

    It computes what the gated model computes for that pattern, with no gates, no decisions
    and no slicing at run time: a floor under the time any executor of the pattern can take
    with the same dense kernels.
    """
    blocks = []
    for block, s in zip(model.blocks, scores):
        ops = block
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
        blocks.append(FoldedBlock(conv1, conv2, conv3, ops.downsample))
    runner = None if model.ext is None else native.blocks(model.ext, map(_native_spec, blocks))

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = model.forward_stem(x)
        if runner is not None and native.accepts(x):    # as the gated model runs
            x = runner.plain(x, 0, len(blocks))
        else:
            for block in blocks:
                x = block(x)
        return model.forward_head(x)
    return forward


def _native_spec(block: FoldedBlock | _Skipped):
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
    runner: str               # native: folded blocks run from C++ (both networks); python
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


def _validation_images(ws: Workspace, n: int) -> torch.Tensor | None:
    """The first ``n`` validation images of the workspace as the models see them (repeated
    when it has fewer); None without the data."""
    try:
        images = ws.split("val").images()
    except data.DatasetNotFoundError:
        return None
    return ws.data.to_tensor(np.ascontiguousarray(images[np.arange(n) % len(images)]))


def bench_gated(ws: Workspace, name: str = "lcnet_resnet56", *, placement: str = "sequential",
                blocks_off: float = 0.5, channels_off: float = 0.0,
                batch_sizes: tuple[int, ...] = (1, 256), repeats: int = 10,
                checkpoint: str | None = None, calibrate: bool = True,
                same_channels: bool = False, seed: int = 0,
                use_native: bool | None = None) -> list[GatedBenchRow]:
    """Time dense vs masked vs sparse for a gated model (for the workspace's classes and input
    size) with a chosen gate sparsity.

    Batch 1 is timed over 32 different images (each its own pattern), larger batches over
    one batch; both as medians of ``repeats`` after warm-up. ``checkpoint`` loads trained
    weights from the workspace's checkpoints and keeps their gates (``blocks_off`` and
    ``channels_off`` are then ignored); the images are then the workspace's validation
    images, as trained gates decide on real inputs.
    ``use_native``: both networks folded blocks, and the sparse path, run from C++
    (``runtime.fold``; None: when the runner can be built).
    """
    gated_names = [n for n in models.names() if model_kind(n) == "gated"]
    if name not in gated_names:
        raise ValueError(f"bench gated times a gated model, not {name!r}: choose from "
                         f"{', '.join(gated_names)}")
    device = settings.device()
    shape = {"num_classes": ws.data.n_classes, "input_size": ws.data.image_size}
    with torch.random.fork_rng(devices=[]):   # the same random weights, hence patterns,
        torch.manual_seed(seed)              # in either placement
        gated = models.create(name, placement=placement, **shape).eval()
    if checkpoint:
        zoo.load_weights(gated, zoo.checkpoint_path(ws, checkpoint))
    plain = models.create(name.removeprefix("lcnet_"), **shape).eval()
    plain.load_state_dict(gated.state_dict(), strict=False)
    n_images = max(max(batch_sizes), 256)
    pool = _validation_images(ws, n_images) if checkpoint else None
    if pool is None:
        if checkpoint:
            log.warning("no validation images: timing trained gates on noise")
        pool = _inputs(gated, n_images, seed)
    pool = pool.to(device).contiguous(memory_format=torch.channels_last)
    gated = gated.to(device, memory_format=torch.channels_last)
    if not checkpoint:
        set_gate_pattern(gated, pool[:256], blocks_off, channels_off, seed, same_channels)
    masked = runtime.fuse_batchnorm(gated)
    sparse = runtime.fold(gated, use_native=use_native)
    plain = runtime.fold(plain.to(device, memory_format=torch.channels_last),
                         use_native=use_native)
    runner = "python" if sparse.native is None else "native"

    rows = []
    for batch in batch_sizes:
        plan = runtime.calibrate(sparse, batch) if calibrate else SparsePlan(1.0)
        chunks = [pool[i:i + 1] for i in range(32)] if batch == 1 else [pool[:batch]]
        with torch.no_grad():
            traces = [masked(c).trace for c in chunks]
            macs = torch.cat([t.macs for t in traces]).double().mean().item()
            off_blocks, off_channels = _measured_sparsity(traces)

            fns = {"dense": lambda: [plain(c) for c in chunks],
                   "masked": lambda: [masked(c) for c in chunks],
                   "sparse": lambda: [sparse(c, plan) for c in chunks]}
            patterns = [_one_pattern(t) for t in traces]
            if all(p is not None for p in patterns):
                cuts = [static_cut(sparse, p) for p in patterns]
                fns["static"] = lambda: [cut(c) for cut, c in zip(cuts, chunks)]
            times = runtime.round_robin_times(fns, repeats=repeats, device=device)
        ms = {k: statistics.median(t) * 1e3 / len(chunks) for k, t in times.items()}
        speedup = runtime.paired_ratio(times["dense"], times["sparse"])
        static = runtime.paired_ratio(times["dense"], times["static"]) if "static" in times \
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
