"""The gated sparse path: LC-Net blocks that really skip.

A folded gated block decides from its gates' scores and computes only what they leave on:
images whose S_L = 0 leave the block's sub-batch (they run only the gates and the
shortcut); channels off for every image of the sub-batch are not computed (weight slices),
the rest are multiplied by S_C. A ``SparsePlan`` says, per block, up to which share of
active channels slicing pays (``dynviz.runtime.calibrate`` measures it), and keeps the
slices of recurring channel sets in a ``SliceCache``. The logits equal the masked path's
(``models.lcnet.GatedResNet``) up to float rounding.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn

from dynviz.runtime import native
from dynviz.runtime.folded import FoldedBlock, FoldedConv, FoldedNet, FoldedResNet, fold_block
from dynviz.runtime.slices import SliceCache
from models.lcnet import CostModel, GateTrace
from models.output import Output


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
    (``pooled_sum``). ``dynviz.runtime.calibrate`` measures all of these on the current device.
    The native runner follows the same limits and keeps the slices of recurring sets in its
    own store, up to ``cache.max_bytes`` (no ``cache``: nothing kept).
    """
    slice_below: tuple[float, ...] | float = 1.0
    slice_below_cached: tuple[float, ...] | float | None = None  # None: as slice_below
    cache: SliceCache | None = None
    pool_by_matmul: tuple[bool, ...] | bool = False
    # per block, derived from the above once (one plan for every block when none is a tuple)
    blocks: tuple[BlockPlan, ...] | BlockPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        cached = self.slice_below if self.slice_below_cached is None else self.slice_below_cached
        fields = (self.slice_below, cached, self.pool_by_matmul)
        lengths = {len(v) for v in fields if isinstance(v, tuple)}
        if len(lengths) > 1:
            raise ValueError(f"per-block limits of different lengths: {sorted(lengths)}")

        def at(values, i):
            return values[i] if isinstance(values, tuple) else values
        plans = tuple(BlockPlan(float(at(self.slice_below, i)), float(at(cached, i)),
                                self.cache, bool(at(self.pool_by_matmul, i)))
                      for i in range(lengths.pop() if lengths else 1))
        object.__setattr__(self, "blocks", plans if isinstance(self.slice_below, tuple) or
                           isinstance(cached, tuple) or isinstance(self.pool_by_matmul, tuple)
                           else plans[0])

    def block(self, index: int) -> BlockPlan:
        return self.blocks if isinstance(self.blocks, BlockPlan) else self.blocks[index]

    def native_limits(self, n_blocks: int) -> tuple[list[float], list[float], int]:
        """The native runner's arguments: per block the fresh and the cached limit, and the
        bytes its store of slices may hold."""
        blocks = [self.block(i) for i in range(n_blocks)]
        return ([b.slice_below for b in blocks], [b.slice_below_cached for b in blocks],
                0 if self.cache is None else self.cache.max_bytes)


def pooled_sum(x: torch.Tensor, by_matmul: bool = False) -> torch.Tensor:
    """(B, C) sum over H×W; ``by_matmul`` sums a channels_last map by a matmul with ones.
    Which is faster depends on the CPU (docs/benchmarks.md), so the calibration chooses per
    block."""
    b, c, h, w = x.shape
    if not by_matmul or not x.is_contiguous(memory_format=torch.channels_last):
        return x.sum((2, 3))
    ones = x.new_ones(1, h * w)
    return torch.matmul(ones, x.permute(0, 2, 3, 1).reshape(b, h * w, c)).squeeze(1)


class FoldedGatedBlock(NamedTuple):
    """A gated block folded for inference: BN-folded convs and both gates fused into one
    (1 + C_mid, C_in) matrix."""
    gate_weight: torch.Tensor          # (1 + C_mid, C_in), rows contiguous: see run
    gate_bias: torch.Tensor
    conv1: FoldedConv
    conv2: FoldedConv
    conv3: FoldedConv | None            # bottleneck only
    downsample: FoldedConv | None
    sequential: bool                   # placement: gates before conv1 (else beside it)
    mid_channels: int

    @classmethod
    def fold(cls, block: nn.Module) -> FoldedGatedBlock:
        """A ``models.lcnet`` gated block (eval mode) folded."""
        gates = torch.cat([block.block_gate.fc.weight, block.channel_gate.fc.weight])
        bias = torch.cat([block.block_gate.fc.bias, block.channel_gate.fc.bias])
        return cls(gates.detach().contiguous(), bias.detach(), *fold_block(block),
                   block.gate_cfg.placement == "sequential", block.mid_channels)

    @property
    def plain(self) -> FoldedBlock:
        """The block with its gates removed (all open)."""
        return FoldedBlock(self.conv1, self.conv2, self.conv3, self.downsample)

    def identity(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut's input to the residual add: x, or downsample(x)."""
        return x if self.downsample is None else self.downsample(x)

    def shortcut(self, identity: torch.Tensor) -> torch.Tensor:
        """A skipped block's output: x itself (x >= 0, it left a ReLU) or ReLU(downsample(x))."""
        return identity if self.downsample is None else identity.relu_()

    def branch(self, x: torch.Tensor, s_c: torch.Tensor | None,
               channels: torch.Tensor | None = None, cache: SliceCache | None = None,
               channel_key: bytes | None = None) -> torch.Tensor:
        """The residual branch F(x). ``channels=None`` computes every channel and
        multiplies by the scores; otherwise only ``channels`` are computed (weight slices,
        kept in ``cache`` under ``channel_key`` when given), which is exact when every other
        channel's score is 0. ``s_c=None``: every computed channel's score is 1."""
        if channels is None:
            out = self.conv1(x).relu_()
            if s_c is not None:
                out.mul_(s_c[:, :, None, None])
        elif channels.numel() == 0:  # conv2 sees only zeros: its output is its bias
            h, w = self.conv2.out_hw(self.conv1.out_hw(x.shape[-2:]))
            out = x.new_zeros(x.shape[0], self.conv2.weight.shape[0], h, w)
            if self.conv2.bias is not None:
                out += self.conv2.bias[:, None, None]
            return out if self.conv3 is None else self.conv3(out.relu_())
        else:
            if self.sequential:       # conv1 computes only the active outputs
                out = self.conv1(x, out_ch=channels, cache=cache, channel_key=channel_key)
            else:                    # conv1 ran beside the gates: all outputs
                out = self.conv1(x)[:, channels]
            out = out.relu_()
            if s_c is not None:
                out.mul_(s_c[:, channels, None, None])
        out = self.conv2(out, in_ch=channels, cache=cache, channel_key=channel_key)
        return out if self.conv3 is None else self.conv3(out.relu_())

    def run(self, x: torch.Tensor, plan: BlockPlan):
        """The sparse path: returns ``(out, scores)`` as the masked block does; may overwrite
        ``x`` in place, which the network owns. Plain function calls on raw tensors
        throughout: at batch 1 every microsecond of Python overhead is a visible share of a
        CIFAR block."""
        ops, cache = self, plan.cache
        batch, h, w = x.shape[0], x.shape[2], x.shape[3]
        # scores (B, 1 + C_mid); at batch 1 a matrix-vector product that reads the whole gate
        # matrix from memory, faster with one contiguous row per output (docs/benchmarks.md)
        scores = torch.addmm(ops.gate_bias, pooled_sum(x, plan.pool_by_matmul),
                             ops.gate_weight.t(), alpha=1.0 / (h * w)).clamp_(0, 1)
        if batch == 1:               # decide in Python from one copy of the scores
            row = scores.tolist()[0]
            s_l = row[0]
            if s_l == 0:
                return ops.shortcut(ops.identity(x)), scores
            xa, sc_a, active = x, scores[:, 1:], None
            n_off = row.count(0.0)                   # channels off (S_L > 0 here)
            n_unit = row.count(1.0) - (s_l == 1.0)   # channels whose S_C is exactly 1
        else:
            s_l = scores[:, 0]
            active = (s_l > 0).nonzero().squeeze(1)
            if active.numel() == 0:
                return ops.shortcut(ops.identity(x)), scores
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
        identity = ops.identity(x)
        ida = identity if active is None else xa if ops.downsample is None else identity[active]
        if batch == 1 and n_unit == ops.mid_channels - n_off and \
                (channels is not None or n_off == 0):
            sc_a = None                              # every channel computed has S_C = 1
        branch = ops.branch(xa, sc_a, channels, keep, channel_key)
        # into the branch's own fresh tensor: a new (B, C, H, W) result would cost as much
        # again (docs/benchmarks.md)
        if batch == 1:
            out = torch.add(ida, branch, alpha=s_l, out=branch).relu_()
        else:
            out = torch.addcmul(ida, s_l, branch, out=branch).relu_()
        if active is not None:
            out = ops.shortcut(identity).index_copy_(0, active, out)
        return out, scores


DEFAULT_PLAN = SparsePlan()   # slice whenever a channel is off; keep no slices


class FoldedGatedResNet(FoldedNet):
    """A gated ResNet folded for inference; its forward runs the sparse path and answers an
    ``Output`` whose trace is a ``GateTrace``, as the masked model does.

    ``plans`` maps a batch size to the ``SparsePlan`` calibrated for it (``calibrate``);
    a batch runs under the plan of the nearest batch size, or ``DEFAULT_PLAN``.
    """

    def __init__(self, model: nn.Module, ext=None):
        """``model``: a ``models.lcnet.GatedResNet`` in eval mode; ``ext``: the native
        runner's extension (``native.module()``), or None: Python blocks."""
        super().__init__(FoldedConv.fold(model.conv1, model.bn1), copy.deepcopy(model.maxpool),
                         [FoldedGatedBlock.fold(block) for block in model.blocks],
                         copy.deepcopy(model.fc).requires_grad_(False), model.macs(),
                         model.block_names(), ext)
        self.input_hw = (model.cfg.input_size, model.cfg.input_size)
        self.cost: CostModel = model.cost
        self.block_shapes = _block_input_shapes(model)
        self.plans: dict[int, SparsePlan] = {}
        self.dense = FoldedResNet(self.stem, self.maxpool, [b.plain for b in self.blocks],
                                  self.fc, model.plain_macs(), self.names, self.ext)

    def native_spec(self, block: FoldedGatedBlock):
        return native.block_spec(block.conv1, block.conv2, block.conv3, block.downsample,
                                 gate_weight=block.gate_weight, gate_bias=block.gate_bias,
                                 mid_channels=block.mid_channels, sequential=block.sequential)

    def plan_for(self, batch: int) -> SparsePlan:
        if not self.plans:
            return DEFAULT_PLAN
        return self.plans[min(self.plans, key=lambda b: abs(b - batch))]

    def forward_blocks(self, x: torch.Tensor, start: int, stop: int, plan: SparsePlan):
        """Blocks ``start`` .. ``stop - 1`` on the sparse path; returns the features and each
        block's (B, 1 + C_mid) scores. The native runner, when it takes ``x``, runs the gates,
        decisions, slicing (keeping the slices of recurring sets in its own store) and merges
        in C++."""
        if self.native is not None and native.accepts(x):
            fresh, cached, store_bytes = plan.native_limits(len(self.blocks))
            return self.native.gated(x, start, stop, fresh, cached, store_bytes)
        scores = []
        for i in range(start, stop):
            x, block_scores = self.blocks[i].run(x, plan.block(i))
            scores.append(block_scores)
        return x, scores

    def forward(self, x: torch.Tensor, plan: SparsePlan | None = None) -> Output:
        """``plan``: the ``SparsePlan`` to run under (default: ``plan_for`` the batch)."""
        if tuple(x.shape[-2:]) != self.input_hw:
            raise ValueError(f"this model was folded for {self.input_hw[0]}×{self.input_hw[1]} "
                             f"inputs, not {x.shape[-2]}×{x.shape[-1]}")
        plan = plan if plan is not None else self.plan_for(x.shape[0])
        features, scores = self.forward_blocks(self.forward_stem(x), 0, len(self.blocks), plan)
        trace = GateTrace(scores, self.cost)
        return Output.single(self.forward_head(features), lambda: trace.macs, trace)

    def dense_counterpart(self) -> FoldedResNet:
        """The plain network with the same folded weights (gates removed)."""
        return self.dense


def _block_input_shapes(model: nn.Module) -> list[tuple[int, int, int]]:
    """(C_in, H, W) of every block's input at the model's ``input_size``."""
    shapes, (_, hw) = [], model.stem_cost()
    channels = model.cfg.widths[0]
    for block in model.blocks:
        shapes.append((channels, *hw))
        _, hw = block.cost_table(hw)
        channels = block.mid_channels * block.expansion
    return shapes
