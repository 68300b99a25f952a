"""The one answer every system gives: ``Output``.

A plain network, a gated one, an early-exit network, a cascade and an adaptive system under
a policy all answer a batch with logits, the MACs each image cost and, for the kinds that
decide per image, a trace of what they decided. Callers read the fields; they never ask what
kind of system they hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, eq=False)
class Output:
    """Args:
        logits: (B, C) the answer used for each image.
        macs: (B,) int64 MACs spent on each image.
        stage_logits: (B, K, C) every stage's answer (K = 1 for a single network; NaN where
            an adaptive system did not run a stage).
        stage_macs: (B, K) MACs spent in each stage.
        trace: what the system decided, per image, if it decides (``GateTrace``,
            ``CascadeTrace``, ``AdaptiveTrace``), else None.
    """
    logits: torch.Tensor
    macs: torch.Tensor
    stage_logits: torch.Tensor
    stage_macs: torch.Tensor
    trace: Any = None

    @classmethod
    def single(cls, logits: torch.Tensor, macs: torch.Tensor, trace: Any = None) -> Output:
        """The output of a one-stage system."""
        return cls(logits, macs, logits[:, None], macs[:, None], trace)

    @classmethod
    def static(cls, logits: torch.Tensor, macs: int) -> Output:
        """A network that spends ``macs`` on every image."""
        per_image = torch.full((logits.shape[0],), macs, dtype=torch.long,
                               device=logits.device)
        return cls.single(logits, per_image)

    def arrays(self) -> dict[str, torch.Tensor]:
        """What a cache of outputs keeps: every stage's logits and MACs and the trace's own
        arrays (``cache_arrays``)."""
        own = {"logits": self.stage_logits, "stage_macs": self.stage_macs}
        return own | (self.trace.cache_arrays() if self.trace is not None else {})
