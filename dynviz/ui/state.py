"""Process-wide cached resources for the pages (the library stays Streamlit-free).

The app serves one workspace, the one ``$DYNVIZ_WORKSPACE`` names (else the built-in one),
resolved once per process by ``workspace()``; every page passes it to the library. Models,
live systems and cached outputs are shared by every session (``st.cache_resource``); small
derived results use ``st.cache_data``. Both are keyed by scalars: a workspace by its root
directory (``_BY_ROOT``), systems by name. The caches that grow with what sessions ask for
are bounded: live systems (one per system and operating point, each with a store of weight
slices of at most ``live.SLICE_STORE_BYTES``) and stage timings.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np
import streamlit as st

from dynviz import (budget, cache, data, gallery, live, operating_points, policy as P,
                    runtime, settings, zoo)
from dynviz.workspace import Workspace, WorkspaceError, resolve

# the cached functions below take the app's workspace, keyed by its root directory
_BY_ROOT = {Workspace: lambda ws: str(ws.root)}


def workspace_dir() -> str | None:
    """The directory of the workspace the app serves: ``$DYNVIZ_WORKSPACE``, else None (the
    built-in one). The one place the app reads it."""
    return os.environ.get("DYNVIZ_WORKSPACE") or None


def workspace() -> Workspace:
    """The workspace the app serves, resolved once per process."""
    return _resolved(workspace_dir())


@st.cache_resource(show_spinner=False)
def _resolved(directory: str | None) -> Workspace:
    return resolve(directory)


@st.cache_resource(show_spinner=False)
def _allocator_tuned() -> bool:
    """Once per process, before the first live timing: freed memory is reused rather than
    faulted back in, which steadies batch-1 latencies (``runtime.keep_freed_memory``)."""
    return runtime.keep_freed_memory()


# what the library raises for a file a user can mend (each message names it and the fix)
BROKEN_FILES = (WorkspaceError, zoo.CheckpointError, zoo.MissingCheckpointError,
                cache.CorruptCacheError, data.DatasetError, operating_points.PolicyFileError,
                settings.SettingError)


@contextlib.contextmanager
def broken_files_shown():
    """Shows a workspace file, checkpoint, cache or dataset the library refuses
    (``BROKEN_FILES``) as one error line that names it and says how to fix it, in place of a
    traceback (decorates a page's render). Anything else is a bug and keeps its traceback."""
    try:
        yield
    except BROKEN_FILES as err:
        st.error(str(err))


def val_split(ws: Workspace) -> data.Split | None:
    """The workspace's validation split, or None when its dataset is absent; a dataset that
    cannot be split (a class folder missing, a class too small) stops the page with one
    error line."""
    try:
        return _val_split(ws)
    except data.DatasetNotFoundError:
        return None
    except data.DatasetError as err:
        st.error(f"The dataset of {ws.name} cannot be split: {err}")
        st.stop()


@st.cache_resource(show_spinner="Reading the validation split…", hash_funcs=_BY_ROOT)
def _val_split(ws: Workspace) -> data.Split:
    return ws.split("val")


def shown_images(split: data.Split, wanted: np.ndarray) -> np.ndarray:
    """(len(wanted), S, S, 3) uint8: the images at positions ``wanted`` of ``split``, read
    from the memory-mapped decoded cache (``split.images()`` would copy the whole split)."""
    return np.asarray(data.load_images(split.dataset)[split.indices[wanted]])


@st.cache_resource(show_spinner="Loading model…", hash_funcs=_BY_ROOT)
def system(ws: Workspace, name: str):
    return zoo.load_system(ws, name)


@st.cache_resource(show_spinner=False, hash_funcs=_BY_ROOT)
def outputs(ws: Workspace, name: str) -> cache.CachedOutputs | None:
    """A system's cached validation outputs; built under a progress bar if missing."""
    split = val_split(ws)
    if split is None:  # shipped caches still work without the images
        return cache.find(ws, name, "val", zoo.checkpoint_sha(ws, name))
    text = (f"Caching {name}'s outputs on the {len(split)} validation images (once per "
            f"checkpoint)…")
    bars = []

    def show(done: float) -> None:
        if not bars:
            bars.append(st.progress(0.0, text=text))
        bars[0].progress(done, text=text)

    try:
        return zoo.outputs(ws, name, split, model=lambda: system(ws, name), progress=False,
                           on_progress=show)
    finally:
        for bar in bars:
            bar.empty()


LIVE_SYSTEMS = 8   # at most this many live systems are kept; the least recently used goes


@st.cache_resource(show_spinner="Preparing the live model (calibrating the sparse path)…",
                   max_entries=LIVE_SYSTEMS, hash_funcs=_BY_ROOT)
def live_system(ws: Workspace, name: str, policy_json: str | None) -> live.LiveSystem:
    _allocator_tuned()
    pol = P.Policy.from_json(policy_json) if policy_json else None
    return live.build(ws, name, pol, model=system(ws, name))


@st.cache_resource(show_spinner="Timing every stage…", max_entries=LIVE_SYSTEMS,
                   hash_funcs=_BY_ROOT)
def stage_latency(ws: Workspace, name: str) -> tuple[list[float], float]:
    return runtime.stage_seconds(runtime.fold(system(ws, name)), ws.data.image_size,
                                 batch_size=1)


def halves(ws: Workspace, name: str, metric: str) -> tuple[P.StageOutputs, P.StageOutputs]:
    cached = outputs(ws, name)
    fit, check = cached.half("fit"), cached.half("check")
    if metric == "latency":
        per_stage, dense = stage_latency(ws, name)
        fit, check = (budget.latency_costs(o, per_stage, dense) for o in (fit, check))
    return fit, check


def reference_accuracy(ws: Workspace, half: str) -> float | None:
    """``ws.reference``'s accuracy on a half of the validation split (the loss budgets are
    measured against it), or None when it is not trained or its outputs are not there."""
    if zoo.missing(ws, ws.reference):     # looked at on every call: it may be trained later
        return None
    return _reference_accuracy(ws, half)


@st.cache_data(show_spinner=False, hash_funcs=_BY_ROOT)
def _reference_accuracy(ws: Workspace, half: str) -> float | None:
    cached = outputs(ws, ws.reference)
    return None if cached is None else float(cached.half(half).correct[:, -1].mean())


@st.cache_data(show_spinner=False, max_entries=64, hash_funcs=_BY_ROOT)
def shipped_percent(ws: Workspace, name: str, metric: str) -> int | None:
    """The budget (whole % of the dense cost, in ``metric``) of the system's shipped
    ≤0.5%-loss operating point, or None when none is shipped."""
    policy = operating_points.load_policy(ws, name, operating_points.LOSSES[0])
    return None if policy is None else budget.start_percent(policy, halves(ws, name, metric)[0])


@st.cache_data(show_spinner="Sweeping the trade-off…", max_entries=64, hash_funcs=_BY_ROOT)
def curves(ws: Workspace, name: str, family: str, feature: str, topology: str,
           metric: str) -> budget.Curves:
    fit, check = halves(ws, name, metric)
    return budget.curves(fit, check, budget.BudgetQuery(family, feature, topology))


@st.cache_data(show_spinner=False, max_entries=64, hash_funcs=_BY_ROOT)
def class_specific_block(ws: Workspace, name: str) -> int:
    """Where the Galleries page's block picker starts for a gated system."""
    return gallery.most_class_specific_block(outputs(ws, name), ws.data.n_classes)


def start_index(ws: Workspace, names: list[str]) -> int:
    """Where a system picker over ``names`` starts: the workspace's featured system, else the
    first dynamic one (a static network has no compute path to show), else the first."""
    for candidates in ([ws.featured], zoo.dynamic(ws, names)):
        for name in candidates:
            if name in names:
                return names.index(name)
    return 0


def missing_systems_message(ws: Workspace) -> str:
    """What to run (or which program file to add) for every system not trained yet."""
    lines = []
    for name in ws.systems:
        needs = zoo.missing(ws, name)
        if needs:
            lines.append(f"- **{name}**: {needs[0].fix(ws, markdown=True)}")
    return "Systems not ready yet:\n" + "\n".join(lines)
