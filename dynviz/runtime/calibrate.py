"""The per-block slicing calibration of the gated sparse path.

Channel slicing only pays where a conv is wide enough that the saved multiply-adds beat the
cost of gathering weight slices and launching smaller kernels. ``calibrate`` measures, per
block and on the current device at a given batch size, the largest active-channel fraction
at which the sliced residual branch is still faster than the masked dense one; the result is
a ``SparsePlan`` that the sparse path follows, so it is never slower than masking. It also
chooses per block how the gates pool the block's input (a reduction or a matmul with ones:
which is faster differs between CPUs).
"""
from __future__ import annotations

import itertools
import logging
from functools import partial

import torch
import torch.nn as nn

from dynviz.runtime import native
from dynviz.runtime.slices import SliceCache
from dynviz.runtime.sparse import FoldedGatedResNet, SparsePlan, pooled_sum
from dynviz.runtime.timing import compare_times

log = logging.getLogger(__name__)

FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def calibrate_all(model: nn.Module, batch_sizes: tuple[int, ...] = (1,), **kwargs) -> nn.Module:
    """Calibrate every folded gated network in ``model`` (itself, or a cascade's stage) for
    each batch size; the plans are kept in the networks (``FoldedGatedResNet.plans``)."""
    for module in model.modules():
        if isinstance(module, FoldedGatedResNet):
            for batch in batch_sizes:
                module.plans[batch] = calibrate(module, batch, **kwargs)
    return model


@torch.no_grad()
def calibrate(model: FoldedGatedResNet, batch_size: int, *, repeats: int = 5,
              fractions: tuple[float, ...] = FRACTIONS,
              cache_bytes: int = 256 << 20) -> SparsePlan:
    """Per block, the largest fraction of active channels at which slicing beats masking,
    for a channel set met for the first time (the weight slices are gathered) and for one
    whose slices are in the plan's ``SliceCache``.

    Blocks of the same shape share one measurement. The model must be in eval mode on the
    device it will run on. With the native runner, batch 1 times the runner's block masked
    against sliced (``_native_slice_threshold``); batches time the residual branch alone,
    whose convs outweigh the per-op overhead that sets the two apart.
    """
    device = next(model.parameters()).device
    ext = model.ext if batch_size == 1 else None        # (None off the CPU: FoldedNet)
    threshold = _slice_threshold if ext is None else partial(_native_slice_threshold, ext)
    measured: dict[tuple, tuple[float, float]] = {}
    by_matmul: dict[tuple, bool] = {}
    fresh, cached, pools = [], [], []
    for block, (c, h, w) in zip(model.blocks, model.block_shapes):
        shape = (batch_size, c, h, w)
        key = (shape, block.mid_channels, block.conv1.stride, block.conv3 is None,
               block.sequential)
        if key not in measured:
            measured[key] = tuple(threshold(block, shape, device, repeats, fractions, use_cache)
                                  for use_cache in (False, True))
        if shape not in by_matmul:
            by_matmul[shape] = _matmul_pools_faster(shape, device, repeats)
        fresh.append(measured[key][0])
        cached.append(measured[key][1])
        pools.append(by_matmul[shape])
    log.info("slicing thresholds at batch %d: fresh %s, cached %s; pooling by matmul %s",
             batch_size, fresh, cached, pools)
    return SparsePlan(tuple(fresh), tuple(cached), SliceCache(cache_bytes), tuple(pools))


def _matmul_pools_faster(shape, device, repeats: int) -> bool:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device).contiguous(
        memory_format=torch.channels_last)
    times = compare_times({"sum": lambda: pooled_sum(x), "matmul": lambda: pooled_sum(x, True)},
                          repeats=max(repeats, 5), device=device)
    return times["matmul"] < times["sum"]


RECURRING_SETS = 8   # channel sets a cached measurement cycles through (a C-Net's favourites)


def _largest_paying_fraction(block, shape, device, repeats, fractions, use_cache: bool,
                             contenders) -> float:
    """The largest fraction in ``fractions`` at which slicing beats masking for ``block``.

    ``contenders(x, block, masks, cache)`` returns the masked and the sliced way to run the
    block on ``x``, cycling through ``masks`` ((C_mid,) 0/1 channel sets): one set, or with
    ``use_cache`` ``RECURRING_SETS`` sets whose slices are all cached before timing (a lone
    set measured in a loop stays hot and flatters slicing)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device).contiguous(
        memory_format=torch.channels_last).relu_()
    best = 0.0
    for fraction in fractions:
        keep = max(1, round(fraction * block.mid_channels))
        masks = []
        for _ in range(RECURRING_SETS if use_cache else 1):
            mask = torch.zeros(block.mid_channels)
            mask[torch.randperm(block.mid_channels, generator=generator)[:keep]] = 1.0
            masks.append(mask.to(device))
        masked, sliced = contenders(x, block, masks, SliceCache() if use_cache else None)
        for _ in range(2 * len(masks)):   # every set's slices cached before timing (the
            sliced()                      # native runner keeps a set the second time)
        times = compare_times({"masked": masked, "sliced": sliced}, repeats=repeats,
                              device=device)
        if times["sliced"] >= times["masked"]:
            break
        best = fraction
    return best


def _slice_threshold(block, shape, device, repeats, fractions, use_cache: bool) -> float:
    """``_largest_paying_fraction`` of the residual branch alone: the sliced side pays all
    the sparse path pays to slice, finding the active channels and, ``use_cache``, the set's
    key and lookups."""
    def contenders(x, ops, masks, cache):
        turn = itertools.cycle([m.expand(shape[0], -1) for m in masks])

        def sliced():
            s_c = next(turn)
            channels = (s_c > 0).any(0).nonzero().squeeze(1)
            key = None
            if cache is not None:
                key = SliceCache.channel_key(channels)
                cache.recurring(SliceCache.key(ops.conv2.weight, 1, key))
            return ops.branch(x, s_c, channels, cache, key)
        return (lambda: ops.branch(x, next(turn))), sliced

    return _largest_paying_fraction(block, shape, device, repeats, fractions, use_cache,
                                    contenders)


def _native_slice_threshold(ext, block, shape, device, repeats, fractions,
                            use_cache: bool) -> float:
    """``_largest_paying_fraction`` for a block the native runner runs (batch 1): the
    runner computing every channel against the runner computing the active ones (their
    slices gathered each call, or with ``use_cache`` kept in its store). Each side runs the
    whole block, gates included, on one-block runners whose gates are constant (zero
    weights, the scores in the bias)."""
    def contenders(x, ops, masks, cache):
        runners = []
        for mask in masks:
            scores = torch.cat([mask.new_ones(1), mask * 2 - 1])   # S_L = 1; S_C 1 or off
            spec = native.block_spec(ops.conv1, ops.conv2, ops.conv3, ops.downsample,
                                     gate_weight=torch.zeros_like(ops.gate_weight),
                                     gate_bias=scores, mid_channels=ops.mid_channels,
                                     sequential=ops.sequential)
            runners.append(native.blocks(ext, [spec]))
        turn = itertools.cycle(runners)
        never = [0.0]
        fresh, cached = ([0.0], [1.0]) if cache is not None else ([1.0], [0.0])
        size = 0 if cache is None else cache.max_bytes
        return (lambda: next(turn).gated(x, 0, 1, never, never, 0)), \
            (lambda: next(turn).gated(x, 0, 1, fresh, cached, size))

    return _largest_paying_fraction(block, shape, device, repeats, fractions, use_cache,
                                    contenders)
