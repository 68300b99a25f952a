"""LC-Net (Xia et al., "Fully Dynamic Inference with Deep Neural Networks").

Every residual block gets two tiny nets that share one global-average-pool of its input:
L-Net (``BlockGate``: FC → ReLU-1, one score S_L) scales the residual branch,
``x_{i+1} = x_i + S_L(x_i)·F(x_i)``, and C-Net (``ChannelGate``: FC → ReLU-1, one score per
channel S_C) multiplies the output of the block's first conv (after BN+ReLU).

This module is the paper's network on the *masked* path: dense tensors times scores, for
training and as the reference. ``dynviz.runtime`` folds a trained one into a model whose
sparse path really skips (blocks with S_L = 0 dropped from the sub-batch, channels with
S_C = 0 not computed); tests hold the two to the same logits.

Placement (a static property, not a different function): *parallel* gates run beside conv1,
which computes all its output channels, and save conv2's input channels; *sequential*
gates run before conv1 and save conv1's output channels too.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property, partial

import torch
import torch.nn as nn

from models.macs import linear_macs
from models.output import Output
from models.registry import register_model
from models.resnet import (BasicBlock, Bottleneck, ResNet, ResNetConfig, cifar_config,
                           imagenet_config)

PLACEMENTS = ("parallel", "sequential")


@dataclass(frozen=True)
class GateConfig:
    placement: str = "sequential"  # see module docstring
    leak: float = 0.05             # slope of leaky ReLU-1 outside [0, 1] while training
    init_bias: float = 1.0         # gates start open: score = ReLU1(0·x + 1) = 1
    leak_backward_only: bool = False  # training forward = inference (clamp), leaky gradient

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, not {self.placement!r}")


class ReLU1(nn.Module):
    """clamp(x, 0, 1) at inference; in training, slope ``leak`` below 0 and above 1, or with
    ``backward_only`` the clamp forward and the leaky slope only in the gradient (a closed
    gate then computes nothing in training either, as at inference)."""

    def __init__(self, leak: float = 0.0, backward_only: bool = False):
        super().__init__()
        self.leak = leak
        self.backward_only = backward_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.leak == 0:
            return x.clamp(0, 1)
        leaky = torch.where(x < 0, self.leak * x,
                            torch.where(x > 1, 1 + self.leak * (x - 1), x))
        if self.backward_only:
            return leaky + (x.clamp(0, 1) - leaky).detach()
        return leaky


class BlockGate(nn.Module):
    """L-Net: pooled block input (B, C_in) -> S_L (B,)."""

    def __init__(self, in_channels: int, cfg: GateConfig):
        super().__init__()
        self.fc = nn.Linear(in_channels, 1)
        self.act = ReLU1(cfg.leak, cfg.leak_backward_only)
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, cfg.init_bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(pooled)).squeeze(1)


class ChannelGate(nn.Module):
    """C-Net: pooled block input (B, C_in) -> S_C (B, C_mid)."""

    def __init__(self, in_channels: int, mid_channels: int, cfg: GateConfig):
        super().__init__()
        self.fc = nn.Linear(in_channels, mid_channels)
        self.act = ReLU1(cfg.leak, cfg.leak_backward_only)
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, cfg.init_bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(pooled))


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

    def expected_macs(self, block_scores: torch.Tensor,
                      channel_scores: list[torch.Tensor]) -> torch.Tensor:
        """(B,) float MACs with the scores in place of the 0/1 decisions (differentiable):
        fixed + Σ always + Σ_i S_L,i·(branch_i + per_channel_i·Σ_c S_C,i,c)."""
        channels = torch.stack([s.sum(1) for s in channel_scores], 1)   # (B, n_blocks)
        always, branch, per_channel = (
            torch.tensor([float(getattr(b, f)) for b in self.blocks], device=channels.device)
            for f in ("always", "branch", "per_channel"))
        spent = block_scores * (branch + per_channel * channels)
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

    def cache_arrays(self) -> dict[str, torch.Tensor]:
        """Per image, (B, n_blocks) whether each block ran (S_L > 0) and (B, Σ C_mid) whether
        each channel's S_C > 0 (what the app shows; the cache packs them into bits)."""
        return {"blocks_run": self.blocks_executed,
                "channels_on": torch.cat(self.channel_scores, 1) > 0}


class GatedBlockMixin:
    """LC-Net forward and cost for a torchvision-style block (``BasicBlock``/``Bottleneck``)."""

    def _init_gates(self, inplanes: int, cfg: GateConfig) -> None:
        self.gate_cfg = cfg
        self.block_gate = BlockGate(inplanes, cfg)
        self.channel_gate = ChannelGate(inplanes, self.mid_channels, cfg)

    def forward(self, x: torch.Tensor):
        """The masked path: returns ``(out, scores)``, scores (B, 1 + C_mid): S_L then S_C."""
        pooled = x.mean((2, 3))                     # (B, C_in), shared by both gates
        s_l = self.block_gate(pooled)                # (B,)
        s_c = self.channel_gate(pooled)              # (B, C_mid)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(identity + s_l[:, None, None, None] * self.residual_branch(x, s_c))
        return out, torch.cat([s_l[:, None], s_c], 1)

    def residual_branch(self, x: torch.Tensor, s_c: torch.Tensor) -> torch.Tensor:
        """F(x) with conv1's output (after BN+ReLU) scaled by ``s_c`` (B, C_mid)."""
        out = self.relu(self.bn1(self.conv1(x)))
        return self.residual_tail(self.bn2(self.conv2(out * s_c[:, :, None, None])))

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
    """A ResNet whose blocks carry LC-Net gates; forward returns an ``Output`` whose trace is
    a ``GateTrace``. This is the masked path (dense tensors times scores), for training and
    as the reference; ``dynviz.runtime`` folds it into a model that really skips."""

    def __init__(self, cfg: ResNetConfig):
        super().__init__(cfg)
        self.cost = self.cost_model((cfg.input_size, cfg.input_size))

    def forward_blocks(self, x, start, stop):
        """Blocks ``start`` .. ``stop - 1``; returns features and each block's (B, 1 + C_mid)
        scores (S_L, then S_C)."""
        scores = []
        for block in self.blocks[start:stop]:
            x, block_scores = block(x)
            scores.append(block_scores)
        return x, scores

    def cost_model(self, hw: tuple[int, int]) -> CostModel:
        """Per-block MAC coefficients for inputs of spatial size ``hw``."""
        stem, hw_ = self.stem_cost(hw)
        blocks = []
        for block in self.blocks:
            cost, hw_ = block.block_cost(hw_)
            blocks.append(cost)
        return CostModel(stem["conv1"] + linear_macs(self.fc), tuple(blocks))

    def forward(self, x: torch.Tensor) -> Output:
        """Args:
            x: (B, 3, H, W) normalised images.
        """
        features, scores = self.forward_features(x)
        logits = self.forward_head(features)
        hw = tuple(x.shape[-2:])
        cost = self.cost if hw == (self.cfg.input_size,) * 2 else self.cost_model(hw)
        trace = GateTrace(scores, cost)
        return Output.single(logits, lambda: trace.macs, trace)

    def dense_config(self) -> ResNetConfig:
        """The configuration of the plain ResNet these gates sit on."""
        block = Bottleneck if issubclass(self.cfg.block.func, Bottleneck) else BasicBlock
        return replace(self.cfg, block=block)

    def plain_macs(self) -> int:
        """MACs of one image through the plain network under the gates (``dense_counterpart``)."""
        return sum(v for k, v in self.cost_table().items() if "_gate." not in k)

    def dense_counterpart(self) -> ResNet:
        """The plain network with the same weights, gates removed (all open)."""
        plain = ResNet(self.dense_config()).to(next(self.parameters()).device)
        plain.load_state_dict({k: v for k, v in self.state_dict().items() if "_gate." not in k})
        return plain.eval()

    def cache_layout(self) -> dict:
        """What a cache of its outputs needs to read the channels back per block."""
        widths = [b.mid_channels for b in self.blocks]
        offsets = [0]
        for w in widths:
            offsets.append(offsets[-1] + w)
        return {"channel_offsets": offsets, "block_names": self.block_names()}


def gated_config(base: ResNetConfig, gates: GateConfig) -> ResNetConfig:
    gated = GatedBottleneck if base.block is Bottleneck else GatedBasicBlock
    return replace(base, block=partial(gated, gates=gates))


def _register_gated(name: str, make_config, depth: int) -> None:
    def builder(placement: str = "sequential", leak: float = GateConfig.leak,
                init_bias: float = GateConfig.init_bias,
                leak_backward_only: bool = GateConfig.leak_backward_only,
                **overrides) -> GatedResNet:
        gates = GateConfig(placement=placement, leak=leak, init_bias=init_bias,
                           leak_backward_only=leak_backward_only)
        return GatedResNet(gated_config(make_config(depth, **overrides), gates))
    builder.__name__ = name
    builder.__doc__ = f"LC-Net gated {name.removeprefix('lcnet_')}."
    register_model(builder)


for _depth in (8, 20, 32, 44, 56, 110):
    _register_gated(f"lcnet_resnet{_depth}", cifar_config, _depth)
for _depth in (18, 34, 50):
    _register_gated(f"lcnet_resnet{_depth}", imagenet_config, _depth)
