"""Folded networks: BatchNorm folded into the convs, every block a tuple of raw tensors,
run by plain function calls (or by the native runner), for inference only.

``FoldedResNet`` answers like the ``ResNet`` it was folded from (an ``Output``, the same
logits up to float rounding) and offers the same ``forward_stem``/``forward_blocks``/
``forward_head`` that early exits compose. It holds no parameters to train: fold a model
on the device and in the memory format it will run in (``dynviz.runtime.fold``).
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from dynviz.runtime import native
from dynviz.runtime.slices import SliceCache
from models.macs import out_size
from models.output import Output


def _slice(weight: torch.Tensor, dim: int, channels: torch.Tensor) -> torch.Tensor:
    sliced = weight.index_select(dim, channels)
    if weight.is_contiguous(memory_format=torch.channels_last):
        sliced = sliced.contiguous(memory_format=torch.channels_last)
    return sliced


# Convs whose weight has at least this many elements run on oneDNN whatever the input: for a
# small CPU input torch otherwise picks its im2col convolution, under which a sliced wide conv
# ran slower than the whole one; for CIFAR's small convs torch's choice is the faster
# (docs/benchmarks.md). The native runner (models/csrc/blocks.cpp) applies the same rule.
ONEDNN_MIN_WEIGHT = 1 << 16


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
           dilation, groups: int) -> torch.Tensor:
    """``F.conv2d``, on oneDNN for large weights on the CPU (see ``ONEDNN_MIN_WEIGHT``)."""
    if weight.numel() >= ONEDNN_MIN_WEIGHT and x.device.type == "cpu" and \
            x.dtype == torch.float32 and torch.backends.mkldnn.is_available() and \
            not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return torch.mkldnn_convolution(x, weight, bias, padding, stride, dilation, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class FoldedConv(NamedTuple):
    """A conv with its BatchNorm folded in, as raw tensors: no module lookups at call time."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @classmethod
    def fold(cls, conv: nn.Conv2d, bn: nn.Module) -> FoldedConv:
        weight, bias = conv.weight.detach(), conv.bias
        if isinstance(bn, nn.BatchNorm2d):
            weight, bias = fuse_conv_bn_weights(weight, bias, bn.running_mean, bn.running_var,
                                                bn.eps, bn.weight, bn.bias)
            if conv.weight.is_contiguous(memory_format=torch.channels_last):
                weight = weight.contiguous(memory_format=torch.channels_last)
        bias = None if bias is None else bias.detach()
        return cls(weight.detach(), bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    def __call__(self, x: torch.Tensor, out_ch: torch.Tensor | None = None,
                 in_ch: torch.Tensor | None = None, cache: SliceCache | None = None,
                 channel_key: bytes | None = None) -> torch.Tensor:
        """The conv restricted to output channels ``out_ch`` or input channels ``in_ch``;
        with a ``cache``, one of the two, whose ``SliceCache.channel_key`` is ``channel_key``."""
        conv = self
        if cache is not None and (out_ch is None) != (in_ch is None):
            dim, channels = (0, out_ch) if out_ch is not None else (1, in_ch)
            conv = cache.conv(self, dim, channels, channel_key)
        elif out_ch is not None or in_ch is not None:
            conv = self.restrict(out_ch, in_ch)
        return conv2d(x, conv.weight, conv.bias, self.stride, self.padding, self.dilation,
                      self.groups)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias)
                   if t is not None)

    def restrict(self, out_ch: torch.Tensor | None = None, in_ch: torch.Tensor | None = None,
                 scale: torch.Tensor | float = 1.0) -> FoldedConv:
        """This conv sliced for good to output channels ``out_ch`` and input channels ``in_ch``
        (the weight slices gathered now). ``scale`` folds a factor into the weights: a number
        multiplies the output; a (C_in',) tensor multiplies each kept input channel."""
        weight, bias = self.weight, self.bias
        if out_ch is not None:
            weight = _slice(weight, 0, out_ch)
            bias = None if bias is None else bias[out_ch]
        if in_ch is not None:
            weight = _slice(weight, 1, in_ch)
        if torch.is_tensor(scale):                      # (C_in',): per input channel
            weight = weight * scale[None, :, None, None]
        elif scale != 1.0:
            weight = weight * scale
            bias = None if bias is None else bias * scale
        if self.weight.is_contiguous(memory_format=torch.channels_last):
            weight = weight.contiguous(memory_format=torch.channels_last)
        return self._replace(weight=weight, bias=bias)

    def out_hw(self, hw) -> tuple[int, int]:
        return out_size(hw, self.weight.shape[-2:], self.stride, self.padding, self.dilation)


class FoldedBlock(NamedTuple):
    """A plain residual block for inference only: BN-folded convs as raw tensors."""
    conv1: FoldedConv
    conv2: FoldedConv
    conv3: FoldedConv | None         # bottleneck only
    downsample: FoldedConv | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The block on ``x`` (left as it is): plain function calls and in-place ops on its
        own tensors, as the gated sparse path runs, so that timing one against the other
        compares skipping, not module-call dispatch."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x).relu_())
        if self.conv3 is not None:
            out = self.conv3(out.relu_())
        return out.add_(identity).relu_()


class FoldedNet(nn.Module):
    """What folded networks share: a stem, blocks of raw tensors (run from Python, or from
    C++ by the native runner when ``ext`` is given), a classifier, and the MACs of the
    source network. It holds nothing to train and lives on the device it was folded on.

    Args:
        stem: the stem conv with its BN folded in; ``maxpool`` after it (ImageNet stems).
        blocks: every residual block in execution order.
        fc: the classifier.
        macs: MACs per image (the source network's ``macs()``).
        block_names: ``layer1.0``... as the source names its blocks.
        ext: the native runner's extension (``native.module()``), or None: Python blocks.
    """
    n_stages = 1

    def __init__(self, stem: FoldedConv, maxpool: nn.Module, blocks: list, fc: nn.Linear,
                 macs: int, block_names: list[str], ext=None):
        super().__init__()
        self.stem, self.maxpool, self.fc = stem, maxpool, fc
        self.blocks = list(blocks)
        self.source_macs = macs
        self.names = list(block_names)
        self.ext = ext if stem.weight.device.type == "cpu" else None   # the runner is CPU-only
        self.native = self.native_runner()

    def native_spec(self, block) -> tuple[list[torch.Tensor], list[int]]:
        """One block in the native runner's layout (``native.block_spec``)."""
        raise NotImplementedError

    def native_runner(self):
        """A new native runner over the blocks, its store of slices empty (None without the
        extension)."""
        if self.ext is None:
            return None
        return native.blocks(self.ext, [self.native_spec(block) for block in self.blocks])

    def __getstate__(self):
        """A copy or a pickle runs Python blocks: the extension stays with this process."""
        return super().__getstate__() | {"ext": None, "native": None}

    def _apply(self, fn, recurse=True):
        # the blocks' tensors are not parameters: moving only the classifier would leave a
        # model split between devices or dtypes
        raise TypeError(f"a {type(self).__name__} is not moved or cast: fold the model on "
                        f"the device and in the dtype it will run in")

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.stem(x).relu_())

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def macs(self) -> int:
        return self.source_macs

    def stage_macs(self) -> list[int]:
        return [self.source_macs]

    def block_names(self) -> list[str]:
        return list(self.names)


class FoldedResNet(FoldedNet):
    """A plain ResNet folded for inference (see the module docstring)."""

    @classmethod
    def fold(cls, model: nn.Module, ext=None) -> FoldedResNet:
        """``model`` (a ``models.resnet.ResNet`` in eval mode) folded."""
        blocks = [fold_block(block) for block in model.blocks]
        return cls(FoldedConv.fold(model.conv1, model.bn1), copy.deepcopy(model.maxpool),
                   blocks, copy.deepcopy(model.fc).requires_grad_(False), model.macs(),
                   model.block_names(), ext)

    def native_spec(self, block: FoldedBlock):
        return native.block_spec(*block)

    def forward_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start`` .. ``stop - 1``, from C++ when the native runner takes ``x``."""
        if self.native is not None and native.accepts(x):
            return self.native.plain(x, start, stop)
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> Output:
        x = self.forward_blocks(self.forward_stem(x), 0, len(self.blocks))
        return Output.static(self.forward_head(x), self.source_macs)

    def dense_counterpart(self) -> FoldedResNet:
        return self


def fold_block(block: nn.Module) -> FoldedBlock:
    """A torchvision-layout residual block (``BasicBlock``/``Bottleneck``) folded."""
    conv3 = getattr(block, "conv3", None)
    downsample = None if block.downsample is None else \
        FoldedConv.fold(block.downsample[0], block.downsample[1])
    return FoldedBlock(FoldedConv.fold(block.conv1, block.bn1),
                       FoldedConv.fold(block.conv2, block.bn2),
                       None if conv3 is None else FoldedConv.fold(conv3, block.bn3), downsample)
