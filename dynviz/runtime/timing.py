"""Wall-clock timing: medians of repeated runs, contenders measured round-robin, paired
ratios, and the per-stage seconds of a staged system."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn as nn


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
    """Median over rounds of ``numerator[i] / denominator[i]``: each ratio compares runs
    taken moments apart, so a burst of load that slows some rounds moves it less than it
    moves the ratio of two medians (docs/benchmarks.md says how much they drift here)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("paired_ratio needs two equally long, non-empty series")
    return statistics.median(a / b for a, b in zip(numerator, denominator))


@torch.no_grad()
def stage_seconds(system: nn.Module, input_size: int, batch_size: int = 1,
                  repeats: int = 5) -> tuple[list[float], float]:
    """Measured seconds per image of every stage of a staged system (each given the state
    the previous stages leave), and of its dense counterpart, at ``batch_size`` images of
    ``input_size``² pixels (the workspace's size: a system may run at no other)."""
    device = next(system.parameters()).device
    x = torch.randn(batch_size, 3, input_size, input_size, device=device).contiguous(
        memory_format=torch.channels_last)
    states = [system.begin(x)]
    for k in range(system.n_stages - 1):
        states.append(system.run_stage(k, states[-1])[1])
    fns = {f"stage{k}": (lambda k=k: system.run_stage(k, states[k]))
           for k in range(system.n_stages)}
    begin_cost = {"begin": lambda: system.begin(x)}
    dense = system.dense_counterpart()
    times = compare_times(fns | begin_cost | {"dense": lambda: dense(x)}, repeats=repeats,
                          device=device)
    per_stage = [times[f"stage{k}"] / batch_size for k in range(system.n_stages)]
    per_stage[0] += times["begin"] / batch_size
    return per_stage, times["dense"] / batch_size
