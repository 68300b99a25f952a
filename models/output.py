"""The one answer every system gives: ``Output``.

A plain network, a gated one, an early-exit network, a cascade and an adaptive system under
a policy all answer a batch with logits, the MACs each image cost and, for the kinds that
decide per image, a trace of what they decided. Callers read the fields; they never ask what
kind of system they hold.

The MACs (and a single network's per-stage views) are derived on first read: a timed
forward pays for the answer, not for bookkeeping nobody asked for.
"""
from __future__ import annotations

from functools import cached_property
from typing import Any, Callable

import torch

Lazy = torch.Tensor | Callable[[], torch.Tensor]   # a tensor, or how to compute it once


def _value(source: Lazy) -> torch.Tensor:
    return source() if callable(source) else source


class Output:
    """Read-only fields:
        logits: (B, C) the answer used for each image.
        macs: (B,) int64 MACs spent on each image.
        stage_logits: (B, K, C) every stage's answer (K = 1 for a single network; NaN where
            an adaptive system did not run a stage).
        stage_macs: (B, K) MACs spent in each stage.
        trace: what the system decided, per image, if it decides (``GateTrace``,
            ``CascadeTrace``, ``AdaptiveTrace``), else None.
    Build one with ``single``, ``static`` or ``staged``.
    """

    def __init__(self, logits: torch.Tensor, *, macs: Lazy | None = None,
                 stage_logits: Lazy | None = None, stage_macs: Lazy | None = None,
                 trace: Any = None):
        self.logits = logits
        self.trace = trace
        self._macs, self._stage_logits, self._stage_macs = macs, stage_logits, stage_macs

    @classmethod
    def single(cls, logits: torch.Tensor, macs: Lazy, trace: Any = None) -> Output:
        """A one-stage system's output; ``macs`` (B,) or the function that computes them."""
        return cls(logits, macs=macs, trace=trace)

    @classmethod
    def static(cls, logits: torch.Tensor, macs: int) -> Output:
        """A network that spends ``macs`` on every image."""
        return cls(logits, macs=lambda: torch.full((logits.shape[0],), macs, dtype=torch.long,
                                                    device=logits.device))

    @classmethod
    def staged(cls, stage_logits: Lazy, stage_macs: Lazy, logits: torch.Tensor,
               trace: Any = None) -> Output:
        """A K-stage system's output: every stage's logits and MACs, and the answer used."""
        return cls(logits, stage_logits=stage_logits, stage_macs=stage_macs, trace=trace)

    @cached_property
    def macs(self) -> torch.Tensor:
        return self.stage_macs.sum(1) if self._macs is None else _value(self._macs)

    @cached_property
    def stage_logits(self) -> torch.Tensor:
        if self._stage_logits is None:
            return self.logits[:, None]
        return _value(self._stage_logits)

    @cached_property
    def stage_macs(self) -> torch.Tensor:
        return self.macs[:, None] if self._stage_macs is None else _value(self._stage_macs)

    def arrays(self) -> dict[str, torch.Tensor]:
        """What a cache of outputs keeps: every stage's logits and MACs and the trace's own
        arrays (``cache_arrays``)."""
        own = {"logits": self.stage_logits, "stage_macs": self.stage_macs}
        return own | (self.trace.cache_arrays() if self.trace is not None else {})
