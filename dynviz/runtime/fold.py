"""Folding a trained system for inference: every ResNet inside it becomes a folded network
(``FoldedResNet``, ``FoldedGatedResNet``), every exit head gets its BatchNorms folded into
its convs. The result answers like the source (an ``Output``, the same logits up to float
rounding), holds nothing to train, and is shared read-only by every caller.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dynviz.runtime import native
from dynviz.runtime.folded import FoldedResNet
from dynviz.runtime.sparse import FoldedGatedResNet
from models.lcnet import GatedResNet
from models.resnet import ResNet
from models.staged import ExitHead


def _fuse_head(head: ExitHead, ext) -> ExitHead:
    _fuse_pairs([(head, conv, bn) for conv, bn in head.conv_bn_pairs()])
    return head


# What each kind of network becomes; the first class the module is an instance of wins.
FOLDERS: tuple[tuple[type, Callable], ...] = (
    (GatedResNet, FoldedGatedResNet),
    (ResNet, FoldedResNet.fold),
    (ExitHead, _fuse_head),
)


def fold(model: nn.Module, *, use_native: bool | None = None) -> nn.Module:
    """An inference copy of ``model`` (left as it is), folded on its device and in its
    memory format. ``use_native``: the folded networks' blocks run from C++ (None: when the
    native runner can be built here; True: it must be)."""
    ext = native.module() if use_native is None or use_native else None
    if use_native and ext is None:
        raise RuntimeError("the native block runner is not available (see the log)")
    return _fold(copy.deepcopy(model).eval(), ext)


def _fold(module: nn.Module, ext) -> nn.Module:
    for cls, folder in FOLDERS:
        if isinstance(module, cls):
            return folder(module, ext)
    for name, child in list(module.named_children()):
        setattr(module, name, _fold(child, ext))
    return module.requires_grad_(False)


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every BatchNorm that follows a conv folded into
    it (the conv gets a bias, the BN becomes Identity), the modules otherwise as they are:
    the masked path at the folded models' arithmetic cost, for benchmarks."""
    fused = copy.deepcopy(model).eval()
    pairs = []
    for module in fused.modules():
        if isinstance(module, ResNet):
            pairs.append((module, "conv1", "bn1"))
            for block in module.blocks:
                pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)
                          if hasattr(block, f"bn{i}")]
                if block.downsample is not None:
                    pairs.append((block.downsample, "0", "1"))
        elif isinstance(module, ExitHead):
            pairs += [(module, conv, bn) for conv, bn in module.conv_bn_pairs()]
    _fuse_pairs(pairs)
    return fused.requires_grad_(False)


def _fuse_pairs(pairs) -> None:
    for owner, conv_name, bn_name in pairs:
        conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
        if isinstance(bn, nn.BatchNorm2d):
            setattr(owner, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(owner, bn_name, nn.Identity())
