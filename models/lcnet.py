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

from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.macs import conv_out_hw, linear_macs
from models.registry import register_model
from models.resnet import BasicBlock, Bottleneck, ResNet, ResNetConfig, cifar_config, imagenet_config

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


@dataclass(frozen=True)
class SparsePlan:
    """How the sparse path treats channels, per block.

    ``slice_below[i]``: block ``i`` computes only the union of active channels of its
    sub-batch when that union is at most this fraction of its channels, and multiplies the
    dense output by the mask otherwise. 1.0 always slices, 0.0 never does. A calibration on
    the current device (``dynviz.engine.calibrate``) chooses these.
    """
    slice_below: tuple[float, ...] | float = 1.0

    def threshold(self, index: int) -> float:
        if isinstance(self.slice_below, float | int):
            return float(self.slice_below)
        return self.slice_below[index]


def _bn(bn: nn.BatchNorm2d, x: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
    """Eval-mode BN, optionally restricted to ``channels``."""
    if channels is None:
        return bn(x)
    return F.batch_norm(x, bn.running_mean[channels], bn.running_var[channels],
                        bn.weight[channels], bn.bias[channels], False, 0.0, bn.eps)


def _conv(conv: nn.Conv2d, x: torch.Tensor, out_ch: torch.Tensor | None = None,
          in_ch: torch.Tensor | None = None) -> torch.Tensor:
    weight = conv.weight
    if out_ch is not None:
        weight = weight[out_ch]
    if in_ch is not None:
        weight = weight[:, in_ch]
    return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


@dataclass
class BlockTrace:
    block_score: torch.Tensor    # (B,) S_L
    channel_scores: torch.Tensor  # (B, C_mid) S_C
    macs: torch.Tensor           # (B,) int64 MACs this block spent on each image


class GatedBlockMixin:
    """LC-Net forward and cost for a torchvision-style block (``BasicBlock``/``Bottleneck``)."""

    def _init_gates(self, inplanes: int, cfg: GateConfig) -> None:
        self.gate_cfg = cfg
        self.block_gate = BlockGate(inplanes, cfg)
        self.channel_gate = ChannelGate(inplanes, self.mid_channels, cfg)

    def forward(self, x: torch.Tensor, plan: float | None = None) -> tuple[torch.Tensor, BlockTrace]:
        """``plan``: None for the masked path, else the slicing threshold of this block."""
        pooled = x.mean((2, 3))                     # (B, C_in), shared by both gates
        s_l = self.block_gate(pooled)                # (B,)
        s_c = self.channel_gate(pooled)              # (B, C_mid)
        identity = x if self.downsample is None else self.downsample(x)
        if plan is None:
            out = self.relu(self.bn1(self.conv1(x))) * s_c[:, :, None, None]
            out = self.residual_tail(self.bn2(self.conv2(out)))
            out = self.relu(identity + s_l[:, None, None, None] * out)
        else:
            out = self._forward_sparse(x, identity, s_l, s_c, plan)
        return out, BlockTrace(s_l, s_c, self.dynamic_macs(s_l, s_c, x.shape[-2:]))

    def _forward_sparse(self, x, identity, s_l, s_c, slice_below: float) -> torch.Tensor:
        if self.training:
            raise RuntimeError("the sparse path runs in eval mode (BatchNorm running stats)")
        # Skipped images keep the shortcut: x itself (x >= 0, it left a ReLU) or ReLU(downsample).
        base = identity if self.downsample is None else F.relu(identity)
        active = (s_l > 0).nonzero().squeeze(1)
        if active.numel() == 0:
            return base
        compact = active.numel() < x.shape[0]
        if compact:                                  # drop skipped images from the sub-batch
            x, identity, s_l, s_c = x[active], identity[active], s_l[active], s_c[active]
        channels = (s_c > 0).any(0).nonzero().squeeze(1)  # union over the sub-batch
        if channels.numel() == 0:
            # conv2 sees only zeros: its output is 0, and bn2 turns that into a constant.
            out_hw = conv_out_hw(self.conv2, conv_out_hw(self.conv1, x.shape[-2:]))
            out = x.new_zeros(x.shape[0], self.conv2.out_channels, *out_hw)
            out = self.residual_tail(self.bn2(out))
        elif channels.numel() <= slice_below * self.mid_channels:
            sequential = self.gate_cfg.placement == "sequential"
            out = _conv(self.conv1, x, out_ch=channels if sequential else None)
            out = _bn(self.bn1, out, channels if sequential else None)
            if not sequential:
                out = out[:, channels]
            out = self.relu(out) * s_c[:, channels, None, None]
            out = self.residual_tail(self.bn2(_conv(self.conv2, out, in_ch=channels)))
        else:
            out = self.relu(self.bn1(self.conv1(x))) * s_c[:, :, None, None]
            out = self.residual_tail(self.bn2(self.conv2(out)))
        out = self.relu(identity + s_l[:, None, None, None] * out)
        return base.index_copy(0, active, out) if compact else out

    def dynamic_macs(self, s_l: torch.Tensor, s_c: torch.Tensor, hw) -> torch.Tensor:
        """(B,) MACs per image: gates and shortcut always; the residual branch if S_L > 0,
        with conv1 (sequential only) and conv2 reduced to the channels with S_C > 0."""
        dense, _ = self.cost_table(tuple(hw))
        mid = self.mid_channels
        active = (s_c > 0).sum(1)                    # (B,) channels computed per image
        gates = dense["block_gate.fc"] + dense["channel_gate.fc"]
        first = dense["conv1"] // mid * active if self.gate_cfg.placement == "sequential" \
            else torch.full_like(active, dense["conv1"])
        branch = first + dense["conv2"] // mid * active + dense.get("conv3", 0)
        return gates + dense.get("downsample.0", 0) + torch.where(s_l > 0, branch, 0)

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


@dataclass
class GateTrace:
    """What one forward of a gated ResNet did, per image.

    ``block_scores`` (B, n_blocks) S_L; ``channel_scores[i]`` (B, C_mid_i) S_C of block i;
    ``macs`` (B,) int64 MACs spent (stem, gates, executed blocks and channels, head).
    A block ran for an image iff its S_L > 0; a channel iff also its S_C > 0.
    """
    block_scores: torch.Tensor
    channel_scores: list[torch.Tensor]
    macs: torch.Tensor

    @property
    def blocks_executed(self) -> torch.Tensor:
        return self.block_scores > 0

    def channels_executed(self, block: int) -> torch.Tensor:
        return (self.channel_scores[block] > 0) & self.blocks_executed[:, block:block + 1]


class GatedResNet(ResNet):
    """A ResNet whose blocks carry LC-Net gates; forward returns ``(logits, GateTrace)``."""

    def forward_blocks(self, x, start, stop, plan: SparsePlan | None = None):
        """Blocks ``start`` .. ``stop - 1``; returns features and the blocks' traces."""
        traces = []
        for i, block in enumerate(self.blocks[start:stop], start):
            x, trace = block(x, None if plan is None else plan.threshold(i))
            traces.append(trace)
        return x, traces

    def forward_features(self, x, plan: SparsePlan | None = None):
        return self.forward_blocks(self.forward_stem(x), 0, len(self.blocks), plan)

    def forward_intermediates(self, x, indices):
        outs, x, start = [], self.forward_stem(x), 0
        for index in sorted(indices):
            x, _ = self.forward_blocks(x, start, index + 1)
            outs.append(x)
            start = index + 1
        return outs

    def forward(self, x: torch.Tensor, plan: SparsePlan | None = None):
        """Args:
            x: (B, 3, H, W) normalised images.
            plan: ``None`` runs the masked path; a ``SparsePlan`` runs the sparse path.
        """
        features, traces = self.forward_features(x, plan)
        logits = self.forward_head(features)
        fixed = self.stem_cost(tuple(x.shape[-2:]))[0]["conv1"] + linear_macs(self.fc)
        macs = fixed + torch.stack([t.macs for t in traces], 1).sum(1)
        trace = GateTrace(torch.stack([t.block_score for t in traces], 1),
                          [t.channel_scores for t in traces], macs)
        return logits, trace


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
