"""Running gated models for real: wall-clock timing and the per-block slicing calibration.

Channel slicing only pays where a conv is wide enough that the saved multiply-adds beat the
cost of gathering weight slices and launching smaller kernels. ``calibrate`` measures, per
block and on the current device at a given batch size, the largest active-channel fraction
at which the sliced residual branch is still faster than the masked dense one; the result is
a ``SparsePlan`` that the sparse path follows, so it is never slower than masking. It also
chooses per block how the gates pool the block's input (a reduction or a matmul with ones:
which is faster differs between CPUs).
"""
from __future__ import annotations

import copy
import itertools
import logging
import statistics
import time
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dynviz import settings
from models import native
from models.lcnet import GatedResNet, SliceCache, SparsePlan, pooled_sum
from models.resnet import ResNet
from models.staged import ExitHead

log = logging.getLogger(__name__)

FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], *, repeats: int = 10, warmup: int = 3,
                device: torch.device | str = "cpu") -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def round_robin_times(fns: dict[str, Callable[[], object]], *, repeats: int = 10,
                      warmup: int = 3, device: torch.device | str = "cpu"
                      ) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` runs of every function after ``warmup`` runs, measured
    round-robin (one run of each per round) so that drift in the machine's speed (other
    tenants, frequency) hits every contender alike."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def compare_times(fns: dict[str, Callable[[], object]], *, repeats: int = 10,
                  warmup: int = 3, device: torch.device | str = "cpu") -> dict[str, float]:
    """Median seconds of each function, measured round-robin (``round_robin_times``)."""
    times = round_robin_times(fns, repeats=repeats, warmup=warmup, device=device)
    return {name: statistics.median(t) for name, t in times.items()}


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of ``numerator[i] / denominator[i]``. Each ratio compares runs
    taken moments apart, so a burst of load that slows some rounds moves it less than it
    moves the ratio of the two medians (on this shared 2-core VM, medians of one contender
    drift by up to 30% between runs of the same benchmark)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("paired_ratio needs two equally long, non-empty series")
    return statistics.median(a / b for a, b in zip(numerator, denominator))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameters
_MMAP_THRESHOLD_MAX = 32 << 20                     # glibc's ceiling on 64-bit


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the
    system: no trimming of the heap, no mmap below 32 MB. Process-wide; True if applied.

    At batch 1 a network allocates and frees a few activation-sized tensors per block. With
    glibc's defaults those frees can shrink the heap or unmap the chunk, and the next
    allocation faults its pages back in: measured here on the native sparse path of a CIFAR
    ResNet-56, 60–410 minor page faults per image in some runs and none in others, which
    made it up to 1.5× slower from one run to the next. Both settings together remove
    them (setting the trim threshold alone freezes glibc's adaptive mmap threshold at
    128 KB, and the faults grew). The CLI and the app call this before timing anything.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):        # not glibc: nothing to tune
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))) and \
        bool(mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_MMAP_THRESHOLD_MAX)))


def native_module():
    """The native block runner (``models.native``), built on first use; None when it is
    turned off (``DYNVIZ_NATIVE=0``) or cannot be built here."""
    if not settings.native_enabled():
        return None
    return native.load(settings.native_dir())


def fold_batchnorm(model: nn.Module, *, use_native: bool | None = None) -> nn.Module:
    """An inference copy of an eval-mode model with every BatchNorm of its ResNets and exit
    heads folded into the conv before it (conv gets a bias, BN becomes Identity), and every
    residual block frozen (``freeze``): plain blocks then run as raw calls, gated ones keep
    their ``InferenceBlock`` (the two gates' weights fused into one matrix). With the native
    runner (``use_native``; default: when ``native_module()`` has one) the frozen blocks of
    plain ResNets, and the sparse path of gated ones, run from C++. Benchmarks fold both the
    dense and the dynamic model, so neither gains from it alone.
    """
    folded = copy.deepcopy(model).eval()
    runner = native_module() if use_native is None or use_native else None
    if use_native and runner is None:
        raise RuntimeError("the native block runner is not available (see the log)")
    for module in list(folded.modules()):
        if isinstance(module, ResNet):
            _fold_resnet(module)
            if runner is not None:
                module.use_native(runner)
        elif isinstance(module, ExitHead):
            _fold_pairs([(module, conv, bn) for conv, bn in module.conv_bn_pairs()])
    return folded.requires_grad_(False)


def _fold_resnet(resnet: ResNet) -> None:
    pairs = [(resnet, "conv1", "bn1")]
    for block in resnet.blocks:
        pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3) if hasattr(block, f"bn{i}")]
        if block.downsample is not None:
            pairs.append((block.downsample, "0", "1"))
    _fold_pairs(pairs)
    for block in resnet.blocks:
        block.freeze()


def _fold_pairs(pairs) -> None:
    for owner, conv_name, bn_name in pairs:
        conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
        if isinstance(bn, nn.BatchNorm2d):
            setattr(owner, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(owner, bn_name, nn.Identity())


def block_input_shapes(model: GatedResNet, batch_size: int) -> list[tuple[int, ...]]:
    """(B, C_in, H, W) of every block's input at the model's ``input_size``."""
    shapes, (_, hw) = [], model.stem_cost()
    channels = model.cfg.widths[0]
    for block in model.blocks:
        shapes.append((batch_size, channels, *hw))
        _, hw = block.cost_table(hw)
        channels = block.mid_channels * block.expansion
    return shapes


@torch.no_grad()
def calibrate(model: GatedResNet, batch_size: int, *, repeats: int = 5,
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
    module = model.__dict__.get("_native_module") if batch_size == 1 else None
    threshold = _slice_threshold if module is None else partial(_native_slice_threshold, module)
    measured: dict[tuple, tuple[float, float]] = {}
    by_matmul: dict[tuple, bool] = {}
    fresh, cached, pools = [], [], []
    for block, shape in zip(model.blocks, block_input_shapes(model, batch_size)):
        key = (shape, block.mid_channels, block.conv1.stride, type(block).__name__,
               block.gate_cfg.placement)
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

    ``contenders(x, ops, masks, cache)`` returns the masked and the sliced way to run the
    block on ``x``, cycling through ``masks`` ((C_mid,) 0/1 channel sets): one set, or with
    ``use_cache`` ``RECURRING_SETS`` sets whose slices are all cached before timing (a lone
    set measured in a loop stays hot and flatters slicing)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device).contiguous(
        memory_format=torch.channels_last).relu_()
    ops = block.inference_block()
    best = 0.0
    for fraction in fractions:
        keep = max(1, round(fraction * block.mid_channels))
        masks = []
        for _ in range(RECURRING_SETS if use_cache else 1):
            mask = torch.zeros(block.mid_channels)
            mask[torch.randperm(block.mid_channels, generator=generator)[:keep]] = 1.0
            masks.append(mask.to(device))
        masked, sliced = contenders(x, ops, masks, SliceCache() if use_cache else None)
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
            return block.sparse_branch(ops, x, s_c, channels, cache, key)
        return (lambda: block.sparse_branch(ops, x, next(turn))), sliced

    return _largest_paying_fraction(block, shape, device, repeats, fractions, use_cache,
                                    contenders)


def _native_slice_threshold(module, block, shape, device, repeats, fractions,
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
            runners.append(native.blocks(module, [spec]))
        turn = itertools.cycle(runners)
        never = [0.0]
        fresh, cached = ([0.0], [1.0]) if cache is not None else ([1.0], [0.0])
        size = 0 if cache is None else cache.max_bytes
        return (lambda: next(turn).gated(x, 0, 1, never, never, 0)), \
            (lambda: next(turn).gated(x, 0, 1, fresh, cached, size))

    return _largest_paying_fraction(block, shape, device, repeats, fractions, use_cache,
                                    contenders)


@torch.no_grad()
def stage_seconds(system: nn.Module, batch_size: int = 1, repeats: int = 5,
                  input_size: int = 32) -> tuple[list[float], float]:
    """Measured seconds per image of every stage of a staged system (each given the state
    the previous stages leave), and of its dense counterpart, at ``batch_size``."""
    from models.staged import dense_counterpart

    device = next(system.parameters()).device
    x = torch.randn(batch_size, 3, input_size, input_size, device=device).contiguous(
        memory_format=torch.channels_last)
    states = [system.begin(x)]
    for k in range(system.n_stages - 1):
        states.append(system.run_stage(k, states[-1])[1])
    fns = {f"stage{k}": (lambda k=k: system.run_stage(k, states[k]))
           for k in range(system.n_stages)}
    begin_cost = {"begin": lambda: system.begin(x)}
    dense = dense_counterpart(system)
    times = compare_times(fns | begin_cost | {"dense": lambda: dense(x)}, repeats=repeats,
                          device=device)
    per_stage = [times[f"stage{k}"] / batch_size for k in range(system.n_stages)]
    per_stage[0] += times["begin"] / batch_size
    return per_stage, times["dense"] / batch_size
