"""LC-Net (Xia et al., "Fully Dynamic Inference with Deep Neural Networks").

Every residual block gets two tiny nets that share one global-average-pool of its input:
L-Net (``BlockGate``: FC → ReLU-1, one score S_L) scales the residual branch,
``x_{i+1} = x_i + S_L(x_i)·F(x_i)``, and C-Net (``ChannelGate``: FC → ReLU-1, one score per
channel S_C) multiplies the output of the block's first conv (after BN+ReLU).

One forward, two execution paths:
- *masked* (``plan=None``): dense tensors times scores; for training and as the reference;
- *sparse* (``plan=SparsePlan(...)``): really skips. Images whose S_L = 0 are dropped from
  the block's sub-batch (they run only the gates and the shortcut); channels off for every
  image of the sub-batch are not computed (weight slices), the rest are multiplied by S_C.

Placement (a static property, not a different function): *parallel* gates run beside conv1,
which computes all its output channels, and save conv2's input channels; *sequential*
gates run before conv1 and save conv1's output channels too.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import cached_property, partial
from typing import NamedTuple

import torch
import torch.nn as nn

from models import native
from models.macs import linear_macs
from models.registry import register_model
from models.resnet import (BasicBlock, Bottleneck, InferenceConv, ResNet, ResNetConfig,
                           cifar_config, imagenet_config)

PLACEMENTS = ("parallel", "sequential")


@dataclass(frozen=True)
class GateConfig:
    placement: str = "sequential"  # see module docstring
    leak: float = 0.05             # slope of leaky ReLU-1 outside [0, 1] while training
    init_bias: float = 1.0         # gates start open: score = ReLU1(0·x + 1) = 1

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, not {self.placement!r}")


class ReLU1(nn.Module):
    """clamp(x, 0, 1) at inference; in training, slope ``leak`` below 0 and above 1."""

    def __init__(self, leak: float = 0.0):
        super().__init__()
        self.leak = leak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.leak == 0:
            return x.clamp(0, 1)
        return torch.where(x < 0, self.leak * x,
                           torch.where(x > 1, 1 + self.leak * (x - 1), x))


class BlockGate(nn.Module):
    """L-Net: pooled block input (B, C_in) -> S_L (B,)."""

    def __init__(self, in_channels: int, cfg: GateConfig):
        super().__init__()
        self.fc = nn.Linear(in_channels, 1)
        self.act = ReLU1(cfg.leak)
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, cfg.init_bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(pooled)).squeeze(1)


class ChannelGate(nn.Module):
    """C-Net: pooled block input (B, C_in) -> S_C (B, C_mid)."""

    def __init__(self, in_channels: int, mid_channels: int, cfg: GateConfig):
        super().__init__()
        self.fc = nn.Linear(in_channels, mid_channels)
        self.act = ReLU1(cfg.leak)
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, cfg.init_bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(pooled))


class SliceCache:
    """A thread-safe LRU of convs cut to a channel set (``InferenceConv.restrict``), keyed by
    the conv's weight, the dimension cut and the set.

    Gathering a slice of a wide conv weight costs a good share of the conv itself at batch 1
    (ResNet-50's 512-channel 3×3 conv: ~0.3-2 ms to gather against ~1 ms to convolve); trained
    C-Nets reuse a few channel sets over and over, so keeping the cut convs pays. Entries are
    immutable; the cache evicts least-recently-used ones beyond ``max_bytes``. The native
    runner keeps its cuts in a store of its own (``SliceStore`` in ``models/csrc/blocks.cpp``)
    with the same rules, within this ``max_bytes``.
    """

    def __init__(self, max_bytes: int = 256 << 20, max_seen: int = 4096):
        self.max_bytes = max_bytes
        self.max_seen = max_seen
        self._entries: OrderedDict[tuple, InferenceConv] = OrderedDict()
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @staticmethod
    def channel_key(channels: torch.Tensor) -> bytes:
        """A channel set as part of a key; made once per block (~15 µs at batch 1)."""
        return channels.cpu().numpy().tobytes()

    @staticmethod
    def key(weight: torch.Tensor, dim: int, channel_key: bytes) -> tuple:
        return (weight.data_ptr(), weight._version, tuple(weight.shape), dim, channel_key)

    def recurring(self, key: tuple) -> bool:
        """True if ``key``'s conv is cached or its channel set was met before. A set met
        for the first time is only remembered: gathering slices pays when a set recurs (a
        trained C-Net's few favourite sets), not for one-off per-image patterns."""
        with self._lock:
            if key in self._entries or key in self._seen:
                return True
            self._seen[key] = None
            if len(self._seen) > self.max_seen:
                self._seen.popitem(last=False)
            return False

    def conv(self, conv: InferenceConv, dim: int, channels: torch.Tensor,
             channel_key: bytes) -> InferenceConv:
        """``conv`` restricted to ``channels`` of its output (``dim`` 0) or input (1)."""
        key = self.key(conv.weight, dim, channel_key)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        cut = conv.restrict(out_ch=channels) if dim == 0 else conv.restrict(in_ch=channels)
        size = cut.nbytes
        if size > self.max_bytes:
            return cut
        with self._lock:
            if key not in self._entries:
                self._entries[key] = cut
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._entries.popitem(last=False)
                    self._bytes -= old.nbytes
        return cut

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class BlockPlan:
    slice_below: float                # slice when #active channels <= this fraction of C_mid
    slice_below_cached: float         # the same, for a recurring channel set (see SliceCache)
    cache: SliceCache | None = None   # keeps the slices of recurring sets only
    pool_by_matmul: bool = False      # see pooled_sum


@dataclass(frozen=True)
class SparsePlan:
    """How the sparse path treats channels, per block.

    Block ``i`` computes only the union of active channels of its sub-batch when that union
    is at most ``slice_below[i]`` of its channels (``slice_below_cached[i]`` when that channel
    set recurs: its weight slices are in ``cache`` or will be after this call), and
    multiplies the dense output by the mask otherwise. 1.0 always slices, 0.0 never does.
    ``pool_by_matmul[i]`` chooses how block ``i`` pools its input for the gates
    (``pooled_sum``). ``dynviz.engine.calibrate`` measures all of these on the current device.
    The native runner follows the same limits and keeps the cuts of recurring sets in its
    own store, up to ``cache.max_bytes`` (no ``cache``: nothing kept).
    """
    slice_below: tuple[float, ...] | float = 1.0
    slice_below_cached: tuple[float, ...] | float | None = None  # None: as slice_below
    cache: SliceCache | None = None
    pool_by_matmul: tuple[bool, ...] | bool = False

    def _at(self, values, index: int) -> float:
        return float(values) if isinstance(values, float | int) else values[index]

    def native_limits(self, n_blocks: int) -> tuple[list[float], list[float], int]:
        """The native runner's arguments: per block the fresh and the cached limit, and the
        bytes its store of cuts may hold."""
        memo = self.__dict__.setdefault("_native", {})   # the plan is immutable: build once
        if n_blocks not in memo:
            blocks = [self.block(i) for i in range(n_blocks)]
            memo[n_blocks] = ([b.slice_below for b in blocks],
                              [b.slice_below_cached for b in blocks],
                              0 if self.cache is None else self.cache.max_bytes)
        return memo[n_blocks]

    def block(self, index: int) -> BlockPlan:
        memo = self.__dict__.setdefault("_blocks", {})   # the plan is immutable: build once
        if index not in memo:
            cached = self.slice_below if self.slice_below_cached is None \
                else self.slice_below_cached
            memo[index] = BlockPlan(self._at(self.slice_below, index), self._at(cached, index),
                                    self.cache, bool(self._at(self.pool_by_matmul, index)))
        return memo[index]


class InferenceBlock(NamedTuple):
    """What the sparse path needs of one gated block: BN-folded convs and both gates fused
    into one (1 + C_mid, C_in) matrix. Built per call, or once by ``freeze``."""
    gate_weight: torch.Tensor          # (1 + C_mid, C_in), rows contiguous: see forward_sparse
    gate_bias: torch.Tensor
    conv1: InferenceConv
    conv2: InferenceConv
    conv3: InferenceConv | None         # bottleneck only
    downsample: InferenceConv | None
    sequential: bool
    mid_channels: int


def pooled_sum(x: torch.Tensor, by_matmul: bool = False) -> torch.Tensor:
    """(B, C) sum over H×W; ``by_matmul`` sums a channels_last map by a matmul with ones.
    Which is faster depends on the CPU: for 256×56×56 at batch 1 the matmul took 37 µs against
    the reduction's 101 µs on a Xeon with AMX, and 88 µs against 33 µs on an AMD EPYC, so the
    calibration chooses per block."""
    b, c, h, w = x.shape
    if not by_matmul or not x.is_contiguous(memory_format=torch.channels_last):
        return x.sum((2, 3))
    ones = x.new_ones(1, h * w)
    return torch.matmul(ones, x.permute(0, 2, 3, 1).reshape(b, h * w, c)).squeeze(1)



@dataclass(frozen=True)
class BlockCost:
    """MACs of one gated block on one image, split by what gating saves.

    MACs = ``always`` + [S_L > 0]·(``branch`` + ``per_channel``·#{S_C > 0})
    """
    always: int       # L-Net and C-Net FCs, and the downsample conv: run even when skipped
    branch: int       # residual-branch MACs independent of the channel count
    per_channel: int  # MACs per active channel (conv2's input; conv1's output if sequential)


@dataclass(frozen=True)
class CostModel:
    fixed: int                     # stem and classifier
    blocks: tuple[BlockCost, ...]

    def macs(self, block_scores: torch.Tensor, channel_scores: list[torch.Tensor]) -> torch.Tensor:
        """(B,) int64 MACs per image from the scores of a trace."""
        active = torch.stack([(s > 0).sum(1) for s in channel_scores], 1)  # (B, n_blocks)
        always, branch, per_channel = (
            torch.tensor([getattr(b, f) for b in self.blocks], device=active.device)
            for f in ("always", "branch", "per_channel"))
        spent = torch.where(block_scores > 0, branch + per_channel * active, 0)
        return self.fixed + always.sum() + spent.sum(1)


@dataclass
class GateTrace:
    """What one forward of a gated ResNet did, per image.

    ``scores[i]`` (B, 1 + C_mid_i): block i's S_L then its S_C, as the gates computed them;
    ``block_scores`` (B, n_blocks) S_L and ``channel_scores[i]`` (B, C_mid_i) S_C come from
    them; ``macs`` (B,) int64 MACs spent (stem, gates, shortcut, executed blocks and
    channels, head). All derived on first access. A block ran for an image iff its S_L > 0;
    a channel iff also its S_C > 0.
    """
    scores: list[torch.Tensor]
    cost: CostModel

    @cached_property
    def block_scores(self) -> torch.Tensor:
        return torch.stack([s[:, 0] for s in self.scores], 1)

    @cached_property
    def channel_scores(self) -> list[torch.Tensor]:
        return [s[:, 1:] for s in self.scores]

    @cached_property
    def macs(self) -> torch.Tensor:
        return self.cost.macs(self.block_scores, self.channel_scores)

    @property
    def blocks_executed(self) -> torch.Tensor:
        return self.block_scores > 0

    def channels_executed(self, block: int) -> torch.Tensor:
        return (self.channel_scores[block] > 0) & self.blocks_executed[:, block:block + 1]


def _identity(x: torch.Tensor, ops: InferenceBlock) -> torch.Tensor:
    """The shortcut's input to the residual add: x, or downsample(x)."""
    return x if ops.downsample is None else ops.downsample(x)


def _shortcut(identity: torch.Tensor, ops: InferenceBlock) -> torch.Tensor:
    """A skipped block's output: x itself (x >= 0, it left a ReLU) or ReLU(downsample(x))."""
    return identity if ops.downsample is None else identity.relu_()


class GatedBlockMixin:
    """LC-Net forward and cost for a torchvision-style block (``BasicBlock``/``Bottleneck``)."""

    def _init_gates(self, inplanes: int, cfg: GateConfig) -> None:
        self.gate_cfg = cfg
        self.block_gate = BlockGate(inplanes, cfg)
        self.channel_gate = ChannelGate(inplanes, self.mid_channels, cfg)

    def forward(self, x: torch.Tensor, plan: BlockPlan | None = None):
        """Returns ``(out, scores)``, scores (B, 1 + C_mid): S_L then S_C.

        ``plan``: None for the masked path, else this block's ``BlockPlan`` (the sparse path,
        eval mode only; it may overwrite ``x`` in place, which the network owns).
        """
        if plan is not None:
            return self.forward_sparse(x, plan)
        pooled = x.mean((2, 3))                     # (B, C_in), shared by both gates
        s_l = self.block_gate(pooled)                # (B,)
        s_c = self.channel_gate(pooled)              # (B, C_mid)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(identity + s_l[:, None, None, None] * self.residual_branch(x, s_c))
        return out, torch.cat([s_l[:, None], s_c], 1)

    def frozen_block(self) -> InferenceBlock:
        """A fresh ``InferenceBlock``: the plain block's folded convs and the fused gates.
        ``freeze`` stores one for a model that will no longer be trained (its weight slices
        may then be cached by a ``SliceCache``)."""
        gates = torch.cat([self.block_gate.fc.weight, self.channel_gate.fc.weight])
        bias = torch.cat([self.block_gate.fc.bias, self.channel_gate.fc.bias])
        return InferenceBlock(gates.detach().contiguous(), bias.detach(),
                              *super().frozen_block(),
                              self.gate_cfg.placement == "sequential", self.mid_channels)

    def inference_block(self) -> InferenceBlock:
        """The ``InferenceBlock`` ``freeze`` stored, else one built now."""
        return self.__dict__.get("_frozen") or self.frozen_block()

    def residual_branch(self, x: torch.Tensor, s_c: torch.Tensor) -> torch.Tensor:
        """F(x) with conv1's output (after BN+ReLU) scaled by ``s_c`` (B, C_mid)."""
        out = self.relu(self.bn1(self.conv1(x)))
        return self.residual_tail(self.bn2(self.conv2(out * s_c[:, :, None, None])))

    @staticmethod
    def sparse_branch(ops: InferenceBlock, x: torch.Tensor, s_c: torch.Tensor | None,
                      channels: torch.Tensor | None = None, cache: SliceCache | None = None,
                      channel_key: bytes | None = None) -> torch.Tensor:
        """F(x) from an ``InferenceBlock``. ``channels=None`` computes every channel and
        multiplies by the scores; otherwise only ``channels`` are computed (weight slices,
        kept in ``cache`` under ``channel_key`` when given), which is exact when every other
        channel's score is 0. ``s_c=None``: every computed channel's score is 1."""
        if channels is None:
            out = ops.conv1(x).relu_()
            if s_c is not None:
                out.mul_(s_c[:, :, None, None])
        elif channels.numel() == 0:  # conv2 sees only zeros: its output is its bias
            h, w = ops.conv2.out_hw(ops.conv1.out_hw(x.shape[-2:]))
            out = x.new_zeros(x.shape[0], ops.conv2.weight.shape[0], h, w)
            if ops.conv2.bias is not None:
                out += ops.conv2.bias[:, None, None]
            return out if ops.conv3 is None else ops.conv3(out.relu_())
        else:
            if ops.sequential:       # conv1 computes only the active outputs
                out = ops.conv1(x, out_ch=channels, cache=cache, channel_key=channel_key)
            else:                    # conv1 ran beside the gates: all outputs
                out = ops.conv1(x)[:, channels]
            out = out.relu_()
            if s_c is not None:
                out.mul_(s_c[:, channels, None, None])
        out = ops.conv2(out, in_ch=channels, cache=cache, channel_key=channel_key)
        return out if ops.conv3 is None else ops.conv3(out.relu_())

    def forward_sparse(self, x: torch.Tensor, plan: BlockPlan):
        """The sparse path (eval mode); may overwrite ``x`` in place, which the network owns.
        Plain function calls on raw tensors throughout: at batch 1 every microsecond of
        Python and module-call overhead is a visible share of a CIFAR block."""
        if self.training:
            raise RuntimeError("the sparse path runs in eval mode (BatchNorm running stats)")
        ops = self.__dict__.get("_frozen")
        cache = plan.cache
        if ops is None:              # not frozen: fresh tensors every call, nothing to cache
            ops, cache = self.inference_block(), None
        batch, h, w = x.shape[0], x.shape[2], x.shape[3]
        # scores (B, 1 + C_mid); at batch 1 a matrix-vector product that reads the whole gate
        # matrix (ResNet-50's layer4: 4 MB) from memory; with one contiguous row per output it
        # runs ~1.5× faster here than on the transposed layout
        scores = torch.addmm(ops.gate_bias, pooled_sum(x, plan.pool_by_matmul),
                             ops.gate_weight.t(), alpha=1.0 / (h * w)).clamp_(0, 1)
        if batch == 1:               # decide in Python from one copy of the scores
            row = scores.tolist()[0]
            s_l = row[0]
            if s_l == 0:
                return _shortcut(_identity(x, ops), ops), scores
            xa, sc_a, active = x, scores[:, 1:], None
            n_off = row.count(0.0)                   # channels off (S_L > 0 here)
            n_unit = row.count(1.0) - (s_l == 1.0)   # channels whose S_C is exactly 1
        else:
            s_l = scores[:, 0]
            active = (s_l > 0).nonzero().squeeze(1)
            if active.numel() == 0:
                return _shortcut(_identity(x, ops), ops), scores
            xa, sc_a = x, scores[:, 1:]
            if active.numel() == batch:
                active = None
            else:                    # drop skipped images from the sub-batch
                xa = x[active]
                sc_a, s_l = sc_a[active], s_l[active]
            s_l = s_l[:, None, None, None]
        channels, keep, channel_key = None, None, None    # None: multiply by the mask
        limit = max(plan.slice_below, plan.slice_below_cached)     # slicing may pay up to here
        if batch == 1:               # the count is known: find the channels only if they may pay
            n_on = ops.mid_channels - n_off
            if n_on < ops.mid_channels and n_on <= limit * ops.mid_channels:
                channels = sc_a[0].nonzero().squeeze(1)
        elif limit > 0:              # union over the sub-batch
            channels = (sc_a > 0).any(0).nonzero().squeeze(1)
            n_on = channels.numel()
        if channels is not None:
            fraction = n_on / ops.mid_channels
            if n_on < ops.mid_channels and cache is not None and \
                    fraction <= plan.slice_below_cached:
                channel_key = SliceCache.channel_key(channels)
                if cache.recurring(SliceCache.key(ops.conv2.weight, 1, channel_key)):
                    keep = cache                     # a recurring set: slices are kept
            if n_on == ops.mid_channels or (fraction > plan.slice_below and keep is None):
                channels = None                      # slicing would not pay here
        identity = _identity(x, ops)
        ida = identity if active is None else xa if ops.downsample is None else identity[active]
        if batch == 1 and n_unit == ops.mid_channels - n_off and \
                (channels is not None or n_off == 0):
            sc_a = None                              # every channel computed has S_C = 1
        branch = self.sparse_branch(ops, xa, sc_a, channels, keep, channel_key)
        # into the branch's own fresh tensor: a new (B, C, H, W) result would cost as much
        # again (ResNet-50's first stage at batch 1: ~0.1 ms against ~0.05 ms per block)
        if batch == 1:
            out = torch.add(ida, branch, alpha=s_l, out=branch).relu_()
        else:
            out = torch.addcmul(ida, s_l, branch, out=branch).relu_()
        if active is not None:
            out = _shortcut(identity, ops).index_copy_(0, active, out)
        return out, scores

    def block_cost(self, hw) -> tuple[BlockCost, tuple[int, int]]:
        dense, out_hw = self.cost_table(hw)
        per_out_channel = dense["conv1"] // self.mid_channels
        sequential = self.gate_cfg.placement == "sequential"
        always = dense["block_gate.fc"] + dense["channel_gate.fc"] + dense.get("downsample.0", 0)
        branch = dense.get("conv3", 0) + (0 if sequential else dense["conv1"])
        per_channel = dense["conv2"] // self.mid_channels + (per_out_channel if sequential else 0)
        return BlockCost(always, branch, per_channel), out_hw

    def cost_table(self, hw):
        dense, out_hw = super().cost_table(hw)
        gates = {"block_gate.fc": linear_macs(self.block_gate.fc),
                 "channel_gate.fc": linear_macs(self.channel_gate.fc)}
        return dense | gates, out_hw


class GatedBasicBlock(GatedBlockMixin, BasicBlock):
    def __init__(self, inplanes, planes, stride=1, downsample=None, gates=GateConfig()):
        super().__init__(inplanes, planes, stride, downsample)
        self._init_gates(inplanes, gates)


class GatedBottleneck(GatedBlockMixin, Bottleneck):
    def __init__(self, inplanes, planes, stride=1, downsample=None, gates=GateConfig()):
        super().__init__(inplanes, planes, stride, downsample)
        self._init_gates(inplanes, gates)


class GatedResNet(ResNet):
    """A ResNet whose blocks carry LC-Net gates; forward returns ``(logits, GateTrace)``."""

    def forward_blocks(self, x, start, stop, plan: SparsePlan | None = None):
        """Blocks ``start`` .. ``stop - 1``; returns features and each block's (B, 1 + C_mid)
        scores (S_L, then S_C)."""
        runner = None if self.training else self.__dict__.get("_native")
        if plan is not None and runner is not None and native.accepts(x):
            return self._forward_native(runner, x, start, stop, plan)
        scores = []
        for i, block in enumerate(self.blocks[start:stop], start):
            if plan is None:
                x, block_scores = block(x)
            else:   # no module call: its overhead is a visible share at batch 1
                x, block_scores = block.forward_sparse(x, plan.block(i))
            scores.append(block_scores)
        return x, scores

    def _forward_native(self, runner, x, start, stop, plan: SparsePlan):
        """The sparse path through the native runner: gates, decisions, slicing (with the
        runner's store of recurring cuts) and merges with no Python between blocks."""
        fresh, cached, cache_bytes = plan.native_limits(len(self.blocks))
        return runner.gated(x, start, stop, fresh, cached, cache_bytes)

    def forward_features(self, x, plan: SparsePlan | None = None):
        return self.forward_blocks(self.forward_stem(x), 0, len(self.blocks), plan)

    def native_specs(self) -> list[tuple[list[torch.Tensor], list[int]]]:
        """Every block's convs and fused gates (``inference_block``) for the native runner."""
        specs = []
        for block in self.blocks:
            ops = block.inference_block()
            specs.append(native.block_spec(ops.conv1, ops.conv2, ops.conv3, ops.downsample,
                                           gate_weight=ops.gate_weight, gate_bias=ops.gate_bias,
                                           mid_channels=ops.mid_channels,
                                           sequential=ops.sequential))
        return specs

    def forward_intermediates(self, x, indices):
        outs, x, start = [], self.forward_stem(x), 0
        for index in sorted(indices):
            x, _ = self.forward_blocks(x, start, index + 1)
            outs.append(x)
            start = index + 1
        return outs

    def cost_model(self, hw: tuple[int, int]) -> CostModel:
        """Per-block MAC coefficients for inputs of spatial size ``hw``."""
        stem, hw_ = self.stem_cost(hw)
        blocks = []
        for block in self.blocks:
            cost, hw_ = block.block_cost(hw_)
            blocks.append(cost)
        return CostModel(stem["conv1"] + linear_macs(self.fc), tuple(blocks))

    def forward(self, x: torch.Tensor, plan: SparsePlan | None = None):
        """Args:
            x: (B, 3, H, W) normalised images.
            plan: ``None`` runs the masked path; a ``SparsePlan`` runs the sparse path.
        """
        features, scores = self.forward_features(x, plan)
        logits = self.forward_head(features)
        trace = GateTrace(scores, _cached_cost_model(self, tuple(x.shape[-2:])))
        return logits, trace


def _cached_cost_model(model: GatedResNet, hw: tuple[int, int]) -> CostModel:
    """Cost models depend only on the architecture and the input size: memoised per model."""
    cache = model.__dict__.setdefault("_cost_models", {})
    if hw not in cache:
        cache[hw] = model.cost_model(hw)
    return cache[hw]


def gated_config(base: ResNetConfig, gates: GateConfig) -> ResNetConfig:
    gated = GatedBottleneck if base.block is Bottleneck else GatedBasicBlock
    return replace(base, block=partial(gated, gates=gates))


def _register_gated(name: str, make_config, depth: int) -> None:
    def builder(placement: str = "sequential", leak: float = GateConfig.leak,
                init_bias: float = GateConfig.init_bias, **overrides) -> GatedResNet:
        gates = GateConfig(placement=placement, leak=leak, init_bias=init_bias)
        return GatedResNet(gated_config(make_config(depth, **overrides), gates))
    builder.__name__ = name
    builder.__doc__ = f"LC-Net gated {name.removeprefix('lcnet_')}."
    register_model(builder)


for _depth in (8, 20, 32, 44, 56, 110):
    _register_gated(f"lcnet_resnet{_depth}", cifar_config, _depth)
for _depth in (18, 34, 50):
    _register_gated(f"lcnet_resnet{_depth}", imagenet_config, _depth)
