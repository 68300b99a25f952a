"""Staged systems (Bolukbasi et al.): early exits inside one network and cascades of networks.

Both expose the same interface, which ``dynviz.adaptive.AdaptiveClassifier`` drives stage by
stage (dropping finished images from the batch) and which caching uses to record every
stage's answer:

- ``n_stages`` and ``stage_names``;
- ``begin(x) -> state`` and ``run_stage(k, state) -> (logits (B, C), next_state, macs (B,))``,
  where ``macs`` is what stage ``k`` spent on each image (stage ``k`` follows ``k - 1``);
- ``select(state, index)`` keeps the images ``index`` of a state;
- ``jump_macs(x_state) -> (B,)`` for cascades: the last stage run on its own;
- ``forward(x) -> (logits (B, K, C), macs (B, K))``: every stage on every image.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from models.macs import conv_macs, conv_out_hw, linear_macs
from models.lcnet import GatedResNet
from models.registry import create, register_model
from models.resnet import BasicBlock, Bottleneck, ResNet, conv3x3


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


def _logits_and_macs(model: nn.Module, x: torch.Tensor, static_macs: int):
    """Any classifier: a plain one returns logits, a dynamic one (logits, trace with .macs)."""
    out = model(x)
    if isinstance(out, tuple):
        return out[0], out[1].macs
    return out, torch.full((x.shape[0],), static_macs, dtype=torch.long, device=x.device)


def measured_macs(model: nn.Module, input_size: int) -> int:
    """MACs of one image through ``model``: its own count if it has one, else
    FlopCounterMode / 2 on a dummy input (for arbitrary classifiers)."""
    if hasattr(model, "macs"):
        return model.macs()
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, input_size, input_size))
    model.train(was_training)
    return counter.get_total_flops() // 2


class StagedMixin:
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stage on every image: (logits (B, K, C), macs (B, K))."""
        state, logits, macs = self.begin(x), [], []
        for k in range(self.n_stages):
            stage_logits, state, stage_macs = self.run_stage(k, state)
            logits.append(stage_logits)
            macs.append(stage_macs)
        return torch.stack(logits, 1), torch.stack(macs, 1)

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

    def begin(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_stem(x)

    def run_stage(self, k: int, h: torch.Tensor):
        h = self.backbone.forward_blocks(h, self._bounds[k], self._bounds[k + 1])
        head = self.heads[k] if k < len(self.heads) else self.backbone.forward_head
        macs = torch.full((h.shape[0],), self.stage_macs()[k], dtype=torch.long, device=h.device)
        return head(h), h, macs

    def stage_macs(self) -> list[int]:
        """MACs of each stage for one image: its blocks plus its head (stem in stage 0).
        Depends only on the architecture: computed once (``run_stage`` asks every call)."""
        cached = self.__dict__.get("_stage_macs")
        if cached is None:
            cached = self.__dict__["_stage_macs"] = tuple(self._count_stage_macs())
        return list(cached)

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


class Cascade(StagedMixin, nn.Module):
    """Classifiers of growing cost, each run on the image from scratch.

    Any ``nn.Module`` mapping images to logits can be a stage; gated stages report per-image
    MACs through their traces. ``jump_macs`` is the cost of the last stage alone (network
    selection may send an image straight to it).
    """

    def __init__(self, stages: list[nn.Module], names: list[str] | None = None,
                 input_size: int = 32):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.n_stages = len(stages)
        self.stage_names = names or [type(s).__name__ for s in stages]
        self.input_size = input_size
        self._static = [measured_macs(s, input_size) for s in stages]

    def begin(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def run_stage(self, k: int, x: torch.Tensor):
        logits, macs = _logits_and_macs(self.stages[k], x, self._static[k])
        return logits, x, macs

    def jump_macs(self, x: torch.Tensor) -> torch.Tensor:
        return _logits_and_macs(self.stages[-1], x, self._static[-1])[1]

    def stage_macs(self) -> list[int]:
        return list(self._static)

    def macs(self) -> int:
        return sum(self._static)


def dense_counterpart(model: nn.Module) -> nn.Module:
    """What the dynamic system is compared with: the plain network with the same weights
    (gated), the backbone (early exits) or the last network (cascade)."""
    if isinstance(model, GatedResNet):
        block = Bottleneck if issubclass(model.cfg.block.func, Bottleneck) else BasicBlock
        plain = ResNet(replace(model.cfg, block=block)).to(next(model.parameters()).device)
        state = {k: v for k, v in model.state_dict().items() if "_gate." not in k}
        plain.load_state_dict(state)
        return plain.eval()
    if isinstance(model, EarlyExitNet):
        return model.backbone
    if isinstance(model, Cascade):
        return model.stages[-1]
    return model



@dataclass(frozen=True)
class ExitsConfig:
    backbone: str = "resnet56"
    # Middle and end of stage 2, then every other block of stage 3, whose features are the
    # discriminative ones. Stage 2's heads have three convs: on the three-cycle resnet56, with
    # one they reached 66% and 69% on the check half, with two 77% and 79%, with three 81% and
    # 82%; the best policy within 0.5% of resnet56 (chosen on check itself) saves 1.22×, 1.29×
    # and 1.32× MACs. No head in stage 1: one there reached 47% and took 1% of the images
    # (see the exits_resnet56_shallow and exits_resnet56_stage2x2 recipes).
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
