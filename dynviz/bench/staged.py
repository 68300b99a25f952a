"""Benchmark: a staged system at batch 1, by the stage its images leave at."""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from dynviz import runtime, zoo
from dynviz.workspace import Workspace


@dataclass
class StagedBenchRow:
    system: str
    leaves_at: str         # the stage whose answer the images take ("+jump": sent there)
    images: int
    mac_ratio: float       # mean MACs spent / the dense network's
    ms_dense: float        # per image, the dense network (BN folded)
    ms_stages: float       # per image, the stages it ran back to back: the network work
    ms_dynamic: float      # per image, the system under its policy (decisions, trace)
    ms_deciding: float     # per image, dynamic - stages: what deciding costs
    speedup: float         # dense / dynamic


def _replay(system: nn.Module, x: torch.Tensor, decisions: np.ndarray, jumped: bool) -> None:
    """The stages one image ran under its policy, without deciding anything."""
    from dynviz.adaptive import NOT_REACHED

    state = system.begin(x)
    for k in np.flatnonzero(decisions != NOT_REACHED):
        _, state, _ = system.run_stage(int(k), state)
    if jumped:
        system.run_stage(system.n_stages - 1, state)


@torch.no_grad()
def bench_staged(ws: Workspace, name: str, *, loss: float = 0.005, n_images: int = 64,
                 repeats: int = 9) -> list[StagedBenchRow]:
    """Where a staged system's batch-1 time goes, by the stage its images leave at: the dense
    network, the stages the images ran (network work only) and the system under its shipped
    ``loss`` operating point, on the first ``n_images`` check images one at a time.

    Every group's three contenders run in one round-robin, so round ``r`` of every group is
    one pass over all the images; ``ms_*`` are medians over rounds, ``ms_deciding`` and
    ``speedup`` medians of the per-round difference and ratio (``runtime.paired_ratio``), and
    the ``all`` row does the same with each round's totals over the groups.
    """
    from dynviz import live, operating_points

    staged = zoo.staged(ws, list(ws.systems))
    if name not in staged:
        raise ValueError(f"{name} is not a staged system; choose from {', '.join(staged)}")
    policy = operating_points.load_policy(ws, name, loss)
    if policy is None:
        raise FileNotFoundError(f"no shipped ≤{loss * 100:g}% policy for {name}; run "
                                f"`{live.policies_command(ws)}`")
    live_system = live.build(ws, name, policy)
    system = live_system.system.system   # the folded stages, without the policy
    images = ws.split("check").images()[:n_images]
    xs = [ws.data.to_tensor(np.ascontiguousarray(images[i:i + 1]), live_system.device)
          for i in range(len(images))]
    traces = [live_system.system(x).trace for x in xs]
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(traces):
        label = t.stage_names[t.exit_stage[0]] + ("+jump" if t.jumped[0] else "")
        groups.setdefault(label, []).append(i)
    order = sorted(groups, key=lambda g: (int(traces[groups[g][0]].exit_stage[0]), g))
    fns = {}
    for label in order:
        members = groups[label]
        fns[label, "dense"] = lambda m=members: [live_system.dense(xs[i]) for i in m]
        fns[label, "stages"] = lambda m=members: [
            _replay(system, xs[i], traces[i].decisions[0], bool(traces[i].jumped[0])) for i in m]
        fns[label, "dynamic"] = lambda m=members: [live_system.system(xs[i]) for i in m]
    times = runtime.round_robin_times(fns, repeats=repeats, device=live_system.device)
    dense_macs = live_system.dense.macs()
    rows = []
    for label, labels in [(g, [g]) for g in order] + [("all", order)]:
        members = [i for g in labels for i in groups[g]]
        rounds = {part: np.sum([times[g, part] for g in labels], 0)
                  for part in ("dense", "stages", "dynamic")}
        macs = float(np.mean([traces[i].macs[0] for i in members]))
        n = len(members)
        ms = {part: statistics.median(t) * 1e3 / n for part, t in rounds.items()}
        rows.append(StagedBenchRow(
            name, label, n, round(macs / dense_macs, 3), round(ms["dense"], 3),
            round(ms["stages"], 3), round(ms["dynamic"], 3),
            round(statistics.median(rounds["dynamic"] - rounds["stages"]) * 1e3 / n, 3),
            round(runtime.paired_ratio(list(rounds["dense"]), list(rounds["dynamic"])), 3)))
    return rows
