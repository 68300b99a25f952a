"""``AdaptiveClassifier``: a staged system (early exits or a cascade) run for real under a
policy: stage by stage, images that leave are dropped from the batch, images the policy
sends straight to the last network (cascades, jump topology) run only that network.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from dynviz.policy import FEATURES, Policy, confidence_features, row_confidence_features
from models.output import Output

NOT_REACHED, CONTINUE, EXIT, JUMP = -1, 0, 1, 2


@dataclass
class AdaptiveTrace:
    """Per image: what each stage said and what the policy did.

    ``features`` (B, K, 3) confidence features (NaN where the stage did not run);
    ``decisions`` (B, K) NOT_REACHED / CONTINUE / EXIT / JUMP; ``exit_stage`` (B,) the stage
    whose answer is used; ``jumped`` (B,); ``stage_macs`` (B, K) MACs spent in each stage
    (a jump's last-network run is counted in the last column); ``macs`` (B,) total;
    ``stage_logits`` (B, K, C) float32, NaN where the stage did not run.
    """
    features: np.ndarray
    decisions: np.ndarray
    exit_stage: np.ndarray
    jumped: np.ndarray
    stage_macs: np.ndarray
    stage_names: list[str]
    stage_logits: np.ndarray

    @property
    def macs(self) -> np.ndarray:
        return self.stage_macs.sum(1)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return FEATURES

    def cache_arrays(self) -> dict[str, np.ndarray]:
        """Nothing beyond the stages' logits and MACs (policies are simulated from those)."""
        return {}


class AdaptiveClassifier(nn.Module):
    """Args:
        system: a staged model (``models.staged.EarlyExitNet`` or ``Cascade``), eval mode.
        policy: the ``dynviz.policy.Policy`` that decides at every stage but the last.
    """

    def __init__(self, system: nn.Module, policy: Policy):
        super().__init__()
        if policy.exits and len(policy.exits) != system.n_stages - 1:
            raise ValueError(f"policy has {len(policy.exits)} decisions; the system needs "
                             f"{system.n_stages - 1}")
        if policy.jumps and not system.can_jump:
            raise ValueError("a jump policy needs a cascade of the jump topology")
        self.system = system
        self.policy = policy
        self.n_stages = system.n_stages
        self.stage_names = system.stage_names

    def dense_counterpart(self) -> nn.Module:
        return self.system.dense_counterpart()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> Output:
        """Each image's answer from the stage it left at; the trace is an ``AdaptiveTrace``."""
        if x.shape[0] == 1:
            return self._forward_one(x)
        system, k_total, b = self.system, self.system.n_stages, x.shape[0]
        out = torch.empty(b, 0, device=x.device)
        features = np.full((b, k_total, len(FEATURES)), np.nan)
        decisions = np.full((b, k_total), NOT_REACHED, dtype=np.int8)
        exit_stage = np.full(b, k_total - 1)
        jumped = np.zeros(b, bool)
        stage_macs = np.zeros((b, k_total), dtype=np.int64)
        active = np.arange(b)                        # original positions still running
        state = system.begin(x)
        for k in range(k_total):
            logits, state, macs = system.run_stage(k, state)
            if out.shape[1] == 0:
                out = torch.empty(b, logits.shape[1], device=x.device, dtype=logits.dtype)
                stage_logits = np.full((b, k_total, logits.shape[1]), np.nan, np.float32)
            stage_macs[active, k] += macs.cpu().numpy()
            stage_logits[active, k] = logits.float().cpu().numpy()
            phi = confidence_features(stage_logits[active, k])
            features[active, k] = phi
            leave, jump = self.policy.decide(k, phi, k_total)
            decisions[active, k] = np.where(leave, EXIT, np.where(jump, JUMP, CONTINUE))
            done = torch.from_numpy(np.flatnonzero(leave)).to(x.device)
            out[torch.from_numpy(active[leave]).to(x.device)] = logits[done]
            exit_stage[active[leave]] = k
            if jump.any():                           # straight to the last network
                idx = torch.from_numpy(np.flatnonzero(jump)).to(x.device)
                jump_state = system.select(state, idx)
                last_logits, _, last_macs = system.run_stage(k_total - 1, jump_state)
                rows = active[jump]
                out[torch.from_numpy(rows).to(x.device)] = last_logits
                stage_macs[rows, k_total - 1] += last_macs.cpu().numpy()
                stage_logits[rows, k_total - 1] = last_logits.float().cpu().numpy()
                features[rows, k_total - 1] = confidence_features(stage_logits[rows, k_total - 1])
                exit_stage[rows] = k_total - 1
                jumped[rows] = True
            keep = ~(leave | jump)
            if not keep.any():
                break
            if not keep.all():                       # compaction: drop finished images
                state = system.select(state, torch.from_numpy(np.flatnonzero(keep)).to(x.device))
            active = active[keep]
        trace = AdaptiveTrace(features, decisions, exit_stage, jumped, stage_macs,
                              list(system.stage_names), stage_logits)
        return _output(out, trace)

    def _forward_one(self, x: torch.Tensor) -> Output:
        """``forward`` for one image, in plain Python between the stages: the logits become one
        list of floats, features and decisions are computed on it without numpy (whose per-call
        overhead is a CIFAR block's share at batch 1: docs/benchmarks.md), and the trace's
        arrays are built once at the end. Same features and decisions as ``forward`` up to
        float rounding (``row_confidence_features``)."""
        system, k_total = self.system, self.system.n_stages
        rows, phis, macs_spent, decisions = {}, {}, {}, []
        state = system.begin(x)
        k, logits, jumped = 0, None, False
        while True:
            logits, state, macs = system.run_stage(k, state)
            rows[k], macs_spent[k] = logits[0].tolist(), int(macs[0])
            phis[k] = row_confidence_features(rows[k])
            leave, jump = self.policy.decide_one(k, phis[k], k_total)
            if leave:
                decisions.append(EXIT)
                break
            if jump:                                 # straight to the last network
                decisions.append(JUMP)
                logits, _, macs = system.run_stage(k_total - 1, state)
                k, jumped = k_total - 1, True
                rows[k], macs_spent[k] = logits[0].tolist(), int(macs[0])
                phis[k] = row_confidence_features(rows[k])
                break
            decisions.append(CONTINUE)
            k += 1
        stage_logits = np.full((1, k_total, logits.shape[1]), np.nan, np.float32)
        features = np.full((1, k_total, len(FEATURES)), np.nan)
        stage_macs = np.zeros((1, k_total), dtype=np.int64)
        for stage, row in rows.items():
            stage_logits[0, stage] = row
            features[0, stage] = phis[stage]
            stage_macs[0, stage] = macs_spent[stage]
        trace_decisions = np.full((1, k_total), NOT_REACHED, dtype=np.int8)
        trace_decisions[0, :len(decisions)] = decisions
        trace = AdaptiveTrace(features, trace_decisions, np.array([k]), np.array([jumped]),
                              stage_macs, list(system.stage_names), stage_logits)
        return _output(logits, trace)


def _output(logits: torch.Tensor, trace: AdaptiveTrace) -> Output:
    """The answer, with the trace's per-stage arrays as tensors when read."""
    return Output.staged(
        lambda: torch.from_numpy(trace.stage_logits).to(logits.device),
        lambda: torch.from_numpy(trace.stage_macs).to(logits.device), logits, trace)
