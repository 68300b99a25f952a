"""Staged systems (Bolukbasi et al.): early exits inside one network and cascades of networks.

Both expose the same interface, which ``dynviz.adaptive.AdaptiveClassifier`` drives stage by
stage (dropping finished images from the batch) and which caching uses to record every
stage's answer:

- ``n_stages`` and ``stage_names``; ``can_jump``: whether an image may go straight from an
  early stage to the last (network selection in a cascade);
- ``begin(x) -> state`` and ``run_stage(k, state) -> (logits (B, C), next_state, macs (B,))``,
  where ``macs`` is what stage ``k`` spent on each image (stage ``k`` follows ``k - 1``);
- ``select(state, index)`` keeps the images ``index`` of a state;
- ``forward(x) -> Output``: every stage on every image (``stage_logits`` (B, K, C)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from models.macs import conv_macs, conv_out_hw, linear_macs
from models.output import Output
from models.registry import create, register_model
from models.resnet import ResNet, conv3x3


class ExitHead(nn.Module):
    """A cheap classifier on an intermediate feature map:
    3×3 conv, stride 2 (C → 2C) → BN → ReLU, then ``convs - 1`` more 3×3 convs (2C → 2C,
    each with BN → ReLU) → global average pool → FC."""

    def __init__(self, in_channels: int, num_classes: int, convs: int = 1):
        super().__init__()
        if convs < 1:
            raise ValueError(f"an exit head needs at least one conv; got convs={convs}")
        width = 2 * in_channels
        self.convs = convs
        self.conv = conv3x3(in_channels, width, stride=2)
        self.bn = nn.BatchNorm2d(width)
        for i in range(2, convs + 1):
            setattr(self, f"conv{i}", conv3x3(width, width))
            setattr(self, f"bn{i}", nn.BatchNorm2d(width))
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(width, num_classes)

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """(conv, BN) attribute names, in order."""
        return [("conv", "bn")] + [(f"conv{i}", f"bn{i}") for i in range(2, self.convs + 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in self.conv_bn_pairs():
            x = self.relu(getattr(self, bn)(getattr(self, conv)(x)))   # (B, 2C, H/2, W/2)
        return self.fc(x.mean((2, 3)))

    def macs(self, hw: tuple[int, int]) -> int:
        total = 0
        for conv, _ in self.conv_bn_pairs():
            conv = getattr(self, conv)
            total += conv_macs(conv, hw)
            hw = conv_out_hw(conv, hw)
        return total + linear_macs(self.fc)


@dataclass(frozen=True, eq=False)
class CascadeTrace:
    """What a cascade's networks cost each image when every one of them runs."""
    jump_macs: torch.Tensor     # (B,) the last network on its own (network selection)

    def cache_arrays(self) -> dict[str, torch.Tensor]:
        return {"jump_macs": self.jump_macs}


class StagedMixin:
    can_jump = False

    def forward(self, x: torch.Tensor) -> Output:
        """Every stage on every image; the answer is the last stage's."""
        state, logits, macs = self.begin(x), [], []
        for k in range(self.n_stages):
            stage_logits, state, stage_macs = self.run_stage(k, state)
            logits.append(stage_logits)
            macs.append(stage_macs)
        stage_logits, stage_macs = torch.stack(logits, 1), torch.stack(macs, 1)
        return Output.staged(stage_logits, stage_macs, stage_logits[:, -1],
                             self.all_stages_trace(stage_macs))

    def all_stages_trace(self, stage_macs: torch.Tensor):
        """The trace of running every stage (``forward``); None: nothing beyond the MACs."""
        return None

    def cache_layout(self) -> dict:
        return {}

    @staticmethod
    def select(state: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return state[index]


class EarlyExitNet(StagedMixin, nn.Module):
    """A backbone with exit heads after blocks ``exits``; its own head is the last exit.

    Args:
        backbone: a ``ResNet`` (plain) with ``forward_stem``/``forward_blocks``/``forward_head``.
        exits: block indices (ascending) whose outputs feed an ``ExitHead``.
        head_convs: 3×3 convs of every exit head (see ``ExitHead``), or one count per exit.
    """

    def __init__(self, backbone: ResNet, exits: tuple[int, ...],
                 head_convs: int | tuple[int, ...] = 1):
        super().__init__()
        if list(exits) != sorted(set(exits)) or exits[-1] >= len(backbone.blocks) - 1:
            raise ValueError(f"exits must be ascending block indices before the last block; "
                             f"got {exits} for {len(backbone.blocks)} blocks")
        convs = (head_convs,) * len(exits) if isinstance(head_convs, int) else tuple(head_convs)
        if len(convs) != len(exits):
            raise ValueError(f"head_convs needs one count per exit ({len(exits)}); "
                             f"got {head_convs}")
        self.backbone = backbone
        self.exits = tuple(exits)
        channels = backbone.block_channels()
        self.heads = nn.ModuleList(ExitHead(channels[i], backbone.cfg.num_classes, c)
                                   for i, c in zip(exits, convs))
        self.n_stages = len(exits) + 1
        self.stage_names = [f"exit@{i}" for i in exits] + ["final"]
        self.cfg = backbone.cfg
        self._bounds = [0] + [i + 1 for i in exits] + [len(backbone.blocks)]
        self._stage_macs = tuple(self._count_stage_macs())   # per image, at cfg.input_size

    def begin(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_stem(x)

    def run_stage(self, k: int, h: torch.Tensor):
        h = self.backbone.forward_blocks(h, self._bounds[k], self._bounds[k + 1])
        head = self.heads[k] if k < len(self.heads) else self.backbone.forward_head
        macs = torch.full((h.shape[0],), self._stage_macs[k], dtype=torch.long, device=h.device)
        return head(h), h, macs

    def stage_macs(self) -> list[int]:
        """MACs of each stage for one image: its blocks plus its head (stem in stage 0)."""
        return list(self._stage_macs)

    def _count_stage_macs(self) -> list[int]:
        stem, hw = self.backbone.stem_cost()
        costs, block_hw = [], []
        for table in self.backbone.block_costs():
            block_hw.append(hw)
            costs.append(sum(table.values()))
            hw = self._block_out_hw(len(block_hw) - 1, hw)
        out = []
        for k in range(self.n_stages):
            lo, hi = self._bounds[k], self._bounds[k + 1]
            macs = sum(costs[lo:hi]) + (sum(stem.values()) if k == 0 else 0)
            if k < len(self.heads):
                macs += self.heads[k].macs(self._block_out_hw(hi - 1, block_hw[hi - 1]))
            else:
                macs += linear_macs(self.backbone.fc)
            out.append(macs)
        return out

    def _block_out_hw(self, index: int, hw: tuple[int, int]) -> tuple[int, int]:
        return self.backbone.blocks[index].cost_table(hw)[1]

    def macs(self) -> int:
        """MACs of running every stage (all exits evaluated)."""
        return sum(self.stage_macs())

    def dense_counterpart(self) -> nn.Module:
        """The backbone alone, its own head at the end."""
        return self.backbone


class Cascade(StagedMixin, nn.Module):
    """Classifiers of growing cost, each run on the image from scratch.

    Any module answering with an ``Output`` and knowing its ``macs()`` can be a stage; gated
    stages report per-image MACs through their outputs. Network selection may send an image
    straight to the last network (``can_jump``, unless built with ``can_jump=False``: the
    chain topology), which then costs what it costs alone.
    """

    def __init__(self, stages: list[nn.Module], names: list[str] | None = None,
                 can_jump: bool = True):
        super().__init__()
        self.can_jump = can_jump
        self.stages = nn.ModuleList(stages)
        self.n_stages = len(stages)
        self.stage_names = names or [type(s).__name__ for s in stages]
        self._static = [s.macs() for s in stages]

    def begin(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def run_stage(self, k: int, x: torch.Tensor):
        out = self.stages[k](x)
        return out.logits, x, out.macs

    def all_stages_trace(self, stage_macs: torch.Tensor) -> CascadeTrace:
        return CascadeTrace(stage_macs[:, -1])      # every network runs from scratch

    def stage_macs(self) -> list[int]:
        return list(self._static)

    def macs(self) -> int:
        return sum(self._static)

    def dense_counterpart(self) -> nn.Module:
        """The last (most accurate) network on its own."""
        return self.stages[-1]


@dataclass(frozen=True)
class ExitsConfig:
    backbone: str = "resnet56"
    # Middle and end of stage 2, then every other block of stage 3; three-conv heads in stage
    # 2, none in stage 1: the layouts tried are compared in docs/results.md.
    exits: tuple[int, ...] = (13, 17, 19, 21, 23)
    head_convs: int | tuple[int, ...] = (3, 3, 1, 1, 1)


@register_model
def exits_resnet56(backbone: str = ExitsConfig.backbone,
                   exits: tuple[int, ...] = ExitsConfig.exits,
                   head_convs: int | tuple[int, ...] = ExitsConfig.head_convs,
                   **overrides) -> EarlyExitNet:
    """Exit heads on a ResNet-56 (after blocks 13, 17, 19, 21, 23 and the final head)."""
    return EarlyExitNet(create(backbone, **overrides), tuple(exits), head_convs)


@register_model
def exits_resnet20(backbone: str = "resnet20", exits: tuple[int, ...] = (2, 5),
                   head_convs: int | tuple[int, ...] = 1, **overrides) -> EarlyExitNet:
    """Exit heads after the first two stages of a ResNet-20 (small, for tests)."""
    return EarlyExitNet(create(backbone, **overrides), tuple(exits), head_convs)


@register_model
def cascade_r8_r20_r56(members: tuple[str, ...] = ("resnet8", "resnet20", "resnet56"),
                       **overrides) -> Cascade:
    """ResNet-8 → ResNet-20 → ResNet-56."""
    return Cascade([create(m, **overrides) for m in members], list(members))
