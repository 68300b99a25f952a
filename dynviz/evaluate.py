"""The results table: every default system on a split, with accuracy, mean MACs, MAC
reduction and measured speedups against the reference network.

Staged systems run at their shipped operating points (``dynviz.operating_points``, chosen on
the validation *fit* half), judged wherever they are evaluated (by default the *check* half).
Latencies are measured on the current device with BN folded into the convs for every
contender alike (or not at all: ``time_it=False``, ``ship --no-timing``).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dynviz import data, files, live, operating_points, policy as P, runtime, settings, zoo
from dynviz.adaptive import AdaptiveClassifier
from dynviz.workspace import Workspace

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- timing
def _speedup(fn, reference, images: np.ndarray, spec: data.DataSpec, batch: int, device,
             repeats: int) -> float:
    """Reference time / ``fn`` time over the images in batches of ``batch``, both measured
    round-robin, as the median of the per-round ratios (``runtime.paired_ratio``)."""
    chunks = [spec.to_tensor(np.ascontiguousarray(images[i:i + batch]), device)
              for i in range(0, len(images), batch)]
    with torch.no_grad():
        times = runtime.round_robin_times({"reference": lambda: [reference(c) for c in chunks],
                                          "system": lambda: [fn(c) for c in chunks]},
                                         repeats=repeats, warmup=1, device=device)
    return runtime.paired_ratio(times["reference"], times["system"])


@dataclass
class Row:
    system: str
    kind: str
    operating_point: str
    accuracy: float
    macs_mean: float
    macs_reduction: float
    speedup_b1: float | None          # None: not measured (``time_it`` off, or an oracle)
    speedup_b256: float | None
    policy: dict | None = None


def evaluate(ws: Workspace, split: data.Split, *, time_it: bool = True, b1_images: int = 64,
             b256_images: int = 1024, repeats: int = 7, progress: bool = True) -> list[Row]:
    """One row per available system of ``ws`` (static, gated, each staged system at each
    shipped operating point, and the oracle of each staged system) on ``split``. Speedups
    are measured against the workspace's reference network on the first ``b1_images``
    images one by one and on the first ``b256_images`` in batches of 256; without
    ``time_it`` no model runs unless an output cache is missing, and speedups are None."""
    from tqdm import tqdm

    device = settings.device()
    ref_out = zoo.outputs(ws, ws.reference, split, progress=progress).stage_outputs()
    ref_macs = float(ref_out.stage_costs.sum(1).mean())
    if time_it:
        images = split.images()
        reference = runtime.fold(zoo.load_system(ws, ws.reference, device))

    def timed(name: str, fn) -> tuple[float, float] | tuple[None, None]:
        if not time_it:
            return None, None
        if name == ws.reference:
            return 1.0, 1.0                      # by definition
        return (_speedup(fn, reference, images[:b1_images], split.spec, 1, device, repeats),
                _speedup(fn, reference, images[:b256_images], split.spec, 256, device,
                         repeats))

    def row(name, kind, point, accuracy, macs, speedups, policy=None) -> Row:
        b1, b256 = speedups
        return Row(name, kind, point, round(float(accuracy), 4), round(float(macs)),
                   round(ref_macs / float(macs), 3),
                   None if b1 is None else round(b1, 3),
                   None if b256 is None else round(b256, 3),
                   None if policy is None else json.loads(policy.to_json()))

    rows = []
    names = zoo.available(ws)
    # every policy read before any timing: a file to mend is refused at once
    policies = {(name, loss): operating_points.load_policy(ws, name, loss)
                for name in zoo.staged(ws, names) for loss in operating_points.LOSSES}
    # timing takes minutes: a bar over the systems, naming the one being measured
    bar = tqdm(names, desc="timing", unit="system", disable=not (progress and time_it))
    for name in bar:
        bar.set_postfix_str(name)
        kind = ws.spec(name).kind
        out = zoo.outputs(ws, name, split, progress=progress).stage_outputs()
        folded = None
        if time_it:                  # the sparse path's slicing limits, per batch size
            folded = runtime.fold(zoo.load_system(ws, name, device))
            runtime.calibrate_all(folded, (1, 256))
        if not zoo.staged(ws, [name]):
            rows.append(row(name, kind, "trained", out.correct[:, 0].mean(),
                            out.stage_costs[:, 0].mean(), timed(name, folded)))
            continue
        for loss in operating_points.LOSSES:
            pol = policies[name, loss]
            if pol is None:
                log.warning("%s has no shipped policy for %.1f%% loss; run `%s`", name,
                            loss * 100, live.policies_command(ws))
                continue
            sim = P.simulate(pol, out)
            adaptive = None if folded is None else AdaptiveClassifier(folded, pol)
            rows.append(row(name, kind, f"≤{loss * 100:g}% loss (fit half)",
                            sim.correct.mean(), sim.cost.mean(), timed(name, adaptive), pol))
        o = P.oracle(out)
        rows.append(row(f"{name} oracle", "oracle", "knows the correct stages",
                        o.correct.mean(), o.cost.mean(), (None, None)))
    return rows


def write(rows: list[Row], path: Path) -> None:
    files.atomic_write_text(path, json.dumps([asdict(r) for r in rows], indent=1,
                                             ensure_ascii=False) + "\n")


def markdown(rows: list[Row]) -> str:
    head = ("| system | operating point | accuracy | MACs (M) | MAC reduction | speedup b1 "
            "| speedup b256 |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda v: "—" if v is None else f"{v:.2f}×"  # noqa: E731
        lines.append(f"| {r.system} | {r.operating_point} | {r.accuracy * 100:.2f}% | "
                     f"{r.macs_mean / 1e6:.1f} | {r.macs_reduction:.2f}× | {fmt(r.speedup_b1)} | "
                     f"{fmt(r.speedup_b256)} |")
    return "\n".join(lines)
