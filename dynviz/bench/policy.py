"""Benchmark: how long the policy learner takes to refit and sweep (the Budget slider)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynviz import runtime


@dataclass
class PolicyBenchRow:
    task: str
    n_images: int
    n_stages: int
    ms_median: float


def _synthetic_outputs(n: int, k: int, seed: int = 0):
    """Stages of growing accuracy and cost, confidence tracking correctness."""
    from dynviz.policy import StageOutputs

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    difficulty = rng.random(n)
    logits = rng.normal(0, 1, (n, k, 10))
    for stage in range(k):
        knows = difficulty < 0.45 + 0.5 * (stage + 1) / k
        logits[np.arange(n), stage, labels] += np.where(knows, 3.0 + 2 * rng.random(n), 0.0)
    costs = np.tile(2.0 ** np.arange(k), (n, 1))
    return StageOutputs(logits.astype(np.float32), labels, costs, costs[:, -1].copy())


def bench_policy(n: int = 2500, k: int = 3, repeats: int = 20,
                 outputs=None) -> list[PolicyBenchRow]:
    """Refit and sweep times of the policy learner (features precomputed, as in the app)."""
    from dynviz import learn

    out = outputs if outputs is not None else _synthetic_outputs(n, k)
    _ = out.features, out.correct, out.cumulative_costs      # cached once, like the app
    tasks = {
        "fit threshold": lambda: learn.fit(out, 0.3, "threshold"),
        "fit linear": lambda: learn.fit(out, 0.3, "linear"),
        "fit threshold, jump topology": lambda: learn.fit(out, 0.3, "threshold",
                                                          topology="jump"),
        "target_budget threshold (bisection)": lambda: learn.target_budget(out, 0.25),
        "sweep 50 points threshold": lambda: learn.sweep(out, 50),
        "sweep 50 points linear": lambda: learn.sweep(out, 50, "linear"),
    }
    return [PolicyBenchRow(name, len(out), out.n_stages,
                           round(runtime.median_time(fn, repeats=repeats) * 1e3, 2))
            for name, fn in tasks.items()]
