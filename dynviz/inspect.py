"""One image through one system, for real: prediction, compute path, MACs and measured
latency of the dynamic run against the dense one. The Inspect page and
``python -m dynviz predict`` both call ``inspect_image``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn as nn

from dynviz import data, engine, settings, zoo
from dynviz.adaptive import AdaptiveClassifier
from dynviz.policy import Policy
from models.lcnet import SparsePlan
from models.staged import dense_counterpart


@dataclass
class Runner:
    """A system ready to run live: BN-folded inference copies, a calibrated sparse plan
    (gated) or a policy (staged). Build once per process and share; it is read-only."""
    name: str
    kind: str
    model: nn.Module
    dense: nn.Module
    plan: SparsePlan | None = None
    policy: Policy | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @cached_property
    def adaptive(self) -> AdaptiveClassifier:
        """The staged model under the policy, built on first use."""
        return AdaptiveClassifier(self.model, self.policy)

    def forward(self, x: torch.Tensor):
        if self.kind == "gated":
            return self.model(x, self.plan)
        if self.kind in ("exits", "cascade"):
            return self.adaptive(x)
        return self.model(x)


def build_runner(name: str, policy: Policy | None = None, model: nn.Module | None = None,
                 calibrate: bool = True) -> Runner:
    """Args:
        name: a system of ``dynviz.zoo.SYSTEMS``.
        policy: for staged systems (default: the shipped ≤0.5% loss operating point).
        model: an already loaded system (else loaded from its checkpoints).
        calibrate: measure the sparse plan's slicing thresholds (gated systems).
    """
    from dynviz import operating_points

    spec = zoo.spec(name)
    device = settings.device()
    model = model if model is not None else zoo.load_system(name, device)
    folded = engine.fold_batchnorm(model)
    dense = engine.fold_batchnorm(dense_counterpart(model)).to(
        memory_format=torch.channels_last)
    plan = None
    if spec.kind == "gated":
        plan = engine.calibrate(folded, 1) if calibrate else SparsePlan(1.0)
    if spec.kind in ("exits", "cascade") and policy is None:
        policy = operating_points.load_policy(name, operating_points.LOSSES[0])
        if policy is None:
            raise FileNotFoundError(f"no shipped policy for {name}; run "
                                    f"`python -m dynviz policies` or pass one")
    return Runner(name, spec.kind, folded, dense, plan, policy, device)


@dataclass
class InspectResult:
    system: str
    kind: str
    image: np.ndarray                 # (32, 32, 3) uint8, as the model saw it
    probs: np.ndarray                 # (C,) of the answer used
    macs: int                         # spent on this image
    macs_dense: int                   # the dense counterpart's MACs
    ms_dynamic: float                 # measured, median
    ms_dense: float
    block_scores: np.ndarray | None = None      # gated: (n_blocks,)
    channel_scores: list[np.ndarray] | None = None  # gated: per block (C_mid,)
    block_names: list[str] | None = None
    stage_names: list[str] | None = None        # staged
    stage_probs: np.ndarray | None = None       # (K, C), NaN where not run
    features: np.ndarray | None = None          # (K, 3)
    decisions: np.ndarray | None = None         # (K,) adaptive.NOT_REACHED/CONTINUE/EXIT/JUMP
    exit_scores: np.ndarray | None = None       # (K-1,) what the policy's exits compare...
    exit_thresholds: np.ndarray | None = None   # (K-1,) ...with these (leave iff >=)
    score_name: str | None = None
    exit_stage: int | None = None
    jumped: bool = False
    stage_macs: np.ndarray | None = None        # (K,)

    @property
    def prediction(self) -> str:
        return data.CLASSES[int(self.probs.argmax())]

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        order = np.argsort(-self.probs)[:k]
        return [(data.CLASSES[i], float(self.probs[i])) for i in order]

    def summary(self) -> dict:
        out = {"system": self.system, "prediction": self.prediction,
               "top5": self.top(), "macs": int(self.macs), "macs_dense": int(self.macs_dense),
               "mac_fraction": round(self.macs / self.macs_dense, 4),
               "ms_dynamic": round(self.ms_dynamic, 3), "ms_dense": round(self.ms_dense, 3)}
        if self.block_scores is not None:
            out["blocks_executed"] = int((self.block_scores > 0).sum())
            out["blocks"] = len(self.block_scores)
        if self.stage_names is not None:
            out["exit"] = self.stage_names[self.exit_stage]
            out["jumped"] = self.jumped
        return out


def _softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), -1).cpu().numpy()


@torch.no_grad()
def inspect_image(runner: Runner, image: np.ndarray, timing_repeats: int = 3) -> InspectResult:
    """``image``: (H, W, 3) uint8 already preprocessed (see ``data.preprocess_upload``).

    The latencies are medians of ``timing_repeats`` runs of each path, interleaved, after one
    warm-up run (three keep a ResNet-56-sized Inspect inside its 150 ms of server time)."""
    x = data.to_tensor(image[None], runner.device)
    times = engine.compare_times({"dynamic": lambda: runner.forward(x),
                                  "dense": lambda: runner.dense(x)},
                                 repeats=timing_repeats, warmup=1, device=runner.device)
    out = runner.forward(x)
    dense_macs = runner.dense.macs()
    common = dict(system=runner.name, kind=runner.kind, image=image,
                  macs_dense=dense_macs, ms_dynamic=times["dynamic"] * 1e3,
                  ms_dense=times["dense"] * 1e3)
    if runner.kind == "gated":
        logits, trace = out
        return InspectResult(probs=_softmax(logits[0]), macs=int(trace.macs[0]),
                             block_scores=trace.block_scores[0].cpu().numpy(),
                             channel_scores=[s[0].cpu().numpy() for s in trace.channel_scores],
                             block_names=runner.model.block_names(), **common)
    if runner.kind in ("exits", "cascade"):
        logits, trace = out
        stage_probs = _softmax(torch.from_numpy(trace.stage_logits[0]))  # NaN rows stay NaN
        scores, thresholds = runner.policy.exit_scores(trace.features[0])
        return InspectResult(probs=_softmax(logits[0]), macs=int(trace.macs[0]),
                             stage_names=trace.stage_names, stage_probs=stage_probs,
                             features=trace.features[0], decisions=trace.decisions[0],
                             exit_scores=scores, exit_thresholds=thresholds,
                             score_name=runner.policy.score_name(),
                             exit_stage=int(trace.exit_stage[0]), jumped=bool(trace.jumped[0]),
                             stage_macs=trace.stage_macs[0], **common)
    return InspectResult(probs=_softmax(out[0]), macs=dense_macs, **common)
