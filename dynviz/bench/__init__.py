"""Benchmarks (scripts, not tests): measured wall-clock, each printed as a Markdown table by
``python -m dynviz bench ...``: ``gated`` (the sparse path), ``policy`` (refit times),
``stages`` (time vs MACs per stage) and ``staged`` (early exits and cascades at batch 1)."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np


def format_rows(rows: list) -> str:
    """A Markdown table of dataclass rows."""
    dicts = [asdict(r) for r in rows]
    head = list(dicts[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in dicts:
        lines.append("| " + " | ".join(_fmt(d[k]) for k in head) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, np.integer)) and value > 10**6:
        return f"{value / 1e6:.1f}M"
    return str(value)
