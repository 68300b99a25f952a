"""Benchmark: where the time of a plain ResNet goes, stage by stage, against its MACs."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

import models
from dynviz import runtime, settings
from dynviz.workspace import Workspace, model_kind
from models.lcnet import GatedResNet
from models.macs import linear_macs
from models.resnet import ResNet


@dataclass
class StageBenchRow:
    model: str
    batch: int
    part: str
    macs: int
    mac_share: float
    ms: float              # median per batch
    time_share: float
    time_per_mac: float    # time share / MAC share: > 1 costs more time than its MACs say


def network_parts(model: nn.Module, run: nn.Module | None = None
                  ) -> list[tuple[str, int, Callable]]:
    """A plain ResNet cut into stem, its stages and head: (name, MACs per image, function
    from the previous part's output to this part's). ``run``: the network whose parts run
    (``model`` folded, say; default ``model``)."""
    if not isinstance(model, ResNet) or isinstance(model, GatedResNet):
        raise TypeError(f"bench stages needs a plain ResNet, not {type(model).__name__}")
    run = run if run is not None else model
    stem, _ = model.stem_cost()
    tables = model.block_costs()
    parts = [("stem", sum(stem.values()), run.forward_stem)]
    start = 0
    for name in model.layer_names:
        stop = start + len(getattr(model, name))
        parts.append((name, sum(sum(t.values()) for t in tables[start:stop]),
                      lambda x, a=start, b=stop: run.forward_blocks(x, a, b)))
        start = stop
    parts.append(("head", linear_macs(model.fc), run.forward_head))
    return parts


@torch.no_grad()
def bench_stages(ws: Workspace, name: str = "resnet56", *,
                 batch_sizes: tuple[int, ...] = (1, 256),
                 repeats: int = 10) -> list[StageBenchRow]:
    """Where the time of a plain ResNet (for the workspace's classes and input size) goes,
    stage by stage, against where its MACs go (random weights, BN folded, channels_last:
    timing does not depend on the weights)."""
    plain = [n for n in models.names() if model_kind(n) == "static"]
    if name not in plain:
        raise ValueError(f"bench stages times a plain ResNet, not {name!r}: choose from "
                         f"{', '.join(plain)}")
    device = settings.device()
    model = models.create(name, num_classes=ws.data.n_classes,
                          input_size=ws.data.image_size).eval()
    model = model.to(device, memory_format=torch.channels_last)
    parts = network_parts(model, runtime.fold(model))
    total_macs = sum(macs for _, macs, _ in parts)
    size = model.cfg.input_size
    rows = []
    for batch in batch_sizes:
        x = torch.randn(batch, 3, size, size, device=device).contiguous(
            memory_format=torch.channels_last)
        inputs = [x]
        for _, _, fn in parts[:-1]:
            inputs.append(fn(inputs[-1]))
        fns = {part: (lambda fn=fn, h=h: fn(h)) for (part, _, fn), h in zip(parts, inputs)}
        times = runtime.compare_times(fns, repeats=repeats, device=device)
        total_time = sum(times.values())
        for part, macs, _ in parts:
            mac_share, time_share = macs / total_macs, times[part] / total_time
            rows.append(StageBenchRow(name, batch, part, macs, round(mac_share, 4),
                                      round(times[part] * 1e3, 3), round(time_share, 4),
                                      round(time_share / mac_share, 2)))
    return rows
