"""Plain ResNets: CIFAR (depth 6n+2, widths 16/32/64) and ImageNet (torchvision layout).

Attribute names follow torchvision (``conv1``, ``bn1``, ``layer1``..., ``fc``; blocks with
``conv1``/``bn1``/``conv2``/``bn2``/``downsample``), so torchvision's ResNet state dicts load
unchanged. Forward is split (timm style) into ``forward_stem``, ``forward_blocks``,
``forward_features``, ``forward_head`` and ``forward_intermediates`` so that exit heads and
cascades compose whole backbones without the backbone knowing of them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn as nn

from models.macs import conv_macs, conv_out_hw, linear_macs
from models.output import Output
from models.registry import register_model

CostTable = dict[str, int]  # layer name -> MACs for one image


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, 0, bias=False)


def _downsample_costs(block: nn.Module, hw: tuple[int, int]) -> CostTable:
    return {} if block.downsample is None else {"downsample.0": conv_macs(block.downsample[0], hw)}


class ResidualBlock(nn.Module):
    """``relu(shortcut(x) + tail(bn2(conv2(relu(bn1(conv1(x)))))))``: the forward every
    block shares; subclasses build the layers and say what ``residual_tail`` adds."""

    def residual_tail(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.residual_tail(self.bn2(self.conv2(out)))
        out += identity
        return self.relu(out)


class BasicBlock(ResidualBlock):
    """Two 3×3 convs; ``mid_channels`` is the width C-Net gates (conv1's output)."""
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.mid_channels = planes

    def cost_table(self, hw: tuple[int, int]) -> tuple[CostTable, tuple[int, int]]:
        mid = conv_out_hw(self.conv1, hw)
        costs = {"conv1": conv_macs(self.conv1, hw), "conv2": conv_macs(self.conv2, mid)}
        return costs | _downsample_costs(self, hw), conv_out_hw(self.conv2, mid)


class Bottleneck(ResidualBlock):
    """1×1 → 3×3 (stride here, torchvision v1.5) → 1×1 ×4; C-Net gates conv1's output."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.mid_channels = planes

    def residual_tail(self, out: torch.Tensor) -> torch.Tensor:
        return self.bn3(self.conv3(self.relu(out)))

    def cost_table(self, hw: tuple[int, int]) -> tuple[CostTable, tuple[int, int]]:
        out = conv_out_hw(self.conv2, hw)
        costs = {"conv1": conv_macs(self.conv1, hw), "conv2": conv_macs(self.conv2, hw),
                 "conv3": conv_macs(self.conv3, out)}
        return costs | _downsample_costs(self, hw), out


@dataclass(frozen=True)
class ResNetConfig:
    """Args:
        block: block class (or a partial of one) called as ``block(inplanes, planes, stride,
            downsample)``.
        layers: blocks per stage.
        widths: ``planes`` per stage (a stage's output has ``planes * block.expansion``).
        stem: ``"cifar"`` (3×3 conv) or ``"imagenet"`` (7×7/2 conv, 3×3/2 max-pool).
        num_classes: classifier outputs.
        input_size: side of the square input images, for cost tables.
        zero_init_residual: start every residual branch's last BN at zero (trains faster).
    """
    block: Callable[..., nn.Module]
    layers: tuple[int, ...]
    widths: tuple[int, ...]
    stem: str = "cifar"
    num_classes: int = 10
    input_size: int = 32
    zero_init_residual: bool = True


def _expansion(block: Callable[..., nn.Module]) -> int:
    return getattr(block, "expansion", None) or block.func.expansion  # class or partial


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        if cfg.stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', not {cfg.stem!r}")
        self.cfg = cfg
        width = cfg.widths[0]
        if cfg.stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = conv3x3(3, width)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        expansion = _expansion(cfg.block)
        inplanes = width
        self.layer_names = []
        for i, (depth, planes) in enumerate(zip(cfg.layers, cfg.widths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                downsample = None
                if j == 0 and (stride != 1 or inplanes != planes * expansion):
                    downsample = nn.Sequential(conv1x1(inplanes, planes * expansion, stride),
                                               nn.BatchNorm2d(planes * expansion))
                blocks.append(cfg.block(inplanes, planes, stride if j == 0 else 1, downsample))
                inplanes = planes * expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.layer_names.append(f"layer{i + 1}")
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, cfg.num_classes)
        self.num_features = inplanes
        self._init_weights(cfg.zero_init_residual)
        self._macs = sum(self.cost_table().values())   # per image at cfg.input_size

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for block in self.blocks:
                last_bn = block.bn3 if isinstance(block, Bottleneck) else block.bn2
                nn.init.zeros_(last_bn.weight)

    @property
    def blocks(self) -> list[nn.Module]:
        """Every residual block in execution order (index ``i`` = block ``i``)."""
        return [block for name in self.layer_names for block in getattr(self, name)]

    def block_channels(self) -> list[int]:
        """Output channels of every block (what an exit head after block ``i`` reads)."""
        return [block.mid_channels * block.expansion for block in self.blocks]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run blocks ``start`` .. ``stop - 1`` on the output of block ``start - 1``."""
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(self.forward_stem(x), 0, len(self.blocks))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward_intermediates(self, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
        """Outputs of blocks ``indices`` (ascending); stops after the last one asked for."""
        outs, x, start = [], self.forward_stem(x), 0
        for index in sorted(indices):
            x = self.forward_blocks(x, start, index + 1)
            outs.append(x)
            start = index + 1
        return outs

    def forward(self, x: torch.Tensor) -> Output:
        """(B, 3, H, W) normalised images -> ``Output`` (every image costs ``macs()``)."""
        return Output.static(self.forward_head(self.forward_features(x)), self._macs)

    n_stages = 1

    def stage_macs(self) -> list[int]:
        return [self.macs()]

    def dense_counterpart(self) -> ResNet:
        """The static network a dynamic system is compared with: a plain one is its own."""
        return self

    def cache_layout(self) -> dict:
        """What a cache of its outputs needs besides logits and MACs: nothing."""
        return {}

    def stem_cost(self, hw: tuple[int, int] | None = None) -> tuple[CostTable, tuple[int, int]]:
        """Stem MACs and its output size for an input of ``hw`` (default: ``input_size``)."""
        hw = hw or (self.cfg.input_size, self.cfg.input_size)
        costs = {"conv1": conv_macs(self.conv1, hw)}
        hw = conv_out_hw(self.conv1, hw)
        if isinstance(self.maxpool, nn.MaxPool2d):
            hw = conv_out_hw(self.maxpool, hw)
        return costs, hw

    def block_costs(self) -> list[CostTable]:
        """Dense MACs of every layer of every block, for one image at ``input_size``."""
        tables, (_, hw) = [], self.stem_cost()
        for block in self.blocks:
            table, hw = block.cost_table(hw)
            tables.append(table)
        return tables

    def cost_table(self) -> CostTable:
        """Dense MACs per conv/linear layer for one image at ``cfg.input_size``."""
        table = dict(self.stem_cost()[0])
        for name, block, costs in zip(self.block_names(), self.blocks, self.block_costs()):
            table |= {f"{name}.{layer}": macs for layer, macs in costs.items()}
        table["fc"] = linear_macs(self.fc)
        return table

    def block_names(self) -> list[str]:
        return [f"{stage}.{j}" for stage in self.layer_names
                for j in range(len(getattr(self, stage)))]

    def macs(self) -> int:
        """MACs of one image at ``cfg.input_size`` through every layer."""
        return self._macs


# ---------------------------------------------------------------------------- presets
def cifar_config(depth: int, **overrides) -> ResNetConfig:
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, not {depth}")
    n = (depth - 2) // 6
    return replace(ResNetConfig(block=BasicBlock, layers=(n, n, n), widths=(16, 32, 64)),
                   **overrides)


IMAGENET_LAYOUTS = {  # depth -> (block, blocks per stage)
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


def imagenet_config(depth: int, **overrides) -> ResNetConfig:
    block, layers = IMAGENET_LAYOUTS[depth]
    base = ResNetConfig(block=block, layers=layers, widths=(64, 128, 256, 512),
                        stem="imagenet", num_classes=1000, input_size=224,
                        zero_init_residual=False)
    return replace(base, **overrides)


def _register_plain(name: str, make_config: Callable[..., ResNetConfig], depth: int) -> None:
    def builder(**overrides) -> ResNet:
        return ResNet(make_config(depth, **overrides))
    builder.__name__ = name
    builder.__doc__ = f"Plain {name}."
    register_model(builder)


for _depth in (8, 20, 32, 44, 56, 110):
    _register_plain(f"resnet{_depth}", cifar_config, _depth)
for _depth in IMAGENET_LAYOUTS:
    _register_plain(f"resnet{_depth}", imagenet_config, _depth)
