"""One image through one system, for real: prediction, compute path, MACs and measured
latency of the dynamic run against the dense one. The Inspect page and
``python -m dynviz predict`` both call ``inspect_image`` on a ``LiveSystem``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import singledispatch

import numpy as np
import torch
import torch.nn as nn

from dynviz import operating_points, runtime, settings, zoo
from dynviz.adaptive import AdaptiveClassifier, AdaptiveTrace
from dynviz.data import DataSpec
from dynviz.policy import Policy
from dynviz.workspace import Workspace
from models.lcnet import GateTrace


SLICE_STORE_BYTES = 64 << 20   # weight slices a live system keeps for recurring channel sets


@dataclass(frozen=True)
class LiveSystem:
    """A system ready to run live: folded for inference, its sparse path calibrated, staged
    systems under a policy. Build once per process and share; it is read-only."""
    name: str
    kind: str
    system: nn.Module          # answers an ``Output``
    dense: nn.Module           # its dense counterpart, folded alike
    device: torch.device
    data: DataSpec             # its workspace's input: size, normalisation, class names


def build(ws: Workspace, name: str, policy: Policy | None = None,
          model: nn.Module | None = None, calibrate: bool = True) -> LiveSystem:
    """Args:
        ws: the workspace the system is one of.
        name: a system of ``ws.systems``.
        policy: for staged systems (default: the shipped ≤0.5% loss operating point).
        model: an already loaded system (else loaded from its checkpoints).
        calibrate: measure the sparse path's slicing limits at batch 1 (else it slices
            whenever a channel is off).
    """
    device = settings.device()
    model = model if model is not None else zoo.load_system(ws, name, device)
    system = runtime.fold(model)
    if calibrate:
        runtime.calibrate_all(system, (1,), cache_bytes=SLICE_STORE_BYTES)
    if system.n_stages > 1:
        policy = policy or operating_points.load_policy(ws, name, operating_points.LOSSES[0])
        if policy is None:
            raise FileNotFoundError(f"no shipped policy for {name}; run "
                                    f"`{policies_command(ws)}` or pass one")
        system = AdaptiveClassifier(system, policy)
    return LiveSystem(name, ws.spec(name).kind, system, system.dense_counterpart(), device,
                      ws.data)


def policies_command(ws: Workspace) -> str:
    """The command that ships the operating points of ``ws``'s staged systems."""
    return ws.command("policies")


@dataclass(frozen=True)
class BlockPath:
    """Which blocks and channels of a gated network ran for one image."""
    block_scores: np.ndarray            # (n_blocks,) S_L
    channel_scores: list[np.ndarray]    # per block (C_mid,) S_C
    block_names: list[str]

    def summary(self) -> dict:
        return {"blocks_executed": int((self.block_scores > 0).sum()),
                "blocks": len(self.block_scores)}

    def route(self) -> str:
        """Where the image went, in a few words (a table cell)."""
        ran = self.summary()
        return f"{ran['blocks_executed']} of {ran['blocks']} blocks ran"

    def figures(self) -> dict:
        """Figures the Inspect page shows, by widget key."""
        from dynviz import plots

        return {"inspect_blocks": plots.block_strip(self.block_scores, self.block_names),
                "inspect_channels": plots.channel_heatmap(self.channel_scores,
                                                          self.block_scores, self.block_names)}

    def diagram(self):
        from dynviz import diagram

        return diagram.gated(self.block_scores, self.channel_scores, self.block_names)

    def sketch(self) -> str:
        """The diagram at the size of a table cell (SVG)."""
        from dynviz import diagram

        return diagram.sketch_blocks(
            self.block_scores, diagram.channel_share(self.block_scores, self.channel_scores),
            self.block_names)

    def caption(self) -> str | None:
        return None


@dataclass(frozen=True)
class StagePath:
    """What each stage of a staged system said about one image and what the policy did."""
    stage_names: list[str]
    stage_probs: np.ndarray        # (K, C), NaN where not run
    features: np.ndarray           # (K, 3)
    decisions: np.ndarray          # (K,) adaptive.NOT_REACHED/CONTINUE/EXIT/JUMP
    exit_scores: np.ndarray        # (K-1,) what the policy's exits compare...
    exit_thresholds: np.ndarray    # (K-1,) ...with these (leave iff >=)
    score_name: str
    exit_stage: int
    jumped: bool
    stage_macs: np.ndarray         # (K,)

    def summary(self) -> dict:
        return {"exit": self.stage_names[self.exit_stage], "jumped": self.jumped}

    def route(self) -> str:
        """Where the image went, in a few words (a table cell)."""
        return (f"exited at {self.stage_names[self.exit_stage]}"
                + (" (jumped to the last stage)" if self.jumped else ""))

    def figures(self) -> dict:
        from dynviz import plots

        return {"inspect_stages": plots.stage_path(self.stage_names, self.exit_scores,
                                                   self.exit_thresholds, self.decisions,
                                                   self.exit_stage, self.score_name)}

    def diagram(self):
        from dynviz import diagram

        return diagram.staged(self.stage_names, self.exit_scores, self.exit_thresholds,
                              self.decisions, self.exit_stage, self.jumped, self.score_name,
                              self.stage_macs)

    def sketch(self) -> str:
        """The diagram at the size of a table cell (SVG)."""
        from dynviz import diagram

        return diagram.sketch_stages(self.stage_names, self.decisions, self.exit_stage,
                                     self.jumped)

    def caption(self) -> str | None:
        return "MACs per stage: " + ", ".join(
            f"{n} {m / 1e6:.1f} M" for n, m in zip(self.stage_names, self.stage_macs))


@singledispatch
def compute_path(trace, system: nn.Module) -> BlockPath | StagePath | None:
    """The compute path of the first image of a trace; a static network has none."""
    return None


@compute_path.register
def _(trace: GateTrace, system: nn.Module) -> BlockPath:
    return BlockPath(trace.block_scores[0].cpu().numpy(),
                     [s[0].cpu().numpy() for s in trace.channel_scores], system.block_names())


@compute_path.register
def _(trace: AdaptiveTrace, system: nn.Module) -> StagePath:
    stage_probs = _softmax(torch.from_numpy(trace.stage_logits[0]))  # NaN rows stay NaN
    scores, thresholds = system.policy.exit_scores(trace.features[0])
    return StagePath(trace.stage_names, stage_probs, trace.features[0], trace.decisions[0],
                     scores, thresholds, system.policy.score_name(),
                     int(trace.exit_stage[0]), bool(trace.jumped[0]), trace.stage_macs[0])


@dataclass(frozen=True)
class InspectResult:
    system: str
    kind: str
    classes: tuple[str, ...]          # the workspace's, in label order
    image: np.ndarray                 # (H, W, 3) uint8, as the model saw it
    probs: np.ndarray                 # (C,) of the answer used
    macs: int                         # spent on this image
    macs_dense: int                   # the dense counterpart's MACs
    ms_dynamic: float                 # measured, median
    ms_dense: float
    path: BlockPath | StagePath | None = None

    @property
    def prediction(self) -> str:
        return self.classes[int(self.probs.argmax())]

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        order = np.argsort(-self.probs)[:k]
        return [(self.classes[i], float(self.probs[i])) for i in order]

    def summary(self) -> dict:
        out = {"system": self.system, "prediction": self.prediction,
               "top5": self.top(), "macs": int(self.macs), "macs_dense": int(self.macs_dense),
               "mac_fraction": round(self.macs / self.macs_dense, 4),
               "ms_dynamic": round(self.ms_dynamic, 3), "ms_dense": round(self.ms_dense, 3)}
        return out | (self.path.summary() if self.path is not None else {})


def path_diagram(live: LiveSystem, result: InspectResult):
    """The compute-path figure of ``result``, one image through ``live``: its path drawn, or
    for a static system the plain chain of its blocks (none known: one box)."""
    from dynviz import diagram

    if result.path is not None:
        return result.path.diagram()
    return diagram.static(_block_names(live))


def path_sketch(live: LiveSystem, result: InspectResult) -> str:
    """``path_diagram`` at the size of a table cell: an SVG data URL."""
    from dynviz import diagram

    if result.path is not None:
        return diagram.data_url(result.path.sketch())
    return diagram.data_url(diagram.sketch_static(_block_names(live)))


def _block_names(live: LiveSystem) -> list[str]:
    """The blocks of a static system's network; none known for an exported program."""
    return getattr(live.dense, "block_names", list)()


def _softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), -1).cpu().numpy()


@torch.no_grad()
def inspect_image(live: LiveSystem, image: np.ndarray, timing_repeats: int = 3,
                  time_dense: bool = True) -> InspectResult:
    """``image``: (S, S, 3) uint8 at the workspace's image size, already preprocessed (see
    ``uploads.preprocess_upload``).

    The latencies are medians of ``timing_repeats`` interleaved runs of each path after one
    warm-up run (few enough to keep Inspect's server time small: docs/benchmarks.md); without
    ``time_dense`` the dense path is not run and its latency is NaN."""
    x = live.data.to_tensor(image[None], live.device)
    paths = {"dynamic": lambda: live.system(x)} | (
        {"dense": lambda: live.dense(x)} if time_dense else {})
    times = runtime.compare_times(paths, repeats=timing_repeats, warmup=1, device=live.device)
    out = live.system(x)
    return InspectResult(live.name, live.kind, live.data.classes, image,
                         _softmax(out.logits[0]), int(out.macs[0]), live.dense.macs(),
                         times["dynamic"] * 1e3, times.get("dense", float("nan")) * 1e3,
                         compute_path(out.trace, live.system))
