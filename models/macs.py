"""Multiply-accumulates of conv and linear layers (BatchNorm, ReLU and pooling count zero).

This is the convention of torchvision's "GFLOPS" column and of LC-Net's tables; tests hold
it to ``torch.utils.flop_counter.FlopCounterMode`` / 2.
"""
from __future__ import annotations

import torch.nn as nn


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def out_size(hw: tuple[int, int], kernel, stride, padding, dilation=1) -> tuple[int, int]:
    """Spatial size of a conv's or pool's output for an input of spatial size ``hw``."""
    k, s, p, d = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    return tuple((hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))


def conv_out_hw(conv: nn.Conv2d | nn.MaxPool2d, hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial size of ``conv``'s output for an input of spatial size ``hw``."""
    return out_size(hw, conv.kernel_size, conv.stride, conv.padding, conv.dilation)


def conv_macs(conv: nn.Conv2d, hw: tuple[int, int]) -> int:
    """MACs of ``conv`` on one image whose input is ``hw`` pixels."""
    oh, ow = conv_out_hw(conv, hw)
    kh, kw = conv.kernel_size
    return conv.out_channels * (conv.in_channels // conv.groups) * kh * kw * oh * ow


def linear_macs(fc: nn.Linear) -> int:
    return fc.in_features * fc.out_features
