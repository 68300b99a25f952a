"""Inference only: folding trained systems (BatchNorm into the convs, blocks as raw tensors),
the gated sparse path and its calibration, the native runner's bridge, timing.

    folded = runtime.fold(model)                # answers like ``model``, really skips
    runtime.calibrate_all(folded, (1, 256))     # slicing limits measured per batch size
    out = folded(x)                             # an ``Output``
"""
from dynviz.runtime.calibrate import calibrate, calibrate_all
from dynviz.runtime.fold import fold, fuse_batchnorm
from dynviz.runtime.folded import FoldedBlock, FoldedConv, FoldedResNet
from dynviz.runtime.memory import keep_freed_memory
from dynviz.runtime.slices import SliceCache
from dynviz.runtime.sparse import FoldedGatedBlock, FoldedGatedResNet, SparsePlan
from dynviz.runtime.timing import (compare_times, median_time, paired_ratio,
                                   round_robin_times, stage_seconds)

__all__ = ["FoldedBlock", "FoldedConv", "FoldedGatedBlock", "FoldedGatedResNet",
           "FoldedResNet", "SliceCache", "SparsePlan", "calibrate", "calibrate_all",
           "compare_times", "fold", "fuse_batchnorm", "keep_freed_memory", "median_time",
           "paired_ratio", "round_robin_times", "stage_seconds"]
