"""One image through every system side by side, and many images through one system: the
rows of the Inspect page's two tables, each row one ``live.inspect_image`` answer."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dynviz import live, operating_points, uploads, zoo
from dynviz.policy import Policy
from dynviz.workspace import Workspace

# the live system a compare runs: (name, policy JSON or None) -> LiveSystem; the app passes
# its cached ``state.live_system`` so that compare reuses what Inspect already built
LiveFor = Callable[[str, str | None], live.LiveSystem]
STATIC_ROUTE = "every block"
COMPARE_TIMING_REPEATS = 1   # each system's own path timed once after a warm-up (not the
                             # dense one): a compare of the default zoo stays fast


def default_policy_json(ws: Workspace, name: str) -> str | None:
    """The operating point Inspect starts a system on (the ≤0.5% loss point for staged
    systems, None for the rest): compare runs each system as Inspect would."""
    if ws.spec(name).kind not in ("exits", "cascade"):
        return None
    policy = operating_points.load_policy(ws, name, operating_points.LOSSES[0])
    if policy is None:
        raise FileNotFoundError(f"no operating point for {name} yet: run "
                                f"`{live.policies_command(ws)}`")
    return policy.to_json()


def row(result: live.InspectResult, label: int | None = None,
        sketch: str | None = None) -> dict:
    """A table row of one answer; ``correct`` only when the image's label is known,
    ``sketch`` (the path drawn small, ``live.path_sketch``) when given."""
    out = {"system": result.system, "kind": result.kind, "prediction": result.prediction}
    if label is not None:
        out["correct"] = bool(int(result.probs.argmax()) == label)
    out |= {"macs": int(result.macs),
            "mac_share": result.macs / result.macs_dense,
            "ms": result.ms_dynamic,
            "route": result.path.route() if result.path is not None else STATIC_ROUTE}
    return out | ({"sketch": sketch} if sketch is not None else {})


@dataclass(frozen=True)
class Comparison:
    """One image through each system that could run; why the others could not."""
    results: list[live.InspectResult]
    label: int | None
    skipped: dict[str, str]            # system -> reason
    sketches: list[str]                # per result, ``live.path_sketch``

    def rows(self) -> list[dict]:
        return [row(r, self.label, s) for r, s in zip(self.results, self.sketches, strict=True)]


def compare(ws: Workspace, image: np.ndarray, label: int | None = None,
            live_for: LiveFor | None = None,
            timing_repeats: int = COMPARE_TIMING_REPEATS) -> Comparison:
    """Args:
        ws: the workspace whose available systems are compared.
        image: (S, S, 3) uint8 at the workspace's image size.
        label: the image's class index when known (a validation image).
        live_for: builds (or fetches) a live system; default ``live.build``.
        timing_repeats: of ``live.inspect_image``.
    """
    live_for = live_for or (lambda name, policy_json: live.build(
        ws, name, None if policy_json is None else Policy.from_json(policy_json)))
    results, skipped, sketches = [], {}, []
    for name in zoo.available(ws):
        try:
            system = live_for(name, default_policy_json(ws, name))
        except FileNotFoundError as err:
            skipped[name] = str(err)
            continue
        results.append(live.inspect_image(system, image, timing_repeats, time_dense=False))
        sketches.append(live.path_sketch(system, results[-1]))
    return Comparison(results, label, skipped, sketches)


@dataclass(frozen=True)
class Batch:
    """Several uploaded files through one system: an answer per decodable file, a line per
    file that is not."""
    files: list[str]                   # of the answers, in upload order
    results: list[live.InspectResult]
    failures: list[tuple[str, str]]    # (file, why)
    sketches: list[str]                # per answer, ``live.path_sketch``

    def rows(self) -> list[dict]:
        return [{"file": f} | {k: v for k, v in row(r, None, s).items()
                               if k not in ("system", "kind")}
                for f, r, s in zip(self.files, self.results, self.sketches, strict=True)]


def run_batch(system: live.LiveSystem, files: Sequence[tuple[str, bytes]],
              timing_repeats: int = COMPARE_TIMING_REPEATS) -> Batch:
    """``files``: (name, raw bytes) as uploaded; each is preprocessed as
    ``uploads.preprocess_upload`` does for one upload."""
    names, results, failures = [], [], []
    for name, raw in files:
        try:
            image = uploads.preprocess_upload(raw, system.data.image_size)
        except uploads.InvalidImageError as err:
            failures.append((name, str(err)))
            continue
        names.append(name)
        results.append(live.inspect_image(system, image, timing_repeats, time_dense=False))
    return Batch(names, results, failures, [live.path_sketch(system, r) for r in results])
